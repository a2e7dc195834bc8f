"""Training the edge candidates with Keras: on labels, distilled from the cloud teacher, and
magnitude-pruned with fine-tuning. Every model takes raw features (the input scaling learnt
from the training split is folded into the first layer) and outputs logits.

Deterministic for a given seed (TensorFlow's op determinism is switched on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud.pipeline.data import Split


@dataclass(frozen=True)
class TrainSettings:
    hidden: tuple[int, ...]
    epochs: int
    seed: int = 7
    batch_size: int = 64
    learning_rate: float = 3e-3


def _tf() -> Any:
    import tensorflow as tf

    return tf


def input_scale(train: Split) -> float:
    """One scale for every feature, from the training split: networks train on [0, 1]."""
    top = float(np.abs(train.x).max())
    return 1.0 / top if top > 0 else 1.0


def mlp(features: int, hidden: tuple[int, ...], classes: int, learning_rate: float) -> Any:
    tf = _tf()
    layers: list[Any] = [tf.keras.Input((features,), name="input")]
    layers += [tf.keras.layers.Dense(width, activation="relu") for width in hidden]
    layers.append(tf.keras.layers.Dense(classes, name="logits"))
    model = tf.keras.Sequential(layers)
    model.compile(tf.keras.optimizers.Adam(learning_rate), _label_loss())
    return model


def _label_loss() -> Any:
    return _tf().keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _seed(seed: int) -> None:
    tf = _tf()
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def fold_scale(model: Any, scale: float) -> Any:
    """``W @ (s x) = (s W) @ x``: the model then takes raw features, and the device does no
    preprocessing (int8 input quantization absorbs the scale for free)."""
    first = next(layer for layer in model.layers if layer.get_weights())
    kernel, bias = first.get_weights()
    first.set_weights([kernel * scale, bias])
    return model


def unfold_scale(model: Any, scale: float) -> Any:
    return fold_scale(model, 1.0 / scale)


def train_on_labels(train: Split, classes: int, settings: TrainSettings) -> Any:
    _seed(settings.seed)
    scale = input_scale(train)
    model = mlp(train.x.shape[1], settings.hidden, classes, settings.learning_rate)
    model.fit(
        train.x * scale, train.y, epochs=settings.epochs, batch_size=settings.batch_size, verbose=0
    )
    return fold_scale(model, scale)


def distillation_loss(classes: int, temperature: float, alpha: float) -> Any:
    """Hinton et al. (2015): ``alpha`` of the teacher's softened distribution (KL at
    ``temperature``, times its square so gradients keep their size) and ``1 - alpha`` of the
    labels. ``y_true`` carries both: one-hot labels, then the teacher's log-probabilities."""
    tf = _tf()

    def loss(y_true: Any, logits: Any) -> Any:
        onehot, teacher_log = y_true[:, :classes], y_true[:, classes:]
        hard = tf.keras.losses.categorical_crossentropy(onehot, logits, from_logits=True)
        soft_teacher = tf.nn.softmax(teacher_log / temperature)
        soft_student = tf.nn.log_softmax(logits / temperature)
        kl = tf.reduce_sum(
            soft_teacher * (tf.math.log(soft_teacher + 1e-12) - soft_student), axis=-1
        )
        return alpha * temperature**2 * kl + (1.0 - alpha) * hard

    return loss


def train_distilled(
    train: Split,
    teacher_probs: np.ndarray,
    classes: int,
    settings: TrainSettings,
    temperature: float,
    alpha: float,
) -> Any:
    """The same architecture as ``train_on_labels``, taught by the teacher's soft outputs."""
    tf = _tf()
    _seed(settings.seed)
    scale = input_scale(train)
    model = mlp(train.x.shape[1], settings.hidden, classes, settings.learning_rate)
    model.compile(
        tf.keras.optimizers.Adam(settings.learning_rate),
        distillation_loss(classes, temperature, alpha),
    )
    targets = np.concatenate(
        [np.eye(classes, dtype=np.float32)[train.y], np.log(np.maximum(teacher_probs, 1e-12))],
        axis=1,
    ).astype(np.float32)
    model.fit(
        train.x * scale, targets, epochs=settings.epochs, batch_size=settings.batch_size, verbose=0
    )
    return fold_scale(model, scale)


def sparsity(model: Any) -> float:
    """The share of zero weights in the kernels (biases are not pruned)."""
    kernels = [layer.get_weights()[0] for layer in model.layers if layer.get_weights()]
    return float(sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels))


def prune(
    model: Any, train: Split, target: float, settings: TrainSettings, fine_tune_epochs: int
) -> Any:
    """Magnitude pruning (Han et al., 2015) to ``target`` sparsity per kernel, in three
    steps of rising sparsity, each followed by fine-tuning with the pruned weights held at
    zero. Returns a new model; ``model`` is left as it was."""
    tf = _tf()
    _seed(settings.seed)
    scale = input_scale(train)
    classes = model.layers[-1].get_weights()[1].shape[0]
    pruned = mlp(train.x.shape[1], settings.hidden, classes, settings.learning_rate / 3)
    pruned.set_weights(model.get_weights())
    unfold_scale(pruned, scale)  # fine-tune on the scaled inputs it was trained on
    dense = [layer for layer in pruned.layers if layer.get_weights()]
    masks: list[np.ndarray] = []

    class HoldZeros(tf.keras.callbacks.Callback):  # type: ignore[misc,name-defined]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            for layer, mask in zip(dense, masks, strict=True):
                kernel, bias = layer.get_weights()
                layer.set_weights([kernel * mask, bias])

    for step in (1, 2, 3):
        level = target * step / 3
        masks = []
        for layer in dense:
            kernel, bias = layer.get_weights()
            cut = np.quantile(np.abs(kernel), level) if level > 0 else -1.0
            mask = (np.abs(kernel) > cut).astype(kernel.dtype)
            layer.set_weights([kernel * mask, bias])
            masks.append(mask)
        pruned.fit(
            train.x * scale,
            train.y,
            epochs=max(1, fine_tune_epochs // 3),
            batch_size=settings.batch_size,
            verbose=0,
            callbacks=[HoldZeros()],
        )
    return fold_scale(pruned, scale)
