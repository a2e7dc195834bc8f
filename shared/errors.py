"""The typed errors every Tandem package raises, each with the HTTP status it maps to.

One tree for the whole project, drawn here once: ``agent`` and ``cloud`` subclass these
where they need more detail (the module is named where a branch starts; below it, the same
module), and each transport (the two OIP endpoints) has one handler that turns any
``TandemError`` into ``{"error": message}`` with ``http_status``. Anything that is not a
``TandemError`` is a bug and becomes a 500. ``tests/unit/test_errors.py`` holds the drawing
to the code: every error class, its parent and its status.

    TandemError (500)
    ├── InvalidRequestError (400)
    ├── ModelNotFoundError (404)
    ├── PayloadTooLargeError (413)
    ├── UnsupportedMediaTypeError (415)
    ├── ModelNotReadyError (503)
    ├── ServerBusyError (503)
    ├── ContractError (500)
    ├── SignatureError (400)                    shared.signing
    ├── KeyFileError (500)                      shared.signing
    ├── SettingsError (500)                     shared.settings_files
    ├── MqttError (500)                         shared.mqtt
    ├── RolloutError (500)                      cloud.fleet.rollout
    ├── LeaseLostError (500)                    cloud.fleet.lease
    └── AgentError (500)                        agent.errors
        ├── RuntimeMissingError (500)
        ├── ModelLoadError (500)
        ├── BackendError (500)
        ├── CloudError (502)
        │   ├── CloudTimeoutError (504)
        │   ├── CloudUnavailableError (503)
        │   └── CloudRefusedError (502)
        ├── DownloadError (500)
        │   └── IncompleteDownloadError (500)
        ├── DigestError (500)
        └── UpdateRejectedError (422)

A 500 is Tandem's own side failing (a model, a file, a broker); a 502/503/504 is a server
behind it (the cloud, as the agent sees it); a 4xx is the caller's request, or for
``UpdateRejectedError`` a manifest this device will not install.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base of every error Tandem raises on purpose."""

    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(TandemError):
    """The caller sent something malformed: bad JSON, wrong shape, wrong datatype, ..."""

    http_status = 400


class ModelNotFoundError(TandemError):
    """The named model or version does not exist here."""

    http_status = 404


class PayloadTooLargeError(TandemError):
    """The body is larger than the server accepts."""

    http_status = 413


class UnsupportedMediaTypeError(TandemError):
    """A content encoding the server cannot read."""

    http_status = 415


class ModelNotReadyError(TandemError):
    """The model exists but cannot serve right now (failed to load, unloading)."""

    http_status = 503


class ServerBusyError(TandemError):
    """The server refuses work it could not finish in time (full queue)."""

    http_status = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ContractError(TandemError):
    """A model file does not match the input/output contract it was shipped with."""

    http_status = 500
