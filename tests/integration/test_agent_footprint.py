"""What an agent's process loads: only what it uses (scripts/bench_agent_rss.py measures the
RSS; here, in fresh interpreters, which modules are there at all)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def _loaded(code: str) -> set[str]:
    """The modules ``code`` leaves imported (those marked absent are not)."""
    probe = code + "\nimport sys; print(' '.join(sorted(n for n, m in sys.modules.items() if m)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return set(out.stdout.split())


def _packages(loaded: set[str]) -> set[str]:
    return {m.split(".")[0] for m in loaded}


def test_the_bare_package_loads_nothing_until_a_name_is_used() -> None:
    """``tandem-agent`` runs ``agent.cli``, whose package runs first: it must leave the CLI
    the choice of what loads (httpx, the service) and still give every name on use."""
    loaded = _loaded("import agent")
    assert {"httpx", "numpy", "pydantic"} & _packages(loaded) == set()
    assert "agent.inference.core" not in loaded
    used = _loaded(
        "from agent import Agent, AgentSettings, InferenceResult, Latency, Reason, __version__"
    )
    assert {"agent.inference.core", "agent.settings", "httpx"} <= used | _packages(used)


#: A device's process as ``tandem-agent run`` builds it: the service, the endpoint's app on
#: a real model and uvicorn's configuration loaded (which imports the protocol modules).
_DEVICE = """
from agent.cli import skip_unused_modules
skip_unused_modules()
from agent.device.service import AgentService
from agent.inference.core import Agent
from agent.server import create_app
from agent.settings import AgentSettings, ServerSettings
from agent.uvicorn_runner import server_config
from tests.helpers import EDGE_INT8
agent = Agent(AgentSettings(model_dir=EDGE_INT8))
server_config(create_app(agent), ServerSettings(), "warning").load()
"""


def test_a_device_process_loads_no_module_it_does_not_use() -> None:
    loaded = _loaded(_DEVICE)
    assert {"fastapi", "uvicorn", "httpx", "paho"} <= _packages(loaded)  # positive control
    unused = {"rich", "pygments", "watchfiles", "websockets", "uvloop"}
    assert unused & _packages(loaded) == set()
    assert {"httpx._main", "pydantic.v1"} & loaded == set()


def test_a_module_marked_absent_is_refused_as_not_installed() -> None:
    """What the dependencies that import them rely on: an ImportError, never a crash."""
    loaded = _loaded(
        "from agent.cli import UNUSED_MODULES, skip_unused_modules\n"
        "skip_unused_modules()\n"
        "import importlib\n"
        "for name in UNUSED_MODULES:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'{name} imported')\n"
        "import httpx, uvicorn.supervisors\n"
        "assert callable(httpx.main)  # httpx's stand-in that says the CLI is not installed\n"
    )
    assert "uvicorn.supervisors.statreload" in loaded


def test_a_trust_store_loads_no_cryptography_until_a_manifest_is_verified() -> None:
    """A device boots with its trust store: OpenSSL's bindings (about 8 MB resident) wait
    for the first manifest."""
    boot = "from shared.signing import TrustStore\nTrustStore().add('A' * 43 + '=')\n"
    assert "cryptography" not in _packages(_loaded(boot))
    verify = boot + (
        "from shared.signing import SignatureError, SigningKey\n"
        "from tests.helpers import EDGE_INT8\n"
        "from shared.manifest import Manifest\n"
        "key = SigningKey.generate()\n"
        "m = key.sign(Manifest.from_json((EDGE_INT8 / 'manifest.json').read_text()))\n"
        "t = TrustStore({key.key_id: key.public_raw})\n"
        "t.verify(m)\n"
    )
    assert "cryptography" in _packages(_loaded(verify))  # positive control: it does verify
