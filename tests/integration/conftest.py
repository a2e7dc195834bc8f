"""Fixtures of the integration tier."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fleet import Fleet, running_fleet
from tests.helpers import ROOT
from tests.mosquitto import Mosquitto


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, broker: Mosquitto) -> Iterator[Fleet]:
    """A running fleet (``tests/fleet.py``) with no agent started yet. Parametrise it
    indirectly for a variant: ``@pytest.mark.parametrize("fleet", [{"token": "s"}],
    indirect=True)`` passes the dict to ``running_fleet``."""
    options = dict(getattr(request, "param", {}))
    if "repo_from" in options:  # a fixture that built models: its cloud/ repository
        options["repo"] = request.getfixturevalue(options.pop("repo_from")) / "cloud"
    with running_fleet(tmp_path, broker, **options) as f:
        yield f


#: Share of the full build's pictures and epochs, per pair (``--quick``). The detector's is
#: enough for both detectors to learn, the cloud one clearly ahead; the classifier's only
#: for it to be what it is.
IMAGE_QUICK = {"classifier": 0.1, "detector": 0.5}


@pytest.fixture(scope="session")
def image_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tandem's own image model pairs (``scripts/build_image_models.py --quick``), built once
    per session in a child process: TensorFlow must never load in the test process, whose
    interpreter is ``tflite_runtime`` (the two clash in native code). ``TANDEM_IMAGE_MODELS``
    names a folder built already (a faster edit-run loop; CI builds)."""
    prebuilt = os.environ.get("TANDEM_IMAGE_MODELS")
    if prebuilt:
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("image-models")
    for pair, share in IMAGE_QUICK.items():
        script = ["scripts/build_image_models.py", "--out", str(out), "--only", pair]
        proc = subprocess.run(
            [sys.executable, *script, "--quick", str(share)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


#: ``model package --name`` through the CLI: ``(edge, name, *flags) -> (exit code, stdout,
#: stderr)``, into ``tmp_path/reg`` with a key made in ``tmp_path/keys``.
PackageCli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def package_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> PackageCli:
    from cloud.cli import main as cloud_main

    assert cloud_main(["keys", "generate", "--dir", str(tmp_path / "keys")]) == 0
    capsys.readouterr()

    def run(edge: Path, name: str, *flags: str) -> tuple[int, str, str]:
        key = tmp_path / "keys" / "operator.key"
        argv = ["model", "package", "--edge", str(edge), "--name", name]
        code = cloud_main([*argv, "--registry", str(tmp_path / "reg"), "--key", str(key), *flags])
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return code, out, err

    return run
