"""A tiny fully-convolutional digit segmenter (Keras): which digit, if any, is on each
pixel of a 96 x 96 scene (``cloud.pipeline.scenes``), and its int8 TFLite.

The net is a small U-Net: an encoder of 3x3 ReLU convolutions and 2x2 max-pools down to
stride 8 (where the receptive field spans a whole digit, which is what tells a 3 from an
8), then a decoder that doubles the resolution back to ``out_stride`` (2: a 48 x 48 mask),
each step joining the encoder's features of that resolution (where the strokes are) by a
3x3 convolution. Every convolution is batch-normalised in training. The head is
a 1x1 convolution to ``CLASSES`` (background and ten digits) with a softmax inside the
model: the TFLite's ``mask`` output is ``[1, 48, 48, 11]`` probabilities (uint8).

Like the detector pair (``cloud.pipeline.image_models``, whose helpers this reuses), it
trains on ``x / 255`` and folds the scale into the first convolution, so it takes raw
pixels: the TFLite input is uint8 with the identity quantization (scale 1, zero point 0)
and the contract's image normalisation is mean 0, std 1. TensorFlow is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud.pipeline import image_models
from cloud.pipeline.segmentation_eval import CLASSES

INPUT = "image"
OUTPUT = "mask"


@dataclass(frozen=True)
class SegmenterSpec:
    size: int = 96
    #: encoder widths, one level per entry: level ``i`` at stride ``2**i`` (a 2x2 max-pool
    #: before every level but the first), one 3x3 convolution each
    encoder: tuple[int, ...] = (8, 16, 24, 32)
    #: extra 3x3 convolutions at the deepest level (receptive field for the digit's identity)
    deep: int = 1
    out_stride: int = 2
    #: the decoder's 3x3 convolutions depthwise-separable: a third of the operations, but
    #: the agent's tflite_runtime 2.14 runs the int8 model in 3.7 ms against 1.5 ms with
    #: plain ones (TensorFlow 2.21's interpreter: 0.4 ms both), and mIoU 0.845 against 0.858
    separable_decoder: bool = False
    #: batch normalisation after every convolution (folded into it on export). Without
    #: it the net sits for most of its budget on the plateau of "ink here, digit
    #: unknown" (digit IoU near chance after 15 epochs; with it, 0.8 in 10)
    batch_norm: bool = True
    classes: int = CLASSES

    @property
    def grid(self) -> int:
        return self.size // self.out_stride


@dataclass(frozen=True)
class SegmenterBudget:
    epochs: int
    batch_size: int = 32
    learning_rate: float = 4e-3
    seed: int = 7
    #: weight of a digit pixel in the loss against a background pixel's 1 (digits are ~15%
    #: of the pixels; unweighted, a small net learns background first and long)
    digit_weight: float = 3.0


def _conv(
    layers: Any,
    spec: SegmenterSpec,
    width: int,
    name: str,
    separable: bool = False,
) -> Any:
    """A 3x3 convolution (depthwise-separable if asked) and ReLU, with batch normalisation
    between them if ``spec`` says (the converter folds it into the convolution). The
    convolution keeps its bias either way: ``image_models.fold_input_scale`` reads kernel
    and bias."""
    kind = layers.SeparableConv2D if separable else layers.Conv2D
    if not spec.batch_norm:
        return kind(width, 3, padding="same", activation="relu", name=name)

    def apply(x: Any) -> Any:
        x = kind(width, 3, padding="same", name=name)(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    return apply


def build(spec: SegmenterSpec, batch: int | None = None) -> tuple[Any, Any]:
    """``(train_model, model)``: the net giving logits (the loss reads them) and the
    shipped one with a softmax ``mask`` output, sharing weights."""
    tf = image_models._tf()
    layers = tf.keras.layers
    image = tf.keras.Input((spec.size, spec.size, 3), batch_size=batch, name=INPUT)
    x = image
    skips: list[Any] = []
    for level, width in enumerate(spec.encoder):
        if level:
            x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
        x = _conv(layers, spec, width, f"conv{level}")(x)
        skips.append(x)
    for k in range(spec.deep):
        width = spec.encoder[-1]
        x = _conv(layers, spec, width, f"deep{k}")(x)
    stop = int(np.log2(spec.out_stride))
    for level in range(len(spec.encoder) - 2, stop - 1, -1):
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"join{level}")([x, skips[level]])
        x = _conv(layers, spec, spec.encoder[level], f"dec{level}", spec.separable_decoder)(x)
    logits = layers.Conv2D(spec.classes, 1, name="head")(x)
    mask = layers.Softmax(name="softmax")(logits)
    return tf.keras.Model(image, logits), tf.keras.Model(image, {OUTPUT: mask})


def _loss(digit_weight: float) -> Any:
    tf = image_models._tf()

    def loss(y_true: Any, logits: Any) -> Any:
        labels = tf.cast(y_true, tf.int32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        weights = tf.where(labels > 0, digit_weight, 1.0)
        return tf.reduce_sum(ce * weights) / tf.reduce_sum(weights)

    return loss


def train(
    spec: SegmenterSpec,
    images: np.ndarray,
    maps: np.ndarray,
    budget: SegmenterBudget,
    verbose: int = 0,
) -> Any:
    """The shipped Keras model, trained on ``images`` (uint8) and their class ``maps`` at
    the output grid; takes raw pixels. ``verbose``: Keras's per-epoch lines (2)."""
    tf = image_models._tf()
    tf.keras.utils.set_random_seed(budget.seed)
    tf.config.experimental.enable_op_determinism()
    train_model, model = build(spec)
    steps = budget.epochs * -(-len(images) // budget.batch_size)
    schedule = tf.keras.optimizers.schedules.CosineDecay(budget.learning_rate, steps)
    train_model.compile(tf.keras.optimizers.Adam(schedule), _loss(budget.digit_weight))
    data = tf.data.Dataset.from_tensor_slices((images, maps))
    data = data.shuffle(len(images), seed=budget.seed, reshuffle_each_iteration=True)
    data = data.batch(budget.batch_size).map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
    train_model.fit(data.prefetch(2), epochs=budget.epochs, shuffle=False, verbose=verbose)
    image_models.fold_input_scale(model, 1.0 / 255.0)
    return model


def to_tflite(model: Any, spec: SegmenterSpec, representative: np.ndarray) -> bytes:
    """The int8 edge artifact: uint8 input of batch 1 with the identity quantization, int8
    inside, a uint8 ``mask``; tensors named ``image`` and ``mask``."""
    fixed = build(spec, batch=1)[1]
    fixed.set_weights(model.get_weights())
    return image_models.fixed_to_tflite(fixed, representative)
