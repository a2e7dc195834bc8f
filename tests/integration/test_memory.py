"""Memory per request is bounded: the peak RSS of real servers in child processes, read from
``/proc/PID/status`` around hostile and huge requests (the cases of
``scripts/bench_memory.py``, which prints the figures, loaded from its file)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import load_script

pytestmark = pytest.mark.slow
MB = 1_000_000
bench = load_script("bench_memory")
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cloud() -> Iterator[Any]:
    """The benchmark's ``Server``: ``tandem-cloud serve`` in a child process."""
    with bench.cloud_server() as server:
        yield server


def test_a_gzip_bomb_costs_the_cloud_what_the_json_limit_allows(cloud: Any) -> None:
    """65 KB inflating to 63 MiB of JSON (under the 64 MiB body limit): inflated as it
    streams, refused at the JSON limit. It cost 2.2 GB, and a 200, when it was inflated
    whole and parsed."""
    bomb = bench.gzip_bomb(63 * MiB)
    growth, status = bench.peak_growth(
        cloud.pid,
        lambda: bench.post(
            f"{cloud.url}/v2/models/digits-cloud/infer", bomb, {"Content-Encoding": "gzip"}
        ),
    )
    assert status == 413
    assert growth < 64 * MB, f"peak RSS grew {growth / MB:.0f} MB"


def test_bytes_tensors_are_decoded_without_a_second_serialisation(cloud: Any) -> None:
    """2M BYTES elements of 12 bytes (32 MB on the wire): the body, one buffer, and the 2M
    objects it decodes to (about 4.5 times the wire); the size of each tensor, which the
    header cache needs, is no longer learnt by serialising it again (500 MB in all)."""
    body, headers = bench.bytes_request(2_000_000)
    growth, status = bench.peak_growth(
        cloud.pid, lambda: bench.post(f"{cloud.url}/v2/models/digits-cloud/infer", body, headers)
    )
    assert status == 400  # decoded, then refused: the model takes FP32
    assert growth < 5 * len(body), f"peak RSS grew {growth / MB:.0f} MB"


def test_a_gzip_bomb_costs_the_agent_what_its_json_limit_allows() -> None:
    """8 KB inflating to 8 MiB of JSON, the agent's body limit: it cost 160 MB."""
    bomb = bench.gzip_bomb(8 * MiB - 4096)
    with bench.agent_server() as agent:
        growth, status = bench.peak_growth(
            agent.pid,
            lambda: bench.post(
                f"{agent.url}/v2/models/digits/infer", bomb, {"Content-Encoding": "gzip"}
            ),
        )
    assert status == 413
    assert growth < 16 * MB, f"peak RSS grew {growth / MB:.0f} MB"


def test_encoding_bytes_tensors_costs_their_size_twice_at_most() -> None:
    """``encode_request`` of 2M BYTES elements: the blob, written in place, and the body it is
    joined into (it made a temporary object per element: 350 MB)."""
    measured = bench.case_encode_bytes(2_000_000)
    assert measured["peak_growth_bytes"] < 2.5 * measured["wire_bytes"], measured
