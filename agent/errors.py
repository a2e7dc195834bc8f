"""The agent's errors. Backend and cloud failures are translated into these where they enter.

Cloud errors never reach a caller of ``Agent.infer``: the routing code turns them into a
local answer with the error's ``reason``. They exist so the cloud client, the breaker and
telemetry can tell a timeout from a dead server from a misconfigured model name.
"""

from __future__ import annotations

from shared.errors import TandemError


class AgentError(TandemError):
    """Base of the agent's own errors."""


class RuntimeMissingError(AgentError):
    """No inference runtime for the model's format is installed; the message says which."""


class ModelLoadError(AgentError):
    """A model file could not be loaded, or does not match its manifest."""


class BackendError(AgentError):
    """The interpreter failed while running a request."""


class CloudError(AgentError):
    """The cloud could not answer. ``reason`` is what the result and telemetry report."""

    http_status = 502
    reason = "cloud_error"


class CloudTimeoutError(CloudError):
    http_status = 504
    reason = "cloud_timeout"


class CloudUnavailableError(CloudError):
    """Connection refused or reset, or the server said 5xx (busy, not ready)."""

    http_status = 503
    reason = "cloud_unavailable"
