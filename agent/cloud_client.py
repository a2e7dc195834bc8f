"""The agent's client for the cloud fallback: any Open Inference Protocol (KServe v2) server.

It speaks only the standard (plus Triton's binary tensor extension, which Triton, KServe's
servers and MLServer read), so the cloud can be ``tandem-cloud``, Triton, KServe or MLServer.
One ``httpx.Client`` keeps connections alive across requests; every call gets a timeout cut
from the request's remaining deadline. Failures come out as ``CloudError`` subclasses that
say whether it was a timeout, an unavailable server, or a protocol/configuration problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import httpx
import numpy as np

from agent.errors import CloudError, CloudTimeoutError, CloudUnavailableError
from shared.errors import InvalidRequestError
from shared.manifest import CloudTarget
from shared.oip import InferRequest, InferTensor, RequestedOutput
from shared.oip_codec import decode_response, encode_request, parse_header_length


@dataclass(frozen=True, slots=True)
class CloudAnswer:
    output: np.ndarray
    model: str
    version: str | None


class CloudClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        binary: bool = True,
        connect_timeout_s: float = 1.0,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.binary = binary
        self.connect_timeout_s = connect_timeout_s
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    @staticmethod
    def infer_path(model: str, version: str | None) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        if version:
            path += f"/versions/{quote(version, safe='')}"
        return path + "/infer"

    def infer(self, x: np.ndarray, target: CloudTarget, timeout_s: float) -> CloudAnswer:
        """Send ``x`` (preprocessed float32, ``[batch, features]``) to ``target``'s model."""
        if timeout_s <= 0:
            raise CloudTimeoutError("no time left for the cloud")
        request = InferRequest(
            inputs=[InferTensor(name=target.input, datatype="FP32", data=x)],
            outputs=[RequestedOutput(name=target.output, binary_data=self.binary)],
        )
        body, headers = encode_request(request, binary_inputs=self.binary)
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
            raise CloudError(f"cloud refused the request ({reply.status_code}): {message}")
        try:
            response = decode_response(reply.content, parse_header_length(reply.headers))
            output = response.output(target.output).data
        except InvalidRequestError as exc:
            raise CloudError(f"cloud response is not valid OIP: {exc.message}") from exc
        if output.shape != (x.shape[0], output.shape[-1]) or output.dtype.kind != "f":
            raise CloudError(f"cloud output has shape {output.shape} and dtype {output.dtype}")
        return CloudAnswer(
            output=output.astype(np.float32, copy=False),
            model=response.model_name,
            version=response.model_version,
        )

    def close(self) -> None:
        self._http.close()


def _error_message(reply: httpx.Response) -> str:
    try:
        doc = reply.json()
    except ValueError:
        return reply.text[:200]
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) else reply.text[:200]
