"""The layout's walls: what each part of the tree may import, and how light the agent and the
inference server stay. A rule names a module prefix and what no module under it may import,
anywhere in the file (lazy imports included), unless an exception says why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

WEB = {"fastapi", "starlette", "uvicorn"}
RUNTIMES = {"onnxruntime", "tensorflow", "tflite_runtime", "ai_edge_litert"}

#: prefix -> modules that no module under the prefix may import
FORBIDDEN: dict[str, set[str]] = {
    "shared": {"agent", "cloud", "paho.mqtt.client.Client"} | RUNTIMES | WEB,
    "agent": {"cloud", "onnx", "sklearn", "matplotlib"} | RUNTIMES | WEB,
    "cloud": {"agent"},
    # the hot path loads neither SQLite nor paho, and knows nothing of fleets or releases
    "cloud.serving": {"cloud.fleet", "cloud.releases", "cloud.pipeline", "sqlite3", "paho"}
    | {"shared.mqtt", "tensorflow"},
    "cloud.releases": {"cloud.fleet", "cloud.serving", "cloud.pipeline", "tensorflow"},
    "cloud.fleet": {"cloud.serving", "cloud.pipeline", "tensorflow", "onnxruntime"},
}
#: (module, imported) pairs allowed in spite of a rule, and why
ALLOWED = {
    ("shared.oip.http", "fastapi"): "the routes both servers mount",
    ("shared.oip.http", "starlette"): "the routes both servers mount",
    ("agent.server", "fastapi"): "only the local endpoint's commands import it",
    ("agent.server", "starlette"): "only the local endpoint's commands import it",
    ("agent.uvicorn_runner", "uvicorn"): "imported inside a function, when serving",
    ("agent.inference.backends.onnx", "onnxruntime"): "imported by load(), when configured",
    ("agent.inference.backends.tflite", "tflite_runtime"): "found at load time",
    ("agent.inference.backends.tflite", "ai_edge_litert"): "found at load time",
    ("agent.inference.backends.tflite", "tensorflow"): "the last fallback, at load time",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("prefix", sorted(FORBIDDEN))
def test_packages_respect_the_layout(prefix: str) -> None:
    offenders = []
    for path in sorted((ROOT / prefix.replace(".", "/")).rglob("*.py")):
        module = _module_name(path)
        for imported in sorted(_imports(path)):
            for banned in FORBIDDEN[prefix]:
                if _within(imported, banned) and (module, banned) not in ALLOWED:
                    offenders.append(f"{module} imports {imported}")
    assert offenders == []


def test_the_rules_see_real_imports() -> None:
    """A positive control: the collector does import the fleet store and paho's client."""
    found = _imports(ROOT / "cloud/fleet/collector.py")
    assert "cloud.fleet.store" in found and "shared.mqtt" in found


def _loaded(code: str) -> set[str]:
    probe = code + "; import sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return set(out.stdout.split())


def test_importing_the_agent_stays_light() -> None:
    loaded = _loaded(
        "import agent, agent.cli, agent.settings, agent.inference.core, agent.device.service, "
        "agent.inference.model, shared.preprocess, shared.decode, shared.bundle"
    )
    heavy = RUNTIMES | WEB | {"onnx", "matplotlib", "sklearn", "cloud", "PIL"}
    assert {m for m in loaded if m.split(".")[0] in heavy} == set()


def test_the_inference_server_loads_no_fleet() -> None:
    loaded = _loaded("import cloud.serving.dataplane, cloud.serving.repository")
    assert {m for m in loaded if m.split(".")[0] in {"sqlite3", "paho", "tensorflow"}} == set()
    assert not any(_within(m, "cloud.fleet") or _within(m, "cloud.releases") for m in loaded)
    assert "cloud.serving.batcher" in loaded  # positive control: the probe saw the imports
