"""Image inputs of a served model: pictures in, the model's own tensor out.

An ONNX input with an ``[inputs.<name>]`` section in ``config.toml`` takes, besides tensors of
its own shape and datatype (checked as any input's), what an agent escalates when its
manifest's ``cloud.send`` is ``frame`` or ``encoded``:

- ``BYTES``: encoded JPEG or PNG pictures, one per batch row (shape ``[n]``, or ``[n, 1]``);
- ``UINT8``: frames of any size, ``[n, H, W, C]``, ``[H, W, C]`` or ``[H, W]`` (C 1, 3 or 4).

Each picture becomes one row of the model's tensor through ``shared.preprocess`` (the agent's
own preprocessing: decoding with its header-size cap, colour, resize, ``(x - mean) / std``,
quantization), so the batcher only ever sees tensors of the model's shape and pictures of
different sizes merge into one batch. Pictures are converted one at a time: a request holds
at most one decoded picture (under ``max_pixels``) besides its model-sized rows.
"""

from __future__ import annotations

import numpy as np
from pydantic import ValidationError

from cloud.serving.config import ImageInputConfig
from shared.contract import InputSpec
from shared.errors import ContractError, InvalidRequestError
from shared.oip.types import InferTensor, TensorMetadata
from shared.preprocess import Preprocessor

#: A request whose pictures are only frames of at most this many bytes is converted on the
#: event loop: resizing a 64 x 64 x 3 frame costs about what a hop to a worker thread does
#: (0.13 ms against 0.14 ms, ``Preprocessor.prepare`` timed on this project's build box).
#: Anything larger, and every encoded picture (its header can claim up to ``max_pixels``),
#: is converted in a worker thread.
INLINE_FRAME_BYTES = 16 * 1024


class ImageInput:
    """One image input: ``pictures`` says how many rows a request tensor holds (0 when it
    is the model's own tensor), ``convert`` makes them the model's rows."""

    def __init__(self, meta: TensorMetadata, config: ImageInputConfig) -> None:
        try:
            self.spec = InputSpec(
                name=meta.name,
                shape=meta.shape,
                datatype=meta.datatype,
                quantization=config.quantization,
                kind="image",
                image=config.image(),
            )
        except ValidationError as exc:
            problems = "; ".join(e["msg"] for e in exc.errors())
            raise ContractError(f"image input {meta.name!r} of config.toml: {problems}") from None
        self.name = meta.name
        self.datatype = meta.datatype
        #: The batch size the model fixes (None: a free first dimension).
        self.fixed_rows = meta.shape[0] if meta.shape[0] != -1 else None
        self._pre = Preprocessor([self.spec], config.max_pixels)
        self._takes = (
            f"input {meta.name!r} takes BYTES (encoded JPEG/PNG, one per row: shape [n]), "
            f"UINT8 frames ([n, H, W, C] or [H, W, C], any size) or {meta.datatype} of "
            f"shape {meta.shape}"
        )

    def pictures(self, tensor: InferTensor) -> int:
        """The pictures ``tensor`` holds (a 400 if none, or not a shape of pictures); 0 when
        it is the model's own tensor, for ``OnnxModel`` to check as any other."""
        datatype, shape = tensor.datatype, tensor.data.shape
        if datatype == "BYTES":
            if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
                rows = shape[0]
            else:
                raise InvalidRequestError(f"{self._takes}; got BYTES of shape {list(shape)}")
        elif datatype == "UINT8":  # frames, even into a uint8 model: as the agent reads them
            if len(shape) in (2, 3):
                rows = 1
            elif len(shape) == 4:
                rows = shape[0]
            else:
                raise InvalidRequestError(f"{self._takes}; got UINT8 of shape {list(shape)}")
        elif datatype == self.datatype:
            return 0
        else:
            raise InvalidRequestError(f"{self._takes}; got {datatype}")
        if rows == 0:
            raise InvalidRequestError(f"input {self.name!r} holds no picture")
        if self.fixed_rows is not None and rows != self.fixed_rows:
            raise InvalidRequestError(
                f"input {self.name!r} takes {self.fixed_rows} picture(s) per request, got {rows}"
            )
        return int(rows)

    def inline(self, tensor: InferTensor) -> bool:
        """Whether converting ``tensor`` costs less than a hop to a worker thread."""
        return tensor.datatype != "BYTES" and tensor.data.nbytes <= INLINE_FRAME_BYTES

    def convert(self, tensor: InferTensor) -> np.ndarray:
        """The model's rows for a tensor of pictures (``pictures`` checked it)."""
        data = tensor.data
        if tensor.datatype == "BYTES":
            values = list(data.reshape(-1))
        elif data.ndim == 4:
            values = list(data)
        else:
            values = [data]
        rows = [self._pre.prepare(v).tensors[self.name] for v in values]
        return rows[0] if len(rows) == 1 else np.concatenate(rows)
