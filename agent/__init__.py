"""Tandem's edge agent: local TFLite inference with escalation to a cloud OIP endpoint.

Importing ``agent`` loads NumPy, pydantic and httpx, nothing heavier: runtimes are imported
when a model is loaded, web frameworks only by ``tandem-agent serve``.
"""

from agent.inference.core import Agent
from agent.inference.result import InferenceResult, Latency, Reason
from agent.settings import AgentSettings
from agent.version import __version__

__all__ = ["Agent", "AgentSettings", "InferenceResult", "Latency", "Reason", "__version__"]
