"""The exception tree ``shared/errors.py`` draws is the code's: every error class of the
project is drawn, under its parent, with the HTTP status it has and that the transport's
handler answers with."""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass

import pytest

import shared.errors
from agent.errors import CloudRefusedError
from shared.errors import TandemError
from shared.oip.http import error_response
from tests.helpers import ROOT

_LINE = re.compile(
    r"^(?P<indent>[ │├└─]*)(?P<name>\w+) \((?P<status>\d{3})\)(?: +(?P<module>[\w.]+))?$"
)


@dataclass(frozen=True)
class Drawn:
    name: str
    status: int
    module: str
    parent: str | None


def drawing() -> dict[str, Drawn]:
    """The tree in ``shared.errors``' docstring: a module named on a line holds that class
    and, unless they name their own, the ones drawn below it."""
    doc = shared.errors.__doc__ or ""
    lines = [line[4:] for line in doc.splitlines() if _LINE.match(line[4:])]
    drawn: dict[str, Drawn] = {}
    path: list[Drawn] = []  # the ancestors of the current line, by depth
    for line in lines:
        m = _LINE.match(line)
        assert m is not None
        depth = len(m["indent"]) // 4
        parent = path[depth - 1] if depth else None
        module = m["module"] or (parent.module if parent else "shared.errors")
        node = Drawn(m["name"], int(m["status"]), module, parent.name if parent else None)
        drawn[node.name] = node
        del path[depth:]
        path.append(node)
    return drawn


def error_classes() -> dict[str, type[TandemError]]:
    """Every ``TandemError`` subclass defined in agent/, shared/ and cloud/: the modules
    whose source defines a class named ``*Error``, imported and searched."""
    found: dict[str, type[TandemError]] = {}
    for path in sorted(
        p for pkg in ("agent", "shared", "cloud") for p in (ROOT / pkg).rglob("*.py")
    ):
        names = [
            node.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error")
        ]
        if not names:
            continue
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name in names:
            cls = getattr(module, name)
            if issubclass(cls, TandemError):
                assert name not in found, f"two error classes named {name}"
                found[name] = cls
    return found


DRAWN = drawing()
CLASSES = error_classes()


def test_the_drawing_has_every_error_class() -> None:
    assert "UpdateRejectedError" in CLASSES and "RolloutError" in CLASSES  # the search works
    assert sorted(DRAWN) == sorted(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_class_is_drawn_where_it_is(name: str) -> None:
    cls, drawn = CLASSES[name], DRAWN[name]
    assert cls.__module__ == drawn.module
    parent = cls.__bases__[0]
    assert (parent.__name__ if parent is not Exception else None) == drawn.parent
    assert cls.http_status == drawn.status


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_error_leaves_the_transport_with_its_status(name: str) -> None:
    cls = CLASSES[name]
    exc = CloudRefusedError(404, "boom") if cls is CloudRefusedError else cls("boom")
    response = error_response(exc)
    assert response.status_code == DRAWN[name].status
    assert response.body.startswith(b'{"error":') and b"boom" in response.body
