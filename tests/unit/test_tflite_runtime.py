"""The TFLite runtime search: done once per process, whatever it found, from any thread.

A failed import is not cached by Python: without the backend's own cache every model load
tried ``ai_edge_litert`` again under the import lock."""

from __future__ import annotations

import importlib
import threading
from types import ModuleType, SimpleNamespace

import pytest

from agent.errors import RuntimeMissingError
from agent.inference.backends import tflite


class _CountingImport:
    """``importlib.import_module`` with a count of the calls per module name; the modules
    named in ``fake`` import as stand-ins, the others are missing."""

    def __init__(self, fake: dict[str, object]) -> None:
        self.fake = fake
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, package: str | None = None) -> ModuleType | object:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fake:
            return self.fake[name]
        raise ModuleNotFoundError(f"No module named {name!r}")


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has not searched yet (and whose answer is dropped afterwards)."""
    monkeypatch.setattr(tflite, "_found", None, raising=False)


class _Interpreter:
    pass


def test_the_second_call_imports_nothing(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingImport(
        {"tflite_runtime.interpreter": SimpleNamespace(Interpreter=_Interpreter)}
    )
    monkeypatch.setattr(importlib, "import_module", counting)
    assert tflite.find_interpreter_class() == ("tflite_runtime", _Interpreter)
    assert counting.calls == {"ai_edge_litert.interpreter": 1, "tflite_runtime.interpreter": 1}
    assert tflite.find_interpreter_class() == ("tflite_runtime", _Interpreter)
    assert counting.calls == {"ai_edge_litert.interpreter": 1, "tflite_runtime.interpreter": 1}


def test_a_missing_runtime_is_searched_once_and_still_refused(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _CountingImport({})
    monkeypatch.setattr(importlib, "import_module", counting)
    for _ in range(3):  # never an answer after a failed search: the same refusal each time
        with pytest.raises(RuntimeMissingError, match="pip install"):
            tflite.find_interpreter_class()
    assert counting.calls == {
        "ai_edge_litert.interpreter": 1,
        "tflite_runtime.interpreter": 1,
        "tensorflow": 1,
    }


def test_loads_at_once_search_once(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingImport(
        {"tflite_runtime.interpreter": SimpleNamespace(Interpreter=_Interpreter)}
    )
    monkeypatch.setattr(importlib, "import_module", counting)
    start = threading.Barrier(8)
    answers: list[tuple[str, object]] = []

    def load() -> None:
        start.wait()
        answers.append(tflite.find_interpreter_class())

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [("tflite_runtime", _Interpreter)] * 8
    assert counting.calls == {"ai_edge_litert.interpreter": 1, "tflite_runtime.interpreter": 1}


def test_the_real_runtime_is_found_and_kept() -> None:
    first = tflite.find_interpreter_class()
    assert tflite.find_interpreter_class() == first
