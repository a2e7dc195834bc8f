"""The layout's promises: what each package may import, and how light the agent stays."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

FORBIDDEN = {
    "shared": {"agent", "cloud", "onnxruntime", "tensorflow", "tflite_runtime"},
    "agent": {"cloud", "onnxruntime", "tensorflow", "fastapi", "starlette", "uvicorn"},
    "cloud": {"agent", "tensorflow"},
}
# modules allowed to import a framework lazily or at top level, and why
ALLOWED_TOP_LEVEL = {
    ("agent", "server.py"): {"fastapi", "starlette"},  # only `tandem-agent serve` imports it
}


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_respect_the_layout(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        allowed = ALLOWED_TOP_LEVEL.get((package, path.name), set())
        bad = (_top_level_imports(path) & FORBIDDEN[package]) - allowed
        if package == "shared" and path.name != "oip_http.py":
            bad |= _top_level_imports(path) & {"fastapi", "starlette", "uvicorn"}
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert offenders == []


def test_importing_the_agent_stays_light() -> None:
    code = (
        "import sys, agent, agent.cli, agent.core;"
        "heavy = {'onnxruntime', 'tensorflow', 'tflite_runtime', 'ai_edge_litert', 'fastapi',"
        " 'starlette', 'uvicorn', 'matplotlib', 'sklearn', 'cloud'};"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"
