"""The agent's client for the cloud fallback: any Open Inference Protocol (KServe v2) server.

It speaks only the standard (plus Triton's binary tensor extension, which Triton, KServe's
servers and MLServer read), so the cloud can be ``tandem-cloud``, Triton, KServe or MLServer.
One ``httpx.Client`` keeps connections alive across requests; every call gets a timeout cut
from the request's remaining deadline. Failures come out as ``CloudError`` subclasses that
say whether it was a timeout, an unavailable server, a refusal of that request (4xx), or a
protocol/configuration problem.

Not every OIP server reads the binary extension (MLServer and some KServe runtimes answer a
binary body with a 500), so with ``binary="auto"`` the client sends JSON until the server's
own ``GET /v2`` lists ``binary_tensor_data``. That question is asked from a background
thread, retried with backoff while the cloud is unreachable: a device must start, and
serve, with no network at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np
from pydantic import ValidationError

from agent.errors import CloudError, CloudRefusedError, CloudTimeoutError, CloudUnavailableError
from shared.errors import InvalidRequestError
from shared.manifest import CloudTarget
from shared.oip.codec import decode_response, encode_request, parse_header_length
from shared.oip.types import InferRequest, InferTensor, RequestedOutput, ServerMetadata
from shared.tls import TlsFiles

log = logging.getLogger(__name__)

#: The extension a server must list in ``GET /v2`` before ``binary="auto"`` uses it.
BINARY_EXTENSION = "binary_tensor_data"


@dataclass(frozen=True, slots=True)
class CloudAnswer:
    output: np.ndarray
    model: str
    version: str | None

    @property
    def model_ref(self) -> str:
        """``model:version`` as results report it (just ``model`` without a version)."""
        return f"{self.model}:{self.version}" if self.version else self.model


@dataclass(frozen=True, slots=True)
class CloudTensors:
    """A cloud answer of any model: its outputs by name."""

    outputs: dict[str, np.ndarray]
    model: str
    version: str | None

    @property
    def model_ref(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model


class CloudClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        binary: bool | Literal["auto"] = True,
        connect_timeout_s: float = 1.0,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
        probe_backoff_s: tuple[float, float] = (0.5, 60.0),
        event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        #: What requests are sent as now; with ``binary="auto"``, False until the server
        #: says it reads binary tensors.
        self.binary = binary is True
        self.connect_timeout_s = connect_timeout_s
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            # the cloud's private CA and this device's certificate; None: the usual CAs
            verify=tls.context() if tls is not None else True,
        )
        if event_hooks:  # set before the probe's first request (the device counts bytes)
            self._http.event_hooks = {k: list(v) for k, v in event_hooks.items()}
        self._closed = threading.Event()
        #: Set once the server's extensions are known (with ``binary="auto"`` only).
        self.probed = threading.Event()
        self._probe: threading.Thread | None = None
        if binary == "auto":
            self._probe = threading.Thread(
                target=self._probe_extensions,
                args=probe_backoff_s,
                name="tandem-cloud-probe",
                daemon=True,
            )
            self._probe.start()

    def _probe_extensions(self, first_wait_s: float, max_wait_s: float) -> None:
        """Ask ``GET /v2`` until the server answers, then choose binary or JSON for good."""
        wait = first_wait_s
        timeout = httpx.Timeout(5.0, connect=self.connect_timeout_s)
        while not self._closed.is_set():
            try:
                reply = self._http.get("/v2", timeout=timeout)
            except Exception as exc:  # httpx's errors, or the client closed under it
                if self._closed.is_set():
                    return
                log.debug("cloud metadata not reachable yet (%r); retry in %.1f s", exc, wait)
            else:
                if reply.status_code == 200 or (
                    400 <= reply.status_code < 500 and reply.status_code != 429
                ):
                    self._choose_encoding(reply)
                    return
                log.debug("cloud metadata answered %d; retry in %.1f s", reply.status_code, wait)
            if self._closed.wait(wait):
                return
            wait = min(wait * 2.0, max_wait_s)

    def _choose_encoding(self, reply: httpx.Response) -> None:
        extensions: list[str] = []
        if reply.status_code == 200:
            try:
                meta = ServerMetadata.model_validate_json(reply.content)
            except ValidationError:
                log.warning("cloud's GET /v2 is not OIP server metadata; sending JSON tensors")
            else:
                extensions = meta.extensions
        else:
            log.warning(
                "cloud answered %d to GET /v2 (%s); sending JSON tensors",
                reply.status_code,
                _error_message(reply),
            )
        self.binary = BINARY_EXTENSION in extensions
        if self.binary:
            log.info("cloud reads %s: sending binary tensors", BINARY_EXTENSION)
        elif reply.status_code == 200:
            log.info("cloud does not list %s: sending JSON tensors", BINARY_EXTENSION)
        self.probed.set()

    @staticmethod
    def infer_path(model: str, version: str | None) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        if version:
            path += f"/versions/{quote(version, safe='')}"
        return path + "/infer"

    def infer(self, x: np.ndarray, target: CloudTarget, timeout_s: float) -> CloudAnswer:
        """Send ``x`` (preprocessed float32, ``[batch, features]``) to ``target``'s model."""
        inputs = [InferTensor(name=target.input, datatype="FP32", data=x)]
        answer = self.infer_tensors(inputs, [target.output], target, timeout_s)
        output = answer.outputs[target.output]
        if output.shape != (x.shape[0], output.shape[-1]) or output.dtype.kind != "f":
            raise CloudError(f"cloud output has shape {output.shape} and dtype {output.dtype}")
        return CloudAnswer(
            output=output.astype(np.float32, copy=False),
            model=answer.model,
            version=answer.version,
        )

    def infer_tensors(
        self,
        inputs: list[InferTensor],
        outputs: list[str],
        target: CloudTarget,
        timeout_s: float,
    ) -> CloudTensors:
        """Any model: ``inputs`` to ``target``'s model, the named ``outputs`` back (all of
        them present, or ``CloudError``)."""
        if timeout_s <= 0:
            raise CloudTimeoutError("no time left for the cloud")
        binary = self.binary
        request = InferRequest(
            inputs=inputs,
            outputs=[RequestedOutput(name=name, binary_data=binary) for name in outputs],
        )
        # an encoded image is not text: JSON cannot carry it, so it goes binary even to a
        # server not known to read that (one that does not answers 4xx: a local answer)
        binary_in = binary or any(t.datatype == "BYTES" for t in inputs)
        body, headers = encode_request(request, binary_inputs=binary_in)
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, self.connect_timeout_s))
        try:
            reply = self._http.post(
                self.infer_path(target.model, target.version),
                content=body,
                headers=headers,
                timeout=timeout,
            )
        except httpx.TimeoutException as exc:
            raise CloudTimeoutError(
                f"cloud did not answer within {timeout_s * 1000:.0f} ms"
            ) from exc
        except httpx.TransportError as exc:
            raise CloudUnavailableError(f"cloud unreachable: {exc!r}") from exc
        if reply.status_code != 200:
            message = _error_message(reply)
            if reply.status_code >= 500 or reply.status_code == 429:
                raise CloudUnavailableError(f"cloud answered {reply.status_code}: {message}")
            if reply.status_code >= 400:
                raise CloudRefusedError(reply.status_code, message)
            raise CloudError(f"cloud answered {reply.status_code}: {message}")
        try:
            response = decode_response(reply.content, parse_header_length(reply.headers))
            got = {name: response.output(name).data for name in outputs}
        except InvalidRequestError as exc:
            raise CloudError(f"cloud response is not valid OIP: {exc.message}") from exc
        return CloudTensors(got, response.model_name, response.model_version)

    def close(self) -> None:
        self._closed.set()
        self._http.close()
        if self._probe is not None:  # a daemon: not waited for past a GET under way
            self._probe.join(timeout=1.0)


def _error_message(reply: httpx.Response) -> str:
    try:
        doc = reply.json()
    except ValueError:
        return reply.text[:200]
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) else reply.text[:200]
