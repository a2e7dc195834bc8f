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
import json
import os
import subprocess
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
    device = f["device"]
    rows.append(
        f"  size {f['bytes']:,} B (gzip {f['gzip_bytes']:,}), invoke {f['invoke_ms']:.3f} ms "
        f"(TensorFlow), {device['invoke_ms']:.3f} ms ({device['runtime']}), "
        f"train {f['train_s']:.1f} s, build {f['build_s']:.1f} s"
    )
    rows.append(f"  confidence (q{conf['quantile']:g} of per-pixel max prob)   min  median")
    for name, c in conf.items():
        if isinstance(c, dict):
            rows.append(f"    {name:<20} {c['min']:>12.3f} {c['median']:>7.3f}")
    share = conf["noisy_below_clean_share"]
    rows.append(f"    a scene under heavy noise is less sure than clean in {share:.0%} of pairs")
    return "\n".join(rows)


#: Times the artifact in the agent's own interpreter (``tflite_runtime`` where installed),
#: in a child (it must not load beside the TensorFlow this process has loaded); one
#: picture per call, as the agent runs it (int8 convolutions take as long on any picture).
DEVICE_TIMING = """
import json, sys, time
import numpy as np
from agent.inference.backends.tflite import find_interpreter_class
found = find_interpreter_class()
interp = found[1](model_path=sys.argv[1], num_threads=1)
interp.allocate_tensors()
inp = interp.get_input_details()[0]
interp.set_tensor(inp["index"], np.zeros(inp["shape"], dtype=inp["dtype"]))
times = []
for i in range(int(sys.argv[2]) + 20):
    start = time.perf_counter()
    interp.invoke()
    times.append(time.perf_counter() - start)
print(json.dumps({"runtime": found[0], "invoke_ms": 1000 * float(np.median(times[20:]))}))
"""


def device_timing(model: Path, calls: int) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", DEVICE_TIMING, str(model), str(calls)],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    timing: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return timing


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
    # the build's invoke_ms is TensorFlow's interpreter; a device runs the agent's
    folder = args.out / settings.name
    figures["device"] = device_timing(folder / "model.tflite", settings.latency_calls)
    (folder / "metrics.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
