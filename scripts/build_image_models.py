"""Build the image model pairs on synthetic pictures, with every figure measured.

Two pairs, each an int8 TFLite edge model and a bigger ONNX cloud model
(``cloud/pipeline/image_pipeline.py`` says what is written where):

- ``digit-classifier``: one digit per 32x32 RGB picture, 10 classes;
- ``digit-detector``: 1-4 digits per 96x96 RGB picture, boxes and classes (12x12 grid).

Writes under ``--out`` (default ``out/image``) a folder per edge model (``model.tflite``,
``contract.toml``, ``labels.txt``, golden PNGs, ``reference.npz``), the cloud repository
``cloud/`` (serve it with ``tandem-cloud serve --repo OUT/cloud``) and ``metrics.json``;
prints the table. ``--quick 0.3`` trains on 30% of the pictures and epochs (the tests);
``--only detector`` builds one pair (``metrics.json`` keeps the other's figures).

Package an edge model with, e.g.::

    tandem-cloud model package --edge OUT/digit-detector/model.tflite \\
        --contract OUT/digit-detector/contract.toml --name digit-detector ...

Needs the ``build`` extra (TensorFlow, scikit-learn, onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.pipeline.image_pipeline import CLASSIFIER, DETECTOR, PairSettings, build_pair, quick

PAIRS = {"classifier": CLASSIFIER, "detector": DETECTOR}


def table(figures: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'model':<24} {'metric':<8} {'score':>7} {'bytes':>9} {'gzip':>9} "
        f"{'invoke ms':>9} {'params':>8} {'train s':>7}"
    )
    rows = [head, "-" * len(head)]
    for pair in figures.values():
        for role in ("edge", "cloud"):
            f = pair[role]
            name = pair["edge_model"] if role == "edge" else pair["cloud_model"]
            rows.append(
                f"{name:<24} {pair['metric']:<8} {f['score']:>7.3f} {f['bytes']:>9,} "
                f"{f['gzip_bytes']:>9,} {f['invoke_ms']:>9.3f} {f['parameters']:>8,} "
                f"{f['train_s']:>7.1f}"
            )
        r = pair["routing"]
        rows.append(
            f"  hybrid at threshold {r['threshold']:.2f}: {pair['metric']} "
            f"{r['test']['accuracy']:.3f}, {r['test']['escalation']:.0%} escalated "
            f"(budget {r['max_escalation']:.0%}); ONNX vs Keras {pair['onnx_max_abs_diff']:.1e}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/image"))
    parser.add_argument("--only", choices=sorted(PAIRS), action="append")
    parser.add_argument(
        "--quick", type=float, default=None, help="share of pictures and epochs (0..1]"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, Any]] = {}
    for key in args.only or sorted(PAIRS):
        settings: PairSettings = PAIRS[key]
        if args.quick is not None:
            settings = quick(settings, args.quick)
        figures[key] = build_pair(settings, out)
    # a pair built alone replaces its own figures and keeps the other's
    metrics = out / "metrics.json"
    kept = json.loads(metrics.read_text()) if metrics.is_file() else {}
    metrics.write_text(json.dumps({**kept, **figures}, indent=2) + "\n")
    print(table(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
