"""Build the digit segmenter on synthetic scenes, with every figure measured.

A tiny fully-convolutional net (``cloud/pipeline/segmentation_model.py``): a 96x96 RGB
scene (``cloud/pipeline/scenes.py``, 1-4 digits on clutter) in, a 48x48 mask of 11 class
probabilities out (background, digits 0..9), int8 TFLite with uint8 input. Writes
``--out/digit-segmenter/`` (``model.tflite``, ``contract.toml``, ``labels.txt``, golden
PNGs, ``metrics.json``: ``cloud/pipeline/segmentation_build.py`` says what each is) and
prints the figures. ``--quick 0.1`` trains on 10% of the scenes and epochs (the tests).

Package it with::

    tandem-cloud model package --edge OUT/digit-segmenter/model.tflite \\
        --contract OUT/digit-segmenter/contract.toml --name digit-segmenter ...

Needs the ``build`` extra (TensorFlow, scikit-learn). TensorFlow loads here, so run it as
its own process: beside ``tflite_runtime`` (the agent's interpreter) it crashes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.pipeline.segmentation_build import SEGMENTER, build_segmenter, quick


def table(f: dict[str, Any]) -> str:
    conf = f["confidence"]
    rows = [
        f"{f['model']}: input {f['input']}, outputs {f['outputs']}, {f['parameters']:,} parameters",
        f"  held-out {f['split']['test']['count']} scenes   pixel acc   digit px acc   mIoU",
    ]
    for name, key in (
        ("48x48 grid", "grid"),
        ("96x96 px", "pixels"),
        ("keras float", "keras_float_pixels"),
    ):
        s = f[key]
        rows.append(
            f"  {name:<26} {s['pixel_accuracy']:>9.3f} {s['digit_pixel_accuracy']:>14.3f} "
            f"{s['mean_iou']:>6.3f}"
        )
    rows.append(
        f"  size {f['bytes']:,} B (gzip {f['gzip_bytes']:,}), invoke {f['invoke_ms']:.3f} ms, "
        f"train {f['train_s']:.1f} s, build {f['build_s']:.1f} s"
    )
    rows.append(f"  confidence (q{conf['quantile']:g} of per-pixel max prob)   min  median")
    for name, c in conf.items():
        if isinstance(c, dict):
            rows.append(f"    {name:<20} {c['min']:>12.3f} {c['median']:>7.3f}")
    share = conf["noisy_below_clean_share"]
    rows.append(f"    a scene under heavy noise is less sure than clean in {share:.0%} of pairs")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/image"))
    parser.add_argument(
        "--quick", type=float, default=None, help="share of scenes and epochs (0..1]"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    settings = SEGMENTER if args.quick is None else quick(SEGMENTER, args.quick)
    figures = build_segmenter(settings, args.out)
    print(table(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
