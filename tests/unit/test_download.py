"""The downloader against scripted HTTP (httpx MockTransport): resume, caps, digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from agent.device.download import Downloader, download_client, etag_file
from agent.device.store import ModelStore
from agent.errors import DigestError, DownloadError
from agent.settings import DownloadSettings
from shared.manifest import Manifest
from tests.helpers import EDGE_INT8

BLOB = bytes(range(256)) * 40  # 10 KiB
SHA = hashlib.sha256(BLOB).hexdigest()


class Breaking(httpx.SyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield self.data
        raise httpx.ReadError("link dropped")


def downloader(handler) -> Downloader:  # type: ignore[no-untyped-def]
    return Downloader(
        httpx.Client(transport=httpx.MockTransport(handler)),
        DownloadSettings(backoff_s=0, attempts=3),
        sleep=lambda s: None,
    )


def test_resumes_with_range_after_a_break(tmp_path: Path) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("range"))
        if len(seen) == 1:
            return httpx.Response(200, stream=Breaking(BLOB[:4000]), headers={"etag": '"x"'})
        start = int(request.headers["range"].split("=")[1].rstrip("-"))
        assert request.headers["if-range"] == '"x"'
        return httpx.Response(206, content=BLOB[start:])

    d = downloader(handler)
    out = d.fetch("http://r/a", tmp_path / "a.part", len(BLOB), SHA)
    assert out.read_bytes() == BLOB and seen == [None, "bytes=4000-"] and d.resumed == 1


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path) -> None:
    (tmp_path / "a.part").write_bytes(BLOB[:100])
    d = downloader(lambda r: httpx.Response(200, content=BLOB))
    assert d.fetch("http://r/a", tmp_path / "a.part", len(BLOB), SHA).read_bytes() == BLOB


def test_more_bytes_than_the_manifest_says_is_refused(tmp_path: Path) -> None:
    d = downloader(lambda r: httpx.Response(200, content=BLOB + b"extra"))
    with pytest.raises(DownloadError, match="larger than"):
        d.fetch("http://r/a", tmp_path / "a.part", len(BLOB), SHA)


def test_wrong_bytes_fail_the_digest_and_are_deleted(tmp_path: Path) -> None:
    d = downloader(lambda r: httpx.Response(200, content=bytes(len(BLOB))))
    with pytest.raises(DigestError):
        d.fetch("http://r/a", tmp_path / "a.part", len(BLOB), SHA)
    assert not (tmp_path / "a.part").exists()


def test_gives_up_after_its_attempts(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down")

    with pytest.raises(DownloadError, match="after 3 tries"):
        downloader(handler).fetch("http://r/a", tmp_path / "a.part", len(BLOB), SHA)
    d = downloader(lambda r: httpx.Response(404))
    with pytest.raises(DownloadError):
        d.fetch("http://r/a", tmp_path / "b.part", len(BLOB), SHA)


def test_checks_disk_space_first(tmp_path: Path) -> None:
    d = downloader(lambda r: httpx.Response(200, content=BLOB))
    with pytest.raises(DownloadError, match="disk space"):
        d.fetch("http://r/a", tmp_path / "a.part", 10**15, SHA)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class Trickle(httpx.SyncByteStream):
    """One byte per chunk, each one second later on the fake clock."""

    def __init__(self, data: bytes, clock: FakeClock) -> None:
        self.data, self.clock = data, clock

    def __iter__(self):  # type: ignore[no-untyped-def]
        for b in self.data:
            self.clock.now += 1.0
            yield bytes([b])


def timed(handler, clock: FakeClock, **settings: object) -> Downloader:  # type: ignore[no-untyped-def]
    return Downloader(
        httpx.Client(transport=httpx.MockTransport(handler)),
        DownloadSettings(**{"backoff_s": 1.0, "attempts": 50, "deadline_s": 10.0, **settings}),
        sleep=clock.sleep,
        clock=clock,
    )


def test_a_trickle_ends_at_the_deadline_keeping_its_bytes(tmp_path: Path) -> None:
    clock = FakeClock()
    d = timed(lambda r: httpx.Response(200, stream=Trickle(BLOB, clock)), clock)
    with pytest.raises(DownloadError, match=r"within the 10 s deadline \(10 of 10240 bytes\)"):
        d.fetch("http://r/a", tmp_path / "a.part", len(BLOB), SHA)
    assert (tmp_path / "a.part").read_bytes() == BLOB[:10]  # resumable later


def test_the_deadline_covers_every_attempt(tmp_path: Path) -> None:
    clock = FakeClock()
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(clock.now)
        raise httpx.ConnectError("down")

    with pytest.raises(DownloadError, match="deadline"):
        timed(handler, clock).fetch("http://r/a", tmp_path / "a.part", len(BLOB), SHA)
    assert calls == [0.0, 1.0, 3.0, 7.0]  # backoff 1, 2, 4; the next wait (8) ends past 10 s


def test_bytes_reach_the_file_as_they_arrive(tmp_path: Path) -> None:
    """What a kill -9 leaves: every chunk received, not what a buffer had flushed."""
    part = tmp_path / "a.part"
    on_disk: list[int] = []

    class Watched(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(0, len(BLOB), 1000):
                on_disk.append(part.stat().st_size if part.exists() else -1)
                yield BLOB[i : i + 1000]

    downloader(lambda r: httpx.Response(200, stream=Watched())).fetch(
        "http://r/a", part, len(BLOB), SHA
    )
    assert on_disk == list(range(0, len(BLOB), 1000))


def test_the_etag_survives_a_restart(tmp_path: Path) -> None:
    """A new process resumes under the validator the first one saw (If-Range), so a file
    changed in between is fetched whole instead of spliced."""
    part = tmp_path / "a.part"
    first = downloader(
        lambda r: httpx.Response(200, stream=Breaking(BLOB[:4000]), headers={"etag": '"x"'})
    )
    first.settings = DownloadSettings(attempts=1)
    with pytest.raises(DownloadError):
        first.fetch("http://r/a", part, len(BLOB), SHA)
    assert part.stat().st_size == 4000
    seen: list[tuple[str | None, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers.get("range"), request.headers.get("if-range")))
        return httpx.Response(
            206, content=BLOB[4000:], headers={"content-range": f"bytes 4000-10239/{len(BLOB)}"}
        )

    again = downloader(handler)  # a new Downloader: nothing remembered in memory
    assert again.fetch("http://r/a", part, len(BLOB), SHA).read_bytes() == BLOB
    assert seen == [("bytes=4000-", '"x"')] and again.resumed == 1
    assert not etag_file(part).exists()  # cleaned up with the download


def test_a_partial_response_from_elsewhere_is_not_spliced(tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(BLOB[:4000])
    answers = iter(
        [
            httpx.Response(206, content=BLOB[10:], headers={"content-range": "bytes 10-10239/*"}),
            httpx.Response(416),
            httpx.Response(200, content=BLOB),
        ]
    )
    d = downloader(lambda r: next(answers))
    assert d.fetch("http://r/a", part, len(BLOB), SHA).read_bytes() == BLOB


def test_a_device_side_failure_is_a_download_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    d = downloader(lambda r: httpx.Response(200, content=BLOB))
    with pytest.raises(DownloadError, match="cannot write"):
        d.fetch("http://r/a", tmp_path / "file" / "a.part", len(BLOB), SHA)


def test_the_token_goes_only_to_its_origins() -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[str(request.url)] = request.headers.get("authorization")
        return httpx.Response(200)

    client = download_client(
        SecretStr("tok"), ["https://cloud.example:8443/base/", "http://registry.example", None]
    )
    client._transport = httpx.MockTransport(handler)
    urls = {
        "https://cloud.example:8443/x": "Bearer tok",
        "https://CLOUD.example:8443/y": "Bearer tok",  # hosts compare without case
        "http://registry.example:80/z": "Bearer tok",  # the default port, spelt out
        "https://cloud.example/x": None,  # another port
        "http://cloud.example:8443/x": None,  # another scheme
        "https://evil.example:8443/x": None,
        "http://registry.example.evil.example/z": None,
    }
    for url in urls:
        client.get(url)
    assert {u: seen[str(httpx.URL(u))] for u in urls} == urls
    assert download_client(None, ["https://cloud.example"]).auth is None


def test_pruning_keeps_the_jobs_partial_file_and_its_etag(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    slot = store.import_dir(EDGE_INT8)
    store.activate("digits", slot)
    job = Manifest.load(EDGE_INT8).model_copy(update={"version": 2})
    store.save_job(job, "DOWNLOADING")
    part = store.staging_file(job)
    part.write_bytes(b"half")
    etag_file(part).write_text('"x"')
    stale = part.with_name("v9-000000000000.part")
    stale.write_bytes(b"old")
    etag_file(stale).write_text('"y"')
    store.prune("digits")
    assert sorted(p.name for p in part.parent.iterdir()) == [part.name, etag_file(part).name]
