"""Edge candidates for the learning-loop benchmarks, trained the way the serving model was
(``build_models.py``: MLP 64-8-10, 60 epochs, Adam 3e-3, batch 64, raw-pixel input folded
into the first layer, full-integer int8 TFLite) but with a chosen seed and a chosen share of
the training labels replaced by a wrong class: the candidate that should be stopped.

TensorFlow clashes with the TFLite runtimes in one process, so the benchmarks run this as a
child process and load what it writes with the agent's real backend:

    python scripts/loop_models.py --out DIR [--corrupt 0.4] [--seed 8] [--version 2]

writes an edge bundle (``model.tflite``, ``manifest.json`` with golden samples from its own
interpreter, the serving manifest's routing) and prints a JSON line of what it trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import build_models
import dataset

from cloud.pipeline import convert
from cloud.pipeline.bundle import template_manifest, write_bundle
from cloud.pipeline.data import Split
from cloud.pipeline.determinism import pin_numerics
from cloud.pipeline.train import TrainSettings, train_on_labels
from shared.manifest import GoldenSample, Manifest

SERVING = dataset.ROOT / "models" / "edge" / "digits-int8"


def corrupt_labels(y: np.ndarray, share: float, seed: int, classes: int = 10) -> np.ndarray:
    """``share`` of the labels (drawn with ``seed``) moved to another class, uniformly."""
    rng = np.random.default_rng([seed, 99])
    out = y.copy()
    pick = rng.random(len(y)) < share
    out[pick] = (y[pick] + rng.integers(1, classes, pick.sum())) % classes
    return out


def build(out: Path, corrupt: float, seed: int, version: int, epochs: int) -> dict[str, object]:
    data = dataset.load()
    y = corrupt_labels(data.train.y, corrupt, seed)
    settings = TrainSettings(hidden=build_models.EDGE_HIDDEN, epochs=epochs, seed=seed)
    model = train_on_labels(Split(data.train.x, y), 10, settings)
    blob = convert.to_tflite(model, "int8", data.train.x)
    interp = build_models._interpreter(blob)
    golden_x = data.test.x[:6]
    probs = build_models.tflite_probabilities(blob, golden_x)
    serving = Manifest.load(SERVING)
    cloud = serving.cloud
    assert cloud is not None, f"{SERVING} names no cloud model"
    manifest = template_manifest(
        model=serving.model,
        blob=blob,
        input_detail=interp.get_input_details()[0],
        output_detail=interp.get_output_details()[0],
        cloud=cloud,
        labels=list(serving.labels or []),
        routing=serving.routing,
        golden=[
            GoldenSample(
                input=[float(v) for v in x],
                expected=[round(float(p), 6) for p in p_row],
                label=int(p_row.argmax()),  # the model's own answer, as a device checks
            )
            for x, p_row in zip(golden_x, probs, strict=True)
        ],
    ).model_copy(update={"version": version})
    write_bundle(out, manifest, blob)
    test_probs = build_models.tflite_probabilities(blob, data.test.x)
    return {
        "out": str(out),
        "corrupt": corrupt,
        "seed": seed,
        "epochs": epochs,
        "flipped": int((y != data.train.y).sum()),
        "test_accuracy": float((test_probs.argmax(axis=1) == data.test.y).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corrupt", type=float, default=0.0, help="share of labels made wrong")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=build_models.EDGE_EPOCHS)
    args = parser.parse_args(argv)
    pin_numerics(onednn=False)  # before TensorFlow loads: the same figures on any machine
    print(json.dumps(build(args.out, args.corrupt, args.seed, args.version, args.epochs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
