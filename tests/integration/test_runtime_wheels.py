"""Every listed device installs the agent's TFLite runtime: for each platform (machine, glibc,
Python), the runtime and NumPy requirements pyproject.toml gives that platform (markers
evaluated for it) must each find a binary wheel, checked with ``pip download --platform``
(nothing is installed). Environment markers cannot see glibc, so one requirement must fit
every glibc a machine and Python can come with: ``tflite-runtime`` 2.14 wheels need glibc
2.34 and fail on Ubuntu 20.04 / JetPack 5 and Debian 11 (2.31).

Wheels are kept in ``.cache/wheels`` (like tests/real_models.py): a rerun looks there first,
with no network; only a miss asks the registry. A registry that cannot be reached at all
skips the test with pip's reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.real_models import ROOT, WHEEL_CACHE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The agent's TFLite runtimes, in the loader's order of preference.
RUNTIMES = ("ai-edge-litert", "tflite-runtime")
#: (machine, glibc minor, Python): the generic manylinux tags the issue names, for every
#: Python the agent supports, and the x86_64 servers.
PLATFORMS = [
    ("aarch64", glibc, python)
    for glibc in (27, 31, 34, 36)
    for python in ("3.10", "3.11", "3.12", "3.13")
] + [("x86_64", glibc, python) for glibc in (31, 35) for python in ("3.11", "3.12")]
UNREACHABLE = ("Could not fetch URL", "NewConnectionError", "Network is unreachable")


def requirements_for(machine: str, python: str) -> list[Requirement]:
    """pyproject's base requirements of the runtime and NumPy that apply on this platform."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_machine": machine,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    found = []
    for line in doc["project"]["dependencies"]:
        req = Requirement(line)
        if req.name in (*RUNTIMES, "numpy") and (req.marker is None or req.marker.evaluate(env)):
            found.append(req)
    return found


def pip_download(machine: str, glibc: int, python: str, specs: list[str], dest: Path) -> str:
    """``pip download`` of ``specs`` for the platform; the cache first, then the registry.
    Returns pip's output; fails the test when no wheel fits."""
    tags = ["--platform", f"manylinux2014_{machine}"]
    for minor in range(17, glibc + 1):  # a glibc runs the wheels of every older one
        tags += ["--platform", f"manylinux_2_{minor}_{machine}"]
    abi = "cp" + python.replace(".", "")
    common = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
        *("--python-version", python, "--implementation", "cp", "--abi", abi, *tags),
        *("--disable-pip-version-check", "-d", str(dest)),
    ]
    offline = subprocess.run(
        [*common, "--no-index", "--find-links", str(dest), *specs], capture_output=True, text=True
    )
    if offline.returncode == 0:
        return offline.stdout
    online = subprocess.run([*common, *specs], capture_output=True, text=True)
    if online.returncode != 0:
        if any(marker in online.stderr for marker in UNREACHABLE) and "from versions" not in (
            online.stderr
        ):
            pytest.skip(f"the package registry is not reachable: {online.stderr[-300:]}")
        pytest.fail(
            f"no wheel of {specs} for {machine} glibc 2.{glibc} Python {python}:\n"
            f"{online.stderr[-1500:]}"
        )
    return online.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("machine", "glibc", "python"), PLATFORMS)
def test_the_runtime_installs(machine: str, glibc: int, python: str) -> None:
    reqs = requirements_for(machine, python)
    runtimes = [r for r in reqs if r.name in RUNTIMES]
    assert len(runtimes) == 1, f"one TFLite runtime for {machine} Python {python}: {runtimes}"
    assert [r.name for r in reqs].count("numpy") == 1
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    specs = [f"{r.name}{r.specifier}" for r in reqs]
    out = pip_download(machine, glibc, python, specs, WHEEL_CACHE)
    for r in reqs:
        wheel = r.name.replace("-", "_")
        assert wheel in out, f"pip named no {wheel} wheel:\n{out}"


def test_tflite_runtime_alone_would_not_install_on_glibc_2_31() -> None:
    """The positive control: the old base requirement really is refused where the issue
    says (so the check above can fail)."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    with pytest.raises(pytest.fail.Exception, match="no wheel"):
        pip_download("aarch64", 31, "3.11", ["tflite-runtime==2.14.*"], WHEEL_CACHE)
