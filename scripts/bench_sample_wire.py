"""Bytes per captured sample in an upload's body, through the real encode path: the shifted
digits stream's escalations (the serving edge model in the agent's TFLite backend, the
cloud model in ONNX Runtime) made into samples by ``agent.device.capture.sample``, spooled
metadata read back as the uploader does, and ``shared.samples.encode_upload`` (gzip) at a
few batch sizes. The body only: an upload's HTTP request line, headers and answer (about
400 B a request, whatever its size) come on top, and are what the real loop's wire counter
adds (``scripts/bench_learning_loop.py``).

    python scripts/bench_sample_wire.py [--field 2000] [--batches 1,4,16,64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shifted_digits

from agent.device import capture
from agent.inference.observe import Observation
from shared.samples import SampleMeta, encode_upload


def observations(field: int) -> list[Observation]:
    """The field pool's escalations, as the agent's observer sees them."""
    stream = shifted_digits.make_stream(field_size=field)
    models = shifted_digits.Models()
    try:
        threshold = models.threshold
        cloud = models.cloud_probs(stream.field.x)
        m = models.agent.model.manifest
        out, t0 = [], time.time()
        for i, row in enumerate(stream.field.x):
            r = models.agent.infer(row, mode="edge")
            if r.confidence >= threshold:
                continue
            c = cloud[i]
            out.append(
                Observation(
                    features=np.array(row),
                    encoded=None,
                    edge_index=r.index,
                    edge_confidence=r.confidence,
                    edge_probs=list(r.probs),
                    source="cloud",
                    reason="low_confidence",
                    cloud_index=int(c.argmax()),
                    cloud_confidence=float(c.max()),
                    cloud_probs=[float(p) for p in c],
                    model=m.model,
                    version=m.version,
                    threshold=threshold,
                    ts=t0 + i,
                )
            )
        return out
    finally:
        models.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--field", type=int, default=shifted_digits.FIELD_SIZE)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument(
        "--probs", action="store_true", help="keep the probability vectors (include_probs)"
    )
    args = parser.parse_args(argv)
    obs = observations(args.field)
    items = []
    for o in obs:
        made = capture.sample(o, "escalation", "digits-cloud@1", include_probs=args.probs)
        assert made is not None
        meta, payload = made
        # what the spool holds and the uploader reads back
        items.append(
            (SampleMeta.model_validate_json(meta.model_dump_json(exclude_none=True)), payload)
        )
    print(f"{len(items)} escalations of {args.field} shifted requests; payload 64 B each")
    print(f"{'batch':>6}{'raw B/sample':>14}{'gzip B/sample':>15}")
    for n in [int(b) for b in args.batches.split(",")]:
        raw = gz = 0
        chunks = [items[i : i + n] for i in range(0, len(items) - n + 1, n)]
        for chunk in chunks:
            raw += len(encode_upload("dev-0", chunk, gzip=False)[1])
            gz += len(encode_upload("dev-0", chunk, gzip=True)[1])
        k = n * len(chunks)
        print(f"{n:>6}{raw / k:>14.1f}{gz / k:>15.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
