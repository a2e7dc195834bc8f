"""Tandem's edge agent: local TFLite inference with escalation to a cloud OIP endpoint.

``from agent import Agent`` loads NumPy, pydantic and httpx, nothing heavier: runtimes are
imported when a model is loaded, web frameworks only by ``tandem-agent serve``. Importing
the bare package loads none of it: the names below are resolved on first use, so that
``tandem-agent`` (``agent.cli``) decides what its process loads before anything is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.inference.core import Agent
    from agent.inference.result import InferenceResult, Latency, Reason
    from agent.settings import AgentSettings
    from agent.version import __version__

__all__ = ["Agent", "AgentSettings", "InferenceResult", "Latency", "Reason", "__version__"]

_WHERE = {
    "Agent": "agent.inference.core",
    "InferenceResult": "agent.inference.result",
    "Latency": "agent.inference.result",
    "Reason": "agent.inference.result",
    "AgentSettings": "agent.settings",
    "__version__": "agent.version",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once: the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
