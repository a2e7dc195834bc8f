"""Conv image models with Keras: a classifier (one digit per picture) and a single-shot
grid detector (several digits per picture), each in a small edge size and a bigger cloud
size, from one ``NetSpec``; their training, and the edge's int8 TFLite.

Both kinds take raw RGB pixels, ``[batch, S, S, 3]`` in 0..255 (float32 in Keras and ONNX,
uint8 in the edge TFLite, whose input quantization is then the identity: scale 1, zero
point 0): they train on ``x / 255`` and the scale is folded into the first convolution,
so the contract's image normalisation is mean 0, std 1 and a device does no arithmetic on
a frame of the right size.

- classifier: VGG-style 3x3 convolutions and 2x2 max-pools, flattened (a digit's identity
  is where its strokes are: global pooling of a small net's features loses it), dense
  layers; output ``logits`` ``[batch, C]``;
- detector: the same backbone down to a ``G x G`` grid (stride 8 for three pools), a 1x1
  head of ``4 + C`` channels per cell, decoded inside the model (``GridBoxes``): a cell's
  sigmoids give the box centre's offset in the cell and its height and width as shares
  of the picture, and ``C`` independent class probabilities. Outputs ``boxes``
  ``[batch, G*G, 4]`` (normalised ``y0, x0, y1, x1``, clipped to [0, 1]) and ``scores``
  ``[batch, G*G, C]`` (probabilities, sigmoid inside). The cell holding a digit's centre is
  the one responsible for it (YOLO v1); the loss is class BCE over every cell (positives
  weighted up) plus L1 on the responsible cells' box numbers.

The edge TFLite is full-integer post-training quantization (int8 weights and activations,
calibrated on a representative set of training pictures) with uint8 input and uint8
outputs, and a fixed batch of 1; its tensors carry the Keras names (``image``, ``logits``,
``boxes``, ``scores``), which the v2 contract binds by. TensorFlow is imported lazily: the
``build`` extra only.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cloud.pipeline.scenes import Crops, Scenes

Kind = Literal["classifier", "detector"]
#: A backbone: 3x3 ReLU convolutions by width, ``"M"`` for a 2x2 max-pool.
Layer = int | Literal["M"]
INPUT = "image"
#: The contract file's section for every image net here: they take raw RGB pixels (the
#: 1/255 is folded into the first convolution), so a uint8 frame of the model's size goes
#: in as it is.
RAW_PIXEL_INPUT = [
    f"[inputs.{INPUT}]  # raw RGB pixels: a uint8 frame of the model's size goes in as it is",
    'kind = "image"',
    'layout = "NHWC"',
    'colour = "RGB"',
    'resize = "squash"',
    "mean = [0.0]",
    "std = [1.0]",
    "",
]
#: Detector head logits are bounded to +-8 (sigmoid 0.0003..0.9997), in the loss (no push
#: beyond) and in the model: int8 then spends its 256 steps on that range, not on a tail
#: of ever more certain background cells, so scores keep their resolution.
LOGIT_BOUND = 8.0


@dataclass(frozen=True)
class NetSpec:
    kind: Kind
    size: int  # input height and width
    backbone: tuple[Layer, ...]
    dense: tuple[int, ...] = ()  # classifier: hidden widths after the pooling
    classes: int = 10
    dropout: float = 0.0

    @property
    def grid(self) -> int:
        pools = sum(1 for layer in self.backbone if layer == "M")
        return self.size >> pools

    @property
    def cells(self) -> int:
        return self.grid**2

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("logits",) if self.kind == "classifier" else ("boxes", "scores")


@dataclass(frozen=True)
class TrainBudget:
    epochs: int
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 7
    #: detector: weight of a positive class target in the BCE, and of the box L1
    positive_weight: float = 4.0
    box_weight: float = 5.0


def _tf() -> Any:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return tf


def box_matrix(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """``boxes = sigmoids[..., :4] @ M + offsets``: the decoding as one linear map, the
    same in Keras, TFLite and ONNX. Sigmoids are ``(dy, dx, h, w)``; a box is
    ``((row + dy) / G - h / 2, (col + dx) / G - w / 2, ... + h / 2, ... + w / 2)``."""
    g = 1.0 / grid
    m = np.array(
        [[g, 0, g, 0], [0, g, 0, g], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]], dtype=np.float32
    )
    rows, cols = np.mgrid[0:grid, 0:grid].astype(np.float32)
    offsets = np.stack([rows * g, cols * g, rows * g, cols * g], axis=-1)
    return m, offsets.reshape(grid * grid, 4)


def _grid_boxes_layer(spec: NetSpec) -> Any:
    tf = _tf()
    m, offsets = box_matrix(spec.grid)
    cells, classes = spec.cells, spec.classes

    class GridBoxes(tf.keras.layers.Layer):  # type: ignore[misc,name-defined]
        """The detector's head ``[batch, G, G, 4 + C]`` to ``boxes`` and ``scores``."""

        def call(self, raw: Any) -> Any:
            ops = tf.keras.ops
            bounded = ops.clip(raw, -LOGIT_BOUND, LOGIT_BOUND)
            sig = ops.reshape(ops.sigmoid(bounded), (-1, cells, 4 + classes))
            boxes = ops.clip(ops.matmul(sig[..., :4], m) + offsets, 0.0, 1.0)
            return boxes, sig[..., 4:]

    return GridBoxes(name="grid_boxes")


def build(spec: NetSpec, batch: int | None = None) -> tuple[Any, Any]:
    """``(train_model, model)``: the net whose output the loss reads (raw head for the
    detector, logits for the classifier) and the shipped one (named outputs), sharing
    weights. ``batch`` fixes the batch dimension (the TFLite export)."""
    tf = _tf()
    layers = tf.keras.layers
    image = tf.keras.Input((spec.size, spec.size, 3), batch_size=batch, name=INPUT)
    x = image
    convs = pools = 0
    for item in spec.backbone:
        if item == "M":
            x = layers.MaxPooling2D(2, name=f"pool{pools}")(x)
            pools += 1
        else:
            x = layers.Conv2D(item, 3, padding="same", activation="relu", name=f"conv{convs}")(x)
            convs += 1
    if spec.kind == "classifier":
        x = layers.Flatten(name="flatten")(x)
        for i, width in enumerate(spec.dense):
            x = layers.Dense(width, activation="relu", name=f"dense{i}")(x)
            if spec.dropout:
                x = layers.Dropout(spec.dropout, name=f"dropout{i}")(x)
        logits = layers.Dense(spec.classes, name="head")(x)
        return tf.keras.Model(image, logits), tf.keras.Model(image, {"logits": logits})
    # RetinaNet's prior: class scores start near 1%, so the loss does not spend its first
    # epochs learning that most cells are empty
    prior = np.concatenate([np.zeros(4), np.full(spec.classes, -np.log(99.0))])
    init = tf.keras.initializers.Constant(prior.astype(np.float32))
    raw = layers.Conv2D(4 + spec.classes, 1, bias_initializer=init, name="head")(x)
    boxes, scores = _grid_boxes_layer(spec)(raw)
    return tf.keras.Model(image, raw), tf.keras.Model(image, {"boxes": boxes, "scores": scores})


def detector_targets(scenes: Scenes, grid: int, classes: int) -> np.ndarray:
    """``[n, G, G, 4 + C + 1]``: per responsible cell the box numbers the head's sigmoids
    should give (``dy, dx, h, w``), the one-hot class, and a mask of 1."""
    n, size = len(scenes), scenes.images.shape[1]
    out = np.zeros((n, grid, grid, 4 + classes + 1), dtype=np.float32)
    for i in range(n):
        boxes, ids = scenes.objects(i)
        for (y0, x0, y1, x1), c in zip(boxes / size, ids):
            cy, cx = (y0 + y1) / 2 * grid, (x0 + x1) / 2 * grid
            row, col = min(int(cy), grid - 1), min(int(cx), grid - 1)
            out[i, row, col, :4] = (cy - row, cx - col, y1 - y0, x1 - x0)
            out[i, row, col, 4 + c] = 1.0
            out[i, row, col, -1] = 1.0
    return out


def detector_loss(classes: int, positive_weight: float, box_weight: float) -> Any:
    tf = _tf()

    def loss(y_true: Any, raw: Any) -> Any:
        mask = y_true[..., -1]
        positives = tf.maximum(tf.reduce_sum(mask), 1.0)
        box = tf.reduce_sum(tf.abs(tf.sigmoid(raw[..., :4]) - y_true[..., :4]), axis=-1)
        box_loss = tf.reduce_sum(box * mask) / positives
        target = y_true[..., 4 : 4 + classes]
        logits = tf.clip_by_value(raw[..., 4:], -LOGIT_BOUND, LOGIT_BOUND)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)
        weights = 1.0 + (positive_weight - 1.0) * target
        return box_weight * box_loss + tf.reduce_sum(bce * weights) / positives

    return loss


def _seed(seed: int) -> None:
    tf = _tf()
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _dataset(images: np.ndarray, targets: np.ndarray, budget: TrainBudget) -> Any:
    """Pictures stay uint8 in memory and become ``x / 255`` per batch."""
    tf = _tf()
    data = tf.data.Dataset.from_tensor_slices((images, targets))
    data = data.shuffle(len(images), seed=budget.seed, reshuffle_each_iteration=True)
    data = data.batch(budget.batch_size).map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
    return data.prefetch(2)


def fold_input_scale(model: Any, scale: float) -> None:
    """``conv(s x) = conv_{s W}(x)`` (zero padding commutes with the scale): the model
    then takes raw pixels."""
    first = model.get_layer("conv0")
    kernel, bias = first.get_weights()
    first.set_weights([kernel * scale, bias])


def train(spec: NetSpec, data: Crops | Scenes, budget: TrainBudget) -> Any:
    """The shipped Keras model of ``spec``, trained on ``data``; takes raw pixels."""
    tf = _tf()
    _seed(budget.seed)
    train_model, model = build(spec)
    if spec.kind == "classifier":
        assert isinstance(data, Crops)
        targets = data.labels
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        assert isinstance(data, Scenes)
        targets = detector_targets(data, spec.grid, spec.classes)
        loss = detector_loss(spec.classes, budget.positive_weight, budget.box_weight)
    steps = budget.epochs * -(-len(data) // budget.batch_size)
    schedule = tf.keras.optimizers.schedules.CosineDecay(budget.learning_rate, steps)
    train_model.compile(tf.keras.optimizers.Adam(schedule), loss)
    data_set = _dataset(data.images, targets, budget)  # shuffled there, with the seed
    train_model.fit(data_set, epochs=budget.epochs, shuffle=False, verbose=0)
    fold_input_scale(model, 1.0 / 255.0)
    return model


def predict(model: Any, images: np.ndarray, batch: int = 128) -> dict[str, np.ndarray]:
    """The Keras model's outputs by name on raw uint8 pictures."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch):
        out = model(images[start : start + batch].astype(np.float32), training=False)
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def to_tflite(model: Any, spec: NetSpec, representative: np.ndarray) -> bytes:
    """The int8 edge artifact: uint8 input of batch 1 with the identity quantization,
    int8 inside, uint8 outputs; tensors named as the Keras model's input and outputs."""
    fixed = build(spec, batch=1)[1]
    fixed.set_weights(model.get_weights())
    return fixed_to_tflite(fixed, representative)


def fixed_to_tflite(fixed: Any, representative: np.ndarray) -> bytes:
    """``to_tflite`` of a Keras model already built with batch 1 (any image net of this
    pipeline: the classifier, the detector, the segmenter)."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    samples = representative.astype(np.float32)
    # the full pixel range is seen, so the input's quantization is scale 1, zero point 0
    samples[0, 0, 0, 0], samples[0, 0, 0, 1] = 0.0, 255.0

    def feed() -> Any:
        for row in samples:
            yield [row[None]]

    converter.representative_dataset = feed
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # Keras prints the SavedModel it exports on the way; the build prints its table
        warnings.filterwarnings("ignore", "Statistics for quantized inputs", UserWarning)
        blob = bytes(converter.convert())
    return name_tensors(blob)


def name_tensors(blob: bytes) -> bytes:
    """The converter names the graph's tensors after its own ops
    (``serving_default_image:0``, ``StatefulPartitionedCall_1:0``); the signature keeps the
    model's names. Each input and output tensor takes its signature name, so a contract
    binds them by what they are."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    tensors = model.subgraphs[0].tensors
    for signature in model.signatureDefs:
        for item in list(signature.inputs) + list(signature.outputs):
            tensors[item.tensorIndex].name = item.name
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def interpreter(blob: bytes) -> Any:
    """TensorFlow's own interpreter (loaded already; ``tflite_runtime`` beside it clashes)."""
    tf = _tf()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "\\s*Warning: tf.lite.Interpreter is deprecated")
        interp = tf.lite.Interpreter(model_content=blob)
    interp.allocate_tensors()
    return interp


class TfliteImageModel:
    """The edge artifact in the interpreter, one uint8 picture per call as a device runs
    it; outputs dequantized, by name."""

    def __init__(self, blob: bytes) -> None:
        self.interp = interpreter(blob)
        self.input = self.interp.get_input_details()[0]
        self.outputs = self.interp.get_output_details()

    def invoke(self, picture: np.ndarray) -> None:
        self.interp.set_tensor(self.input["index"], picture[None])
        self.interp.invoke()

    def __call__(self, picture: np.ndarray) -> dict[str, np.ndarray]:
        self.invoke(picture)
        out = {}
        for d in self.outputs:
            value = self.interp.get_tensor(d["index"])[0].astype(np.float32)
            scale, zero = d["quantization"]
            out[d["name"]] = (value - zero) * scale if scale else value
        return out

    def run(self, pictures: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self(p) for p in pictures]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}
