"""The agent's errors, the ``AgentError`` branch of the tree ``shared/errors.py`` draws.
Backend, cloud and download failures are translated into these where they enter.

Cloud errors never reach a caller of ``Agent.infer``: the routing code turns them into a
local answer with the error's ``reason``. They exist so the cloud client, the breaker and
telemetry can tell a timeout from a dead server from a misconfigured model name. Download
and update errors end an update job (``FAILED``, ``REJECTED``) with their message as its
reason; none of them stops the agent.
"""

from __future__ import annotations

from agent.inference.result import Reason
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
    reason = Reason.CLOUD_ERROR


class CloudTimeoutError(CloudError):
    http_status = 504
    reason = Reason.CLOUD_TIMEOUT


class CloudUnavailableError(CloudError):
    """Connection refused or reset, or the server said 5xx (busy, not ready)."""

    http_status = 503
    reason = Reason.CLOUD_UNAVAILABLE


class CloudRefusedError(CloudError):
    """The cloud answered 4xx (not 429): it is up, and refuses this request (unknown model,
    bad token, a request it cannot take). Not a reason to stop asking it: it does not open
    the breaker, and the agent logs it at WARNING, since it is usually a configuration error
    only an operator can fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"cloud refused the request ({status}): {detail}")
        self.status = status
        self.detail = detail


class DownloadError(AgentError):
    """The artifact could not be fetched (after retries, or in time), or the disk is too
    full."""


class IncompleteDownloadError(DownloadError):
    """One try ended short (the connection dropped, a range the server could not serve):
    the downloader tries again, resuming, while tries and the deadline last."""


class DigestError(AgentError):
    """All bytes arrived but they are not the manifest's: tampered or corrupted."""


class UpdateRejectedError(AgentError):
    """This device may not install a manifest (unsigned, expired, not newer, incompatible):
    ``REJECTED`` with ``reason``, nothing downloaded. ``verified`` is False when the
    signature did not verify (or no trust store is set), so the manifest may be forged."""

    http_status = 422

    def __init__(self, reason: str, *, verified: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.verified = verified
