"""The downloader against scripted HTTP (httpx MockTransport): resume, caps, digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from agent.download import DigestError, Downloader, DownloadError
from agent.settings import DownloadSettings

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
