"""The registry over real HTTP: ETag, Range (resume), If-Range, If-None-Match, listings.
Range and If-Range are Starlette's ``FileResponse``; the ETag and the 304 are ours."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud.app import create_app
from cloud.releases.registry import Registry
from cloud.settings import CloudSettings
from shared.manifest import Manifest
from shared.signing import SigningKey
from tests.helpers import CLOUD_REPO, EDGE_INT8, serve_in_thread

BLOB = (EDGE_INT8 / "model.tflite").read_bytes()
PATH = "/registry/digits/1/model.tflite"


@pytest.fixture
def http(tmp_path: Path) -> Iterator[httpx.Client]:
    registry = Registry(tmp_path / "reg")
    registry.publish(SigningKey.generate().sign(Manifest.load(EDGE_INT8)), BLOB)
    app = create_app(CloudSettings(repo=CLOUD_REPO, registry=tmp_path / "reg"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as client:
        yield client


def test_full_download_has_a_strong_etag(http: httpx.Client) -> None:
    r = http.get(PATH)
    assert r.status_code == 200 and r.content == BLOB
    assert r.headers["etag"] == f'"{hashlib.sha256(BLOB).hexdigest()}"'
    assert r.headers["accept-ranges"] == "bytes"
    unchanged = http.get(PATH, headers={"If-None-Match": r.headers["etag"]})
    assert unchanged.status_code == 304 and unchanged.headers["etag"] == r.headers["etag"]


@pytest.mark.parametrize(
    ("header", "part"),
    [
        ("bytes=100-", BLOB[100:]),
        ("bytes=0-9", BLOB[:10]),
        ("bytes=-20", BLOB[-20:]),
        (f"bytes=10-{10**9}", BLOB[10:]),
        (f"bytes=-{10**9}", BLOB),  # a suffix longer than the file: all of it
    ],
)
def test_ranges(http: httpx.Client, header: str, part: bytes) -> None:
    r = http.get(PATH, headers={"Range": header})
    assert r.status_code == 206 and r.content == part
    assert r.headers["content-range"].endswith(f"/{len(BLOB)}")


def test_bad_ranges_and_stale_if_range(http: httpx.Client) -> None:
    r = http.get(PATH, headers={"Range": f"bytes={len(BLOB)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(BLOB)}"
    assert http.get(PATH, headers={"Range": "bytes=abc"}).status_code == 400  # malformed
    # the file changed since the client's first bytes: the whole file, not a splice
    r = http.get(PATH, headers={"Range": "bytes=100-", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == BLOB
    # the ETag the client holds is the file's: the rest of it (a resumed download)
    etag = http.get(PATH).headers["etag"]
    r = http.get(PATH, headers={"Range": "bytes=100-", "If-Range": etag})
    assert r.status_code == 206 and r.content == BLOB[100:] and r.headers["etag"] == etag


def test_listing_manifest_and_unknowns(http: httpx.Client) -> None:
    listing = http.get("/registry/digits").json()
    assert listing[0]["version"] == 1 and listing[0]["size"] == len(BLOB)
    m = Manifest.from_json(http.get("/registry/digits/1/manifest.json").content)
    assert m.signature is not None
    assert http.get("/registry/nope").status_code == 404
    assert http.get("/registry/digits/9/model.tflite").status_code == 404
    assert http.get("/registry/digits/1/other.bin").status_code == 404
    assert http.get("/registry/..%2F..%2Fetc/1/model.tflite").status_code == 404
