"""A shifted digits stream the edge model never saw: a "new writer" with a bolder pen, seen
through a noisier sensor, drawn from held-out images only.

The learning loop (issue 15) is measured on it: devices capture from the *field* pool, and
every before/after figure is computed on the *held-out* shifted set. Both come from the
split's ``test`` images (never ``train``, which fitted the edge model, nor ``calib``, which
chose its threshold and which a retrain calibrates on), and from disjoint halves of them, so
a retrained model is never scored on a variant of an image it was trained on.

Each variant is made the way scikit-learn's digits were made, in reverse and forward again:
the 8x8 image (0..16: ink counts of 4x4 blocks of a 32x32 bitmap) is upsampled to 32x32
ink density, slanted and rotated (one affine map), its strokes thickened (a grey dilation),
then averaged back over 4x4 blocks to 0..16, given sensor noise, rounded and clipped. The
result stays on the model's integer grid, so a captured sample uploads as 64 uint8 bytes.
Deterministic: the same seed gives the same arrays.

    python scripts/shifted_digits.py [--seed 15] [--field 2000] [--out out/bench]
    python scripts/shifted_digits.py --dump stream.npz   # the arrays only, no models

prints the serving edge model's (real TFLite, through the agent) and the cloud model's
(ONNX Runtime) accuracy, and the edge's escalation at its manifest threshold, on clean and
shifted data, and writes ``shifted_digits.json``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset

from cloud.pipeline.data import Split

DEFAULT_SEED = 15
#: What devices capture from: at most this many requests in one cycle (the issue's cap).
FIELD_SIZE = 2000
#: Shifted variants of each held-out source image.
HELDOUT_VARIANTS = 3
EDGE_DIR = dataset.ROOT / "models" / "edge" / "digits-int8"
CLOUD_ONNX = dataset.ROOT / "models" / "cloud" / "digits-cloud" / "1" / "model.onnx"


@dataclass(frozen=True)
class Shift:
    """One writer's style: each variant draws its angle and slant from normal distributions
    (mean, standard deviation); ``pen`` is the dilation's size in 32x32 pixels (1: none),
    ``noise`` the sensor noise's standard deviation on the 0..16 grid."""

    rotation_deg: tuple[float, float] = (0.0, 0.0)
    shear: tuple[float, float] = (0.0, 0.0)
    pen: int = 3
    noise: float = 1.5
    #: The upsampled image's smoothing (pixels): enough for a rotation to look drawn, small
    #: enough that the identity map gives back the original (held to it by a unit test).
    blur: float = 0.5


#: The stream every learning-loop figure uses: strokes about twice as thick, sensor noise of
#: 1.5 levels. Chosen so the serving edge escalates about twice as often as on clean data
#: while the cloud model stays near 95% (slant and rotation are there too, but at a strength
#: that moves the edge this much they also take the cloud, the retrain's teacher, below 92%).
WRITER = Shift()
#: No shift at all: the same resampling path, to show what it alone costs (nothing much).
IDENTITY = Shift(rotation_deg=(0.0, 0.0), shear=(0.0, 0.0), pen=1, noise=0.0)


def shift_image(image: np.ndarray, rng: np.random.Generator, shift: Shift = WRITER) -> np.ndarray:
    """One shifted variant of one 64-feature digit (values 0..16), as 64 uint8 values."""
    from scipy import ndimage  # type: ignore[import-untyped]

    up = np.kron(np.asarray(image, dtype=np.float64).reshape(8, 8) / 16.0, np.ones((4, 4)))
    if shift.blur > 0:
        up = ndimage.gaussian_filter(up, shift.blur)
    angle = np.deg2rad(rng.normal(*shift.rotation_deg))
    slant = rng.normal(*shift.shear)
    c, s = np.cos(angle), np.sin(angle)
    forward = np.array([[c, -s], [s, c]]) @ np.array([[1.0, slant], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)  # affine_transform maps output pixels to input ones
    centre = np.array([15.5, 15.5])
    img = ndimage.affine_transform(up, inverse, offset=centre - inverse @ centre, order=1)
    if shift.pen > 1:
        img = ndimage.grey_dilation(img, size=(shift.pen, shift.pen))
    small = img.reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16.0
    if shift.noise > 0:
        small = small + rng.normal(0.0, shift.noise, small.shape)
    return np.asarray(np.clip(np.round(small), 0, 16), dtype=np.uint8).reshape(64)


@dataclass(frozen=True)
class ShiftedStream:
    """The field pool (what devices see and capture, in arrival order) and the held-out
    shifted set (every reported figure), with the split indices of their source images."""

    field: Split
    heldout: Split
    #: Index into the split file's ``x`` of each field sample's source image.
    field_sources: np.ndarray
    heldout_sources: np.ndarray
    #: The held-out sources' clean images, for the clean-versus-shifted comparison.
    heldout_clean: Split
    seed: int
    shift: Shift


def make_stream(
    data: Path = dataset.DEFAULT_DATA,
    *,
    seed: int = DEFAULT_SEED,
    field_size: int = FIELD_SIZE,
    heldout_variants: int = HELDOUT_VARIANTS,
    shift: Shift = WRITER,
) -> ShiftedStream:
    """The stream for ``seed``: the test images shuffled and halved (field sources, held-out
    sources), ``field_size`` field samples cycling over the field sources in a shuffled
    order, ``heldout_variants`` variants of each held-out source."""
    with np.load(data) as f:
        x, y, test = f["x"], f["y"].astype(np.int64), np.sort(f["test"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(test)
    half = len(order) // 2
    field_src, heldout_src = np.sort(order[:half]), np.sort(order[half:])
    field_rng, heldout_rng = (np.random.default_rng([seed, k]) for k in (1, 2))
    repeats = -(-field_size // len(field_src))
    field_idx = field_rng.permutation(np.tile(field_src, repeats))[:field_size]
    heldout_idx = np.repeat(heldout_src, heldout_variants)
    return ShiftedStream(
        field=_variants(x, y, field_idx, field_rng, shift),
        heldout=_variants(x, y, heldout_idx, heldout_rng, shift),
        field_sources=field_idx,
        heldout_sources=heldout_idx,
        heldout_clean=Split(x[heldout_src].astype(np.float32), y[heldout_src]),
        seed=seed,
        shift=shift,
    )


def _variants(
    x: np.ndarray, y: np.ndarray, idx: np.ndarray, rng: np.random.Generator, shift: Shift
) -> Split:
    rows = np.stack([shift_image(x[i], rng, shift) for i in idx]) if len(idx) else np.zeros((0, 64))
    return Split(rows.astype(np.float32), y[idx])


# ------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Answers:
    """Each sample's edge label and confidence and cloud label, with the truth."""

    edge: np.ndarray
    confidence: np.ndarray
    cloud: np.ndarray
    y: np.ndarray

    def figures(self, threshold: float) -> dict[str, float]:
        """Accuracies, escalation and hybrid accuracy at ``threshold`` (max-prob), and the
        edge's error on the answers it keeps (what a guaranteed threshold bounds)."""
        esc = self.confidence < threshold
        kept = ~esc
        hybrid = np.where(esc, self.cloud, self.edge)
        return {
            "samples": len(self.y),
            "edge_accuracy": float(np.mean(self.edge == self.y)),
            "cloud_accuracy": float(np.mean(self.cloud == self.y)),
            "escalated": float(esc.mean()),
            "hybrid_accuracy": float(np.mean(hybrid == self.y)),
            "edge_kept_error": float(np.mean(self.edge[kept] != self.y[kept]))
            if kept.any()
            else 0.0,
        }


class Models:
    """The serving edge model through a local ``Agent`` (its real TFLite backend, edge mode)
    and the cloud model in ONNX Runtime: both as deployed, with no server in between."""

    def __init__(self, edge_dir: Path = EDGE_DIR, cloud_onnx: Path = CLOUD_ONNX) -> None:
        import onnxruntime as ort

        from agent import Agent, AgentSettings

        self.agent = Agent(AgentSettings.load(model_dir=edge_dir))
        self.session = ort.InferenceSession(str(cloud_onnx), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    @property
    def threshold(self) -> float:
        return self.agent.threshold

    def cloud_probs(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x.astype(np.float32)})[0])

    def answers(self, split: Split) -> Answers:
        edge = [self.agent.infer(row, mode="edge") for row in split.x]
        return Answers(
            edge=np.array([int(r.label) for r in edge]),
            confidence=np.array([r.confidence for r in edge]),
            cloud=self.cloud_probs(split.x).argmax(axis=1),
            y=split.y,
        )

    def close(self) -> None:
        self.agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--field", type=int, default=FIELD_SIZE, help="field pool size")
    parser.add_argument("--data", type=Path, default=dataset.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out" / "bench")
    parser.add_argument("--dump", type=Path, help="write the stream's arrays here and stop")
    args = parser.parse_args(argv)
    from results import write_json

    stream = make_stream(args.data, seed=args.seed, field_size=args.field)
    if args.dump is not None:
        dump(stream, args.dump)
        return 0
    models = Models()
    try:
        threshold = models.threshold
        sets = {
            "clean test (all 360)": dataset.load(args.data).test,
            "clean, held-out sources": stream.heldout_clean,
            "identity resampling": _variants_of(stream.heldout_clean, IDENTITY, args.seed),
            "shifted field pool": stream.field,
            "shifted held-out": stream.heldout,
        }
        rows = {name: models.answers(split).figures(threshold) for name, split in sets.items()}
    finally:
        models.close()
    print(f"edge {EDGE_DIR.name} at its manifest threshold {threshold:.2f}; cloud {CLOUD_ONNX}")
    print(table(rows))
    doc: dict[str, Any] = {
        "seed": args.seed,
        "shift": asdict(stream.shift),
        "threshold": threshold,
        "field_sources": len(np.unique(stream.field_sources)),
        "heldout_sources": len(np.unique(stream.heldout_sources)),
        "sets": rows,
    }
    write_json(args.out / "shifted_digits.json", doc)
    return 0


def dump(stream: ShiftedStream, path: Path) -> None:
    """The stream's arrays as one ``.npz`` (what the unit test checks, without the models)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        field_x=stream.field.x,
        field_y=stream.field.y,
        field_sources=stream.field_sources,
        heldout_x=stream.heldout.x,
        heldout_y=stream.heldout.y,
        heldout_sources=stream.heldout_sources,
    )
    print(f"wrote {path}")


def _variants_of(split: Split, shift: Shift, seed: int) -> Split:
    rng = np.random.default_rng([seed, 3])
    return Split(
        np.stack([shift_image(r, rng, shift) for r in split.x]).astype(np.float32), split.y
    )


def table(rows: dict[str, dict[str, float]]) -> str:
    head = (
        f"{'set':<26}{'n':>6}{'edge acc':>10}{'cloud acc':>11}{'escalated':>11}"
        f"{'hybrid acc':>12}{'edge err kept':>15}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(
            f"{name:<26}{r['samples']:>6}{100 * r['edge_accuracy']:>9.1f}%"
            f"{100 * r['cloud_accuracy']:>10.1f}%{100 * r['escalated']:>10.1f}%"
            f"{100 * r['hybrid_accuracy']:>11.1f}%{100 * r['edge_kept_error']:>14.2f}%"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
