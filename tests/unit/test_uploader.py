"""The uploader against a scripted ``/fleet/samples`` (httpx MockTransport, a clock the
test moves): what each answer does to the spool, backoff, and the byte budget's
arithmetic shared with telemetry."""

from __future__ import annotations

import gzip
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from agent.device.capture import Capture
from agent.device.uploader import (
    DEFAULT_MESSAGE_BYTES,
    REFUSED_RETRY_S,
    REQUEST_OVERHEAD_BYTES,
    UploadBudget,
    Uploader,
)
from agent.device.wire import WireCounter, count_http
from shared.samples import SampleMeta, decode_upload, encode_upload
from tests.unit.test_agent_core import Clock
from tests.unit.test_audit import observation
from tests.unit.test_capture import capture


class SamplesServer:
    """Answers ``status`` (a queue of them, then 200) and keeps what a 200 accepted."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.retry_after: str | None = None
        self.stored: dict[str, bytes] = {}
        self.batches: list[int] = []
        self.auth: list[str | None] = []
        #: ids the server finds malformed: an upload holding one is a 400
        self.bad: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/fleet/samples"
        self.auth.append(request.headers.get("authorization"))
        body = request.content
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        device, items = decode_upload(
            dict(request.headers), body, max_samples=1000, max_sample_bytes=1 << 20
        )
        assert device == "dev-1"
        self.batches.append(len(items))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200 and any(m.id in self.bad for m, _ in items):
            status = 400
        if status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return httpx.Response(status, json={"error": "scripted"}, headers=headers)
        new = [m.id for m, _ in items if m.id not in self.stored]
        self.stored.update({m.id: p for m, p in items})
        return httpx.Response(200, json={"stored": len(new), "duplicates": len(items) - len(new)})


def setup(
    tmp_path: Path, n: int = 5, **kw: object
) -> tuple[Capture, Uploader, SamplesServer, Clock, WireCounter]:
    c = capture(tmp_path)
    for i in range(n):
        c.observe(observation(cloud=2, x0=10 + i))
    server = SamplesServer()
    http = httpx.Client(transport=httpx.MockTransport(server.handler))
    wire = WireCounter()
    count_http(http, wire, "samples")
    clock = Clock()
    options: dict[str, object] = {"max_batch": 2, "clock": clock, **kw}
    up = Uploader(c, http, "http://cloud.test/", "dev-1", "tok", **options)  # type: ignore[arg-type]
    return c, up, server, clock, wire


def test_batches_are_deleted_only_after_a_200(tmp_path: Path) -> None:
    c, up, server, _, wire = setup(tmp_path)
    assert up.drain() == 5
    assert server.batches == [2, 2, 1] and len(server.stored) == 5
    assert (c.spool.pending, c.uploaded) == (0, 5)
    assert server.auth == ["Bearer tok"] * 3
    assert wire.snapshot()["samples"].sent > 0


def test_5xx_and_network_errors_back_off_exponentially_capped(tmp_path: Path) -> None:
    c, up, server, clock, _ = setup(tmp_path, max_backoff_s=4.0)
    server.statuses = [503, 503, 503, 503]
    waits = []
    for _ in range(4):
        assert up.drain() == 0
        waits.append(up.next_wait_s())
        assert up.upload_once() == 0  # not before the backoff ends: nothing sent
        clock.t += 10.0
    assert [round(w, 2) for w in waits] == [1.01, 2.01, 4.01, 4.01]
    assert len(server.batches) == 4 and c.spool.pending == 5
    assert up.drain() == 5 and up.failures == 0


def test_without_a_token_nothing_is_sent(tmp_path: Path) -> None:
    c, up, server, _, _ = setup(tmp_path)
    up.token = None
    assert up.drain() == 0 and server.batches == [] and c.spool.pending == 5


def test_the_first_backoff_is_capped_too(tmp_path: Path) -> None:
    _, up, server, _, _ = setup(tmp_path, max_backoff_s=0.3)
    server.statuses = [503]
    assert up.drain() == 0 and up.next_wait_s() == pytest.approx(0.31)


def test_a_lost_connection_keeps_the_batch(tmp_path: Path) -> None:
    c, up, server, clock, _ = setup(tmp_path)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    up.http = httpx.Client(transport=httpx.MockTransport(refuse))
    assert up.drain() == 0 and c.spool.pending == 5
    up.http = httpx.Client(transport=httpx.MockTransport(server.handler))
    clock.t += 2.0
    assert up.drain() == 5


def test_429_waits_for_retry_after(tmp_path: Path) -> None:
    _, up, server, clock, _ = setup(tmp_path)
    server.statuses, server.retry_after = [429], "30"
    assert up.drain() == 0
    clock.t += 29.0
    assert up.drain() == 0 and len(server.batches) == 1
    clock.t += 1.5
    assert up.drain() == 5


def test_401_waits_an_hour_then_resumes_once_the_cloud_takes_uploads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c, up, server, clock, _ = setup(tmp_path)
    server.statuses = [401, 403]
    assert up.drain() == 0 and up.forbidden
    clock.t += REFUSED_RETRY_S - 1
    assert up.drain() == 0 and len(server.batches) == 1 and c.spool.pending == 5
    clock.t += 2
    assert up.drain() == 0 and len(server.batches) == 2  # one try an hour, refused again
    clock.t += REFUSED_RETRY_S + 1
    assert up.drain() == 5 and not up.forbidden  # the operator fixed it: no restart needed
    assert c.spool.pending == 0
    assert sum(r.levelname == "ERROR" for r in caplog.records) == 2  # once per message


def test_413_halves_the_batch_then_drops_a_lone_sample(tmp_path: Path) -> None:
    c, up, server, _, _ = setup(tmp_path, n=4, max_batch=4)
    server.statuses = [413, 200, 200]
    assert up.drain() == 4
    assert server.batches == [4, 2, 2] and up.batch == 2
    c.observe(observation(cloud=2, x0=99))
    server.statuses = [413, 413]
    assert up.drain() == 1
    assert (c.rejected, c.spool.pending) == (1, 0)


def test_a_form_the_server_does_not_take_is_dropped_and_counted(tmp_path: Path) -> None:
    c, up, server, _, _ = setup(tmp_path)
    server.statuses = [415]
    assert up.drain() == 5
    assert (c.rejected, c.uploaded, len(server.stored)) == (2, 3, 3)


def test_a_400_splits_the_batch_and_drops_only_the_bad_sample(tmp_path: Path) -> None:
    """One malformed sample must not take the good ones of its batch with it."""
    c, up, server, _, _ = setup(tmp_path, n=6, max_batch=8)
    rows = c.spool.oldest(8)
    bad = rows[4][0]
    server.bad = {bad}
    assert up.drain() == 6
    assert (c.rejected, c.uploaded, c.spool.pending) == (1, 5, 0)
    assert sorted(server.stored) == sorted(r[0] for r in rows if r[0] != bad)
    assert server.batches == [6, 3, 3, 1, 2, 1, 1]  # halves until the bad one is alone
    assert up.batch == 8  # a 400 is about a sample, not the batch's size


def test_an_unreadable_spool_row_is_dropped_not_stalling_uploads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row damaged on disk, or written by an older agent under a looser schema, is
    dropped and counted: it used to raise on every round, and nothing behind it left."""
    c, up, server, _, _ = setup(tmp_path, n=5, max_batch=8)
    rows = c.spool.oldest(8)
    db = sqlite3.connect(str(tmp_path / "samples.db"))
    db.execute("UPDATE samples SET meta=? WHERE id=?", (b'{"id": "x", "kind": "??"', rows[1][0]))
    db.execute("UPDATE samples SET payload=? WHERE id=?", (b"short", rows[3][0]))
    db.commit()
    db.close()
    assert up.drain() == 5
    assert (c.rejected, c.uploaded, c.spool.pending) == (2, 3, 0)
    assert sorted(server.stored) == sorted(rows[i][0] for i in (0, 2, 4))
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1


def test_another_4xx_is_retried_not_dropped(tmp_path: Path) -> None:
    c, up, server, clock, _ = setup(tmp_path)
    server.statuses = [404]
    assert up.drain() == 0 and c.spool.pending == 5 and c.rejected == 0
    clock.t += 5
    assert up.drain() == 5


def test_nothing_leaves_while_capture_is_off(tmp_path: Path) -> None:
    c, up, server, _, _ = setup(tmp_path)
    c.switch.fixed = False
    assert up.drain() == 0 and server.batches == []
    c.switch.fixed = True
    assert up.drain() == 5


# -------------------------------------------------------------------------- budget


class Now:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def test_the_budget_reserves_the_rest_of_the_days_telemetry_first() -> None:
    wire = WireCounter()
    wire.add("births", sent=1000)  # before the budget starts: not today's
    now = Now(datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc))  # 43,200 s to midnight
    sent = [0]
    budget = UploadBudget(1_000_000, wire, 60.0, lambda: sent[0], now)
    # no message yet: the default cost, 720 intervals left
    assert budget.reserve() == pytest.approx(720 * DEFAULT_MESSAGE_BYTES)
    wire.add("telemetry", sent=4800, received=200)
    sent[0] = 10  # 500 bytes a message
    assert budget.message_cost() == 500
    assert budget.reserve() == pytest.approx(720 * 500)
    wire.add("samples", sent=100_000)
    wire.add("downloads", received=5_000_000)  # not budgeted
    assert budget.spent() == 105_000
    assert budget.available() == 1_000_000 - 105_000 - 360_000
    now.t = datetime(2026, 1, 1, 23, 0, tzinfo=timezone.utc)
    assert budget.available() == 1_000_000 - 105_000 - 60 * 500
    now.t = datetime(2026, 1, 2, 0, 0, 1, tzinfo=timezone.utc)  # a new day
    assert budget.spent() == 0
    # a device without telemetry reserves nothing
    assert UploadBudget(1000, wire, 60.0, None, now).available() == 1000


def test_an_upload_the_budget_cannot_pay_for_waits_or_shrinks(tmp_path: Path) -> None:
    class Fixed:
        left = 0

        def available(self) -> int:
            return self.left

    budget = Fixed()
    c, up, server, _, _ = setup(tmp_path, n=4, max_batch=4, budget=budget)
    assert up.drain() == 0 and up.held_budget == 1 and server.batches == []
    items = [(SampleMeta.model_validate_json(m), p) for _, m, p in c.spool.oldest(4)]
    _, body = encode_upload("dev-1", items, token="tok")
    budget.left = (len(body) + REQUEST_OVERHEAD_BYTES) // 2 + 1  # about two of the four
    assert up.upload_once() == 2 and server.batches == [2]
    budget.left = 1_000_000
    assert up.drain() == 2


def test_a_split_batch_does_not_spend_past_the_budget(tmp_path: Path) -> None:
    """A 400's halves are sent only while the budget pays for them."""

    class Left:
        def __init__(self, wire: WireCounter) -> None:
            self.wire, self.limit = wire, 0

        def available(self) -> int:
            return self.limit - self.wire.total(("samples",))

    c, up, server, _, wire = setup(tmp_path, n=4, max_batch=4)
    budget = Left(wire)
    up.budget = budget  # type: ignore[assignment]
    server.bad = {c.spool.oldest(4)[0][0]}
    items = [(SampleMeta.model_validate_json(m), p) for _, m, p in c.spool.oldest(4)]
    _, body = encode_upload("dev-1", items, token="tok")
    budget.limit = len(body) + REQUEST_OVERHEAD_BYTES + 100  # the whole batch, once
    assert up.drain() == 0
    assert server.batches == [4] and up.held_budget == 1 and c.spool.pending == 4
