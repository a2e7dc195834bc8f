"""``POST /fleet/samples`` and the operators' sample routes on a real uvicorn server over a
real fleet store: uploads stored once, every refusal with its status and its count on
``/metrics``, bounded memory for hostile bodies (a gzip bomb, an endless chunked body),
quotas across requests, operators' labels, and the export training reads."""

from __future__ import annotations

import gzip
import http.client
import json
import select
import socket
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from cloud.app import create_app
from cloud.fleet.samples.store import SampleStore
from cloud.settings import CloudSettings
from shared.mqtt import MqttSettings
from shared.samples import (
    Answer,
    SampleMeta,
    decode_features,
    device_token,
    encode_features,
    encode_upload,
    sample_id,
)
from tests.helpers import CLOUD_REPO, closed_port_url, serve_in_thread
from tests.prometheus import sample
from tests.sample_items import feature_sample

FLEET = "samplefleet"
SECRET = "device-secret-for-tests"
OPERATOR = "operator-token"
MAX_UPLOAD = 2 * 1024 * 1024
QUOTA_SAMPLES = 8
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@dataclass
class Cloud:
    url: str
    app: FastAPI
    root: Path
    http: httpx.Client  # with the operator's token

    def upload(
        self, device: str, items: list[tuple[SampleMeta, bytes]], **kw: Any
    ) -> httpx.Response:
        headers, body = encode_upload(device, items, token=device_token(SECRET, FLEET, device))
        headers.update(kw.pop("headers", {}))
        return httpx.post(f"{self.url}/fleet/samples", headers=headers, content=body, **kw)

    def rejected(self, reason: str) -> float:
        text = self.http.get("/metrics").text
        return sample(text, "tandem_samples_rejected_total", fleet=FLEET, reason=reason) or 0.0


def settings_for(tmp_path: Path, **samples: Any) -> CloudSettings:
    return CloudSettings(
        repo=CLOUD_REPO,
        fleet=FLEET,
        state_dir=tmp_path / "cloud",
        mqtt=MqttSettings(url=closed_port_url().replace("http://", "mqtt://")),
        tokens=[SecretStr(OPERATOR)],
        repo_poll_s=0,
        samples=samples,
    )


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    state = tmp_path_factory.mktemp("samples-api")
    settings = settings_for(
        state,
        root=state / "samples",
        device_token_secret=SECRET,
        max_upload_bytes=MAX_UPLOAD,
        max_sample_bytes=4096,
        max_samples_per_upload=16,
        daily_quota_samples=QUOTA_SAMPLES,
    )
    app = create_app(settings)
    with (
        serve_in_thread(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {OPERATOR}"}) as http,
    ):
        yield Cloud(url, app, state / "samples", http)


def item(seed: int, kind: str = "escalation") -> tuple[SampleMeta, bytes]:
    return feature_sample(
        np.random.default_rng(seed).integers(0, 17, 64),
        kind=kind,
        ts=T0,
        edge=Answer(index=2, confidence=0.41),
        cloud=Answer(index=5, confidence=0.97),
        cloud_model="digits-cloud",
        threshold=0.7,
    )


def test_upload_is_stored_once_and_listed(cloud: Cloud) -> None:
    items = [item(i) for i in range(3)]
    first = cloud.upload("dev-happy", items)
    assert first.status_code == 200, first.text
    assert first.json() == {"stored": 3, "duplicates": 0}
    again = cloud.upload("dev-happy", items)  # an answer lost, the upload retried
    assert again.json() == {"stored": 0, "duplicates": 3}
    page = cloud.http.get("/fleet/samples", params={"device": "dev-happy"}).json()
    assert sorted(s["id"] for s in page["samples"]) == sorted(m.id for m, _ in items)
    assert page["next"] is None
    row = page["samples"][0]
    assert (row["kind"], row["label_source"], row["cloud_index"]) == ("escalation", "cloud", 5)
    # an uncompressed upload is as good
    plain_headers, body = encode_upload(
        "dev-happy", [item(3)], gzip=False, token=device_token(SECRET, FLEET, "dev-happy")
    )
    plain = httpx.post(f"{cloud.url}/fleet/samples", headers=plain_headers, content=body)
    assert plain.json() == {"stored": 1, "duplicates": 0}
    text = cloud.http.get("/metrics").text
    assert (sample(text, "tandem_samples_received_total", fleet=FLEET, outcome="stored") or 0) >= 4
    summary = cloud.http.get("/fleet/samples/summary").json()
    (digits,) = [m for m in summary["models"] if m["model"] == "digits"]
    assert digits["by_device"]["dev-happy"] == 4


def _headers(device: str, **changes: str | None) -> tuple[dict[str, str], bytes]:
    headers, body = encode_upload(device, [item(20)], token=device_token(SECRET, FLEET, device))
    for name, value in changes.items():
        key = name.replace("_", "-")
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    return headers, body


def _raw(doc: bytes, payloads: bytes = b"") -> bytes:
    return gzip.compress(doc + payloads)


REFUSALS: dict[str, tuple[int, str, Any]] = {
    # name: (status, reason, request maker -> (headers, body))
    "no token": (401, "unauthenticated", lambda: _headers("dev-r", Authorization=None)),
    "bad token": (
        401,
        "unauthenticated",
        lambda: _headers("dev-r", Authorization="Bearer not-a-token"),
    ),
    "operator token as device token": (
        401,
        "unauthenticated",
        lambda: _headers("dev-r", Authorization=f"Bearer {OPERATOR}"),
    ),
    "no device header": (401, "unauthenticated", lambda: _headers("dev-r", Tandem_Device=None)),
    "token of another device": (
        401,
        "unauthenticated",
        lambda: _headers("dev-r", Tandem_Device="dev-other"),
    ),
    "body for another device": (403, "wrong_device", lambda: _for_another()),
    "wrong content type": (
        415,
        "media_type",
        lambda: _headers("dev-r", Content_Type="application/json"),
    ),
    "unknown content encoding": (
        415,
        "media_type",
        lambda: _headers("dev-r", Content_Encoding="br"),
    ),
    "broken gzip": (
        415,
        "media_type",
        lambda: (_headers("dev-r")[0], _headers("dev-r")[1][:-12]),
    ),
    "header length not a number": (
        400,
        "malformed",
        lambda: _headers("dev-r", Tandem_Header_Length="12abc"),
    ),
    "header length past the body": (
        400,
        "malformed",
        lambda: _headers("dev-r", Tandem_Header_Length="99999"),
    ),
    "header not JSON": (
        400,
        "malformed",
        lambda: (_headers("dev-r")[0] | {"Tandem-Header-Length": "5"}, _raw(b"\xff\xfe{[x")),
    ),
    "deeply nested header": (
        400,
        "malformed",
        lambda: (
            _headers("dev-r")[0] | {"Tandem-Header-Length": "100000"},
            _raw(b"[" * 100_000),
        ),
    ),
    "id not the payload's hash": (400, "malformed", lambda: _tampered_id()),
    "too many samples": (413, "too_large", lambda: _many(17)),
    "sample over its cap": (413, "too_large", lambda: _big_sample()),
    "declared body over the cap": (
        413,
        "too_large",
        lambda: (_headers("dev-r")[0] | {"Content-Encoding": "identity"}, b"x" * (MAX_UPLOAD + 1)),
    ),
}


def _for_another() -> tuple[dict[str, str], bytes]:
    """dev-r's token and Tandem-Device, a body whose header says dev-other."""
    headers, body = encode_upload("dev-other", [item(20)])
    headers["Tandem-Device"] = "dev-r"
    headers["Authorization"] = f"Bearer {device_token(SECRET, FLEET, 'dev-r')}"
    return headers, body


def _tampered_id() -> tuple[dict[str, str], bytes]:
    meta, payload = item(21)
    forged = meta.model_copy(update={"id": sample_id(b"other bytes")})
    token = device_token(SECRET, FLEET, "dev-r")
    return encode_upload("dev-r", [(forged, payload)], token=token, ids=True)


def _many(n: int) -> tuple[dict[str, str], bytes]:
    items = [item(100 + i) for i in range(n)]
    return encode_upload("dev-r", items, token=device_token(SECRET, FLEET, "dev-r"))


def _big_sample() -> tuple[dict[str, str], bytes]:
    x = np.full(5000, 0.5, dtype=np.float32)  # 20,000 bytes > 4096
    encoding, shape, payload = encode_features(x)
    meta, _ = item(0)
    big = meta.model_copy(
        update={"id": sample_id(payload), "encoding": encoding, "shape": shape, "size": 20000}
    )
    return encode_upload("dev-r", [(big, payload)], token=device_token(SECRET, FLEET, "dev-r"))


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_refusal_has_its_status_and_is_counted(cloud: Cloud, name: str) -> None:
    status, reason, make = REFUSALS[name]
    headers, body = make()
    before = cloud.rejected(reason)
    r = httpx.post(f"{cloud.url}/fleet/samples", headers=headers, content=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]
    assert cloud.rejected(reason) == before + 1
    # nothing of a refused upload is stored
    assert cloud.http.get("/fleet/samples", params={"device": "dev-r"}).json()["samples"] == []


def test_uploads_are_off_without_a_secret(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path))
    with serve_in_thread(app) as url:
        headers, body = encode_upload(
            "dev-1", [item(1)], token=device_token(SECRET, FLEET, "dev-1")
        )
        r = httpx.post(f"{url}/fleet/samples", headers=headers, content=body)
        assert r.status_code == 403
        assert "device_token_secret" in r.json()["error"]
        metrics = httpx.get(f"{url}/metrics").text
        assert sample(metrics, "tandem_samples_rejected_total", fleet=FLEET, reason="disabled") == 1


def test_tokens_do_not_cross_between_devices_and_operators(cloud: Cloud) -> None:
    device = {"Authorization": f"Bearer {device_token(SECRET, FLEET, 'dev-x')}"}
    for path in ("/fleet/samples", "/fleet/samples/summary", "/fleet/devices"):
        assert httpx.get(f"{cloud.url}{path}", headers=device).status_code == 401
        assert httpx.get(f"{cloud.url}{path}").status_code == 401
        assert cloud.http.get(path).status_code == 200  # the positive control
    put = httpx.put(
        f"{cloud.url}/fleet/samples/dev-x/{'a' * 64}/label", headers=device, json={"label": 1}
    )
    assert put.status_code == 401


def test_quota_holds_across_requests(cloud: Cloud) -> None:
    first = [item(200 + i) for i in range(5)]
    assert cloud.upload("dev-quota", first).json() == {"stored": 5, "duplicates": 0}
    before = cloud.rejected("quota")
    over = cloud.upload("dev-quota", [item(300 + i) for i in range(4)])  # 9 > 8 a day
    assert over.status_code == 429, over.text
    assert 1 <= int(over.headers["Retry-After"]) <= 86400
    assert cloud.rejected("quota") == before + 1
    # what fits still goes; duplicates are free
    assert cloud.upload("dev-quota", [*first, item(300)]).json() == {"stored": 1, "duplicates": 5}
    # the quota is the device's: another device is not held back
    assert cloud.upload("dev-quota-2", [item(300 + i) for i in range(4)]).status_code == 200
    listed = cloud.http.get("/fleet/samples", params={"device": "dev-quota"}).json()["samples"]
    assert len(listed) == 6


def test_operator_label_correction(cloud: Cloud) -> None:
    meta, _ = item(400)
    assert cloud.upload("dev-label", [(meta, item(400)[1])]).status_code == 200
    path = f"/fleet/samples/dev-label/{meta.id}/label"
    r = cloud.http.put(path, json={"label": 3})
    assert r.status_code == 200 and r.json()["label_source"] == "operator"
    (row,) = cloud.http.get("/fleet/samples", params={"device": "dev-label"}).json()["samples"]
    assert (row["label"], row["label_source"], row["cloud_index"]) == (3, "operator", 5)
    assert cloud.http.put(path, json={"label": -1}).status_code == 400
    assert cloud.http.put(path, json={"label": 1, "extra": 2}).status_code == 400
    missing = cloud.http.put(f"/fleet/samples/dev-label/{'0' * 64}/label", json={"label": 3})
    assert missing.status_code == 404
    assert cloud.http.put("/fleet/samples/../x/label", json={"label": 3}).status_code == 404
    labelled = cloud.http.get("/fleet/samples", params={"label_source": "operator"}).json()
    assert [s["id"] for s in labelled["samples"]] == [meta.id]


def test_export_round_trip(cloud: Cloud) -> None:
    xs = [np.random.default_rng(i).integers(0, 17, 64) for i in range(4)]
    floats = np.random.default_rng(9).normal(size=(2, 8)).astype(np.float32)
    items = []
    for x in [*xs, *floats]:
        encoding, shape, payload = encode_features(x)
        meta, _ = item(0)
        items.append(
            (
                meta.model_copy(
                    update={
                        "id": sample_id(payload),
                        "encoding": encoding,
                        "shape": shape,
                        "size": len(payload),
                        "model": "roundtrip",
                    }
                ),
                payload,
            )
        )
    assert cloud.upload("dev-export", items).json() == {"stored": 6, "duplicates": 0}
    # the bytes as stored
    got = cloud.http.get(f"/fleet/samples/dev-export/{items[0][0].id}")
    assert got.status_code == 200 and got.content == items[0][1]
    assert got.headers["Tandem-Sample-Encoding"] == "uint8"
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    assert cloud.http.get(f"/fleet/samples/dev-export/{'1' * 64}").status_code == 404
    store = SampleStore(cloud.app.state.store, cloud.root)
    exported = {s.id: s for s in store.export(FLEET, "roundtrip")}
    assert len(exported) == 6
    for meta, payload in items:
        s = exported[meta.id]
        assert s.features is not None
        assert np.array_equal(s.features, decode_features(meta, payload))
        assert (s.label, s.label_source, s.device) == (5, "cloud", "dev-export")
    assert np.array_equal(exported[items[0][0].id].features, xs[0])  # type: ignore[arg-type]
    assert np.array_equal(exported[items[-1][0].id].features, floats[-1])  # type: ignore[arg-type]


# --- memory of hostile requests ----------------------------------------------------------

BOMB_BYTES = 1024**3


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """1 GiB of zeros gzipped (about 1 MB): under the body cap, 500 times it inflated."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1024 * 1024)
    parts = [z.compress(chunk) for _ in range(BOMB_BYTES // len(chunk))]
    parts.append(z.flush())
    bomb = b"".join(parts)
    assert len(bomb) < MAX_UPLOAD
    return bomb


def _peak_during(run: Any) -> int:
    """Peak bytes traced (this process: the server runs in its thread) while ``run`` runs."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def test_a_gzip_bomb_is_413_without_the_memory(cloud: Cloud, gzip_bomb: bytes) -> None:
    headers, _ = _headers("dev-bomb")
    before = cloud.rejected("too_large")
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(httpx.post(f"{cloud.url}/fleet/samples", headers=headers, content=gzip_bomb))

    peak = _peak_during(send)
    assert answers[0].status_code == 413, answers[0].text
    assert "decompressed" in answers[0].json()["error"]
    assert cloud.rejected("too_large") == before + 1
    # the bomb itself (1 MB) is held by the client here; the server's share is its cap
    assert peak < 20 * 1024 * 1024, f"{peak / 1e6:.1f} MB traced for a 1 GiB bomb"


def test_an_endless_chunked_body_is_cut_at_the_cap(cloud: Cloud) -> None:
    """1 GiB offered chunk by chunk with no length: the server answers 413 once the cap is
    passed, and what it held meanwhile stays bounded."""
    headers, _ = _headers("dev-huge", Content_Encoding=None)
    parts = urlsplit(cloud.url)
    answer: list[bytes] = []
    sent: list[int] = [0]

    def send() -> None:
        chunk = b"x" * 65536
        framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        with socket.create_connection((parts.hostname, parts.port), timeout=60) as s:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            s.sendall(
                f"POST /fleet/samples HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                f"{head}\r\n".encode()
            )
            try:
                while sent[0] < BOMB_BYTES:
                    if select.select([s], [], [], 0)[0]:
                        break  # the server has answered
                    s.sendall(framed)
                    sent[0] += len(chunk)
                else:
                    s.sendall(b"0\r\n\r\n")  # the end: a server that read it all answers now
            except (BrokenPipeError, ConnectionResetError):
                pass
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    more = s.recv(65536)
                    if not more:
                        break
                    data += more
            except ConnectionResetError:
                pass
            answer.append(data)

    before = cloud.rejected("too_large")
    peak = _peak_during(send)
    assert cloud.rejected("too_large") == before + 1
    assert sent[0] < BOMB_BYTES  # it stopped reading long before the end
    if answer[0]:  # the answer, unless the connection was reset under it
        assert answer[0].startswith(b"HTTP/1.1 413"), answer[0][:200]
    assert peak < 20 * 1024 * 1024, f"{peak / 1e6:.1f} MB traced for {sent[0]} bytes sent"


def test_a_declared_huge_body_is_refused_unread(cloud: Cloud) -> None:
    headers, _ = _headers("dev-huge", Content_Encoding=None)
    parts = urlsplit(cloud.url)
    with socket.create_connection((parts.hostname, parts.port)) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(
            f"POST /fleet/samples HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n"
            f"{head}\r\n".encode()
        )
        s.settimeout(10)
        response = http.client.HTTPResponse(s)
        response.begin()
        assert response.status == 413
        assert json.loads(response.read())["error"]


def test_a_batch_over_the_whole_daily_quota_is_413_not_429(cloud: Cloud) -> None:
    """429 would make the device wait until midnight and send the same batch again, for
    ever: a batch no day's quota can hold is 413, which the uploader answers by halving."""
    before = cloud.rejected("quota")
    batch = [item(400 + i) for i in range(QUOTA_SAMPLES + 1)]
    over = cloud.upload("dev-big-batch", batch)
    assert over.status_code == 413, over.text
    assert "Retry-After" not in over.headers and "on their own" in over.json()["error"]
    assert cloud.rejected("quota") == before + 1
    half = batch[: len(batch) // 2]
    assert cloud.upload("dev-big-batch", half).json() == {"stored": len(half), "duplicates": 0}


def test_a_device_whose_batch_passes_its_quota_still_uploads_what_a_day_holds(
    cloud: Cloud, tmp_path: Path
) -> None:
    """The real uploader against the real route, a batch (16) larger than the device's
    daily quota (8): it shrinks on the 413 until a batch fits, stores what the day holds,
    then waits on the 429 with the rest spooled (it used to wait, then resend the same
    batch, for ever)."""
    from agent.device.uploader import Uploader
    from tests.unit.test_agent_core import Clock as MonoClock
    from tests.unit.test_audit import observation
    from tests.unit.test_capture import capture

    c = capture(tmp_path)
    for i in range(12):
        c.observe(observation(cloud=2, x0=500 + i))
    device = "dev-small-quota"
    with httpx.Client() as http:
        up = Uploader(
            c,
            http,
            cloud.url,
            device,
            device_token(SECRET, FLEET, device),
            max_batch=16,
            clock=MonoClock(),
        )
        # 12 > 8: 413, halves of 6; the first stored, the second would pass the day's 8: 429
        assert up.drain() == 6
        assert up.drain() == 0  # waiting for Retry-After, not resending
    assert (c.uploaded, c.rejected, c.spool.pending, up.batch) == (6, 0, 6, 6)
    listed = cloud.http.get("/fleet/samples", params={"device": device}).json()["samples"]
    assert len(listed) == 6
