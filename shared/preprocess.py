"""Preprocessing: whatever a caller sends for a model's inputs, made into the tensors the model
takes (its datatype, quantized, batch dimension first, C-contiguous).

One ``Preprocessor`` per loaded model, built from ``manifest.inputs`` (a contract it cannot
serve is a ``ContractError`` there, not on a request); ``prepare(value)`` per request keeps
no state, so threads share it. The value is, for a one-input model, the input's value; for
any model, a dict of input name to value. Per input ``kind``:

- ``image``: JPEG or PNG bytes (an OIP ``BYTES`` element too), decoded by
  ``shared.images``; a uint8 frame ``H x W x C`` of any size (C 1 gray, 3 RGB, 4 RGBA whose
  alpha is dropped; or ``H x W``); or an array that is already the preprocessed tensor, of
  exactly the model's shape (the batch dimension optional): float values are quantized for
  an integer model, the model's own integer datatype is taken as quantized already. A
  picture is converted to the model's colour, resized per ``resize``
  (``shared.placement.fit``), normalised ``(x - mean) / std`` and quantized;
- ``tensor``: an array (or nested lists) of the input's shape (``-1`` dims take any size,
  the batch dimension is optional), then ``x * scale + offset`` and quantized or cast; an
  array of the input's own integer datatype is taken as quantized already;
- ``audio``: a waveform ``[n]`` or ``[1, n]``, float in [-1, 1] or int16 PCM (read as
  ``x / 32768``), ``n`` the input's window, then quantized or cast.

A uint8 frame of the model's size going into a uint8 model whose normalisation and
quantization cancel out goes in as it is: ``frame[None]``, a view, no copy. So does a float32
tensor already in the model's shape and datatype when its ``scale``/``offset`` do nothing.

Pixels are uint8, so normalise-then-quantize has 256 possible results per channel: one
lookup table per channel, made at load, turns each pixel into the model's value in one pass
written straight into the output (no float temporary). It is the same fold of mean, std,
scale and zero point into one step as the TFLite backend's multiply-add for features, at a
fifth (one table for all channels) to a third (one per channel) of the cost of a float
multiply, add, round and clip on a 224 x 224 x 3 picture. Letterbox padding is black, pixel
value 0 before normalisation, as MediaPipe's image-to-tensor converter pads for its
detectors (which letterbox).

``Prepared.real(name)`` gives the float32 values before quantization (what a cloud model
takes when ``send`` is ``tensor``), computed only when asked for: most requests never
escalate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from shared import images
from shared.contract import InputSpec, Quantization
from shared.errors import ContractError, InvalidRequestError
from shared.oip.types import numpy_dtype
from shared.placement import Fit, Placement, fit

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Prepared", "Preprocessor"]

_Thunk = Callable[[], np.ndarray]
_ENCODED = (bytes, bytearray, memoryview)
#: dtype kinds a numeric input accepts: bool, signed and unsigned integers, floats
_NUMERIC = "biuf"
_PCM = Quantization(scale=1 / 32768, zero_point=0)


@dataclass(eq=False)
class Prepared:
    """One request's inputs, ready for the model.

    ``tensors``: by input name, model-ready. ``placement``: where the (first) image input's
    picture sits in the caller's frame, for boxes and masks. ``encoded``: the picture's bytes
    as the caller sent them (``send = "encoded"``). ``frame``: the caller's uint8 frame,
    ``H x W x C`` (C 1 or 3; for encoded bytes, the decoded picture at full size, decoded
    only when asked for: ``send = "frame"``)."""

    tensors: dict[str, np.ndarray]
    placement: Placement | None = None
    encoded: bytes | None = None
    _frame: np.ndarray | _Thunk | None = field(default=None, repr=False)
    _real: dict[str, _Thunk] = field(default_factory=dict, repr=False)
    _done: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def frame(self) -> np.ndarray | None:
        if callable(self._frame):
            self._frame = self._frame()
        return self._frame

    def real(self, name: str) -> np.ndarray:
        """Input ``name`` as float32 before quantization (batch dimension first)."""
        if name not in self._done:
            try:
                thunk = self._real[name]
            except KeyError:
                raise InvalidRequestError(f"no input {name!r}") from None
            self._done[name] = thunk()
        return self._done[name]


class _Out(NamedTuple):
    tensor: np.ndarray
    real: _Thunk
    placement: Placement | None = None
    frame: np.ndarray | _Thunk | None = None
    encoded: bytes | None = None


class Preprocessor:
    """Turns request values into model inputs per ``inputs`` (see the module doc). Pictures
    over ``max_pixels`` (width x height) are refused before they are decoded."""

    def __init__(self, inputs: list[InputSpec], max_pixels: int) -> None:
        if not inputs:
            raise ContractError("a model needs at least one input")
        self.inputs = inputs
        self._plans: dict[str, _Plan] = {}
        for spec in inputs:
            plan: _Plan
            if spec.kind == "image":
                plan = _ImagePlan(spec, max_pixels)
            elif spec.kind == "audio":
                plan = _AudioPlan(spec)
            else:
                plan = _TensorPlan(spec)
            self._plans[spec.name] = plan

    def warm(self) -> None:
        """Put a black picture of twice the size through each image input, so the first
        request does not pay for importing Pillow and its first resize (17 ms on the build
        machine, several times that on a Pi). For the agent to call at load, if it chooses
        to pay that for an image model before any picture arrives."""
        for plan in self._plans.values():
            if isinstance(plan, _ImagePlan):
                plan.prepare(np.zeros((2 * plan.h, 2 * plan.w, 3), np.uint8))

    def prepare(self, value: object) -> Prepared:
        values = self._by_name(value)
        prepared = Prepared({})
        for name, plan in self._plans.items():
            out = plan.prepare(values[name])
            prepared.tensors[name] = out.tensor
            prepared._real[name] = out.real
            if out.placement is not None and prepared.placement is None:
                prepared.placement, prepared._frame = out.placement, out.frame
                prepared.encoded = out.encoded
        return prepared

    def _by_name(self, value: object) -> Mapping[Any, object]:
        names = list(self._plans)
        if isinstance(value, Mapping):
            if set(value) != set(names):
                missing = [n for n in names if n not in value]
                unknown = sorted(str(k) for k in value if k not in self._plans)
                raise InvalidRequestError(
                    f"the model's inputs are {names}; missing {missing}, unknown {unknown}"
                )
            return value
        if len(names) > 1:
            raise InvalidRequestError(
                f"the model takes {len(names)} inputs {names}: pass a dict of name to value"
            )
        return {names[0]: value}


class _Plan:
    """One input's preprocessing, fixed at load."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.name = spec.name
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind not in _NUMERIC:
            raise ContractError(f"input {spec.name!r}: {spec.datatype} inputs are not supported")
        self.dtype = dtype

    def prepare(self, value: object) -> _Out:
        raise NotImplementedError

    def _numeric(self, value: object, what: str) -> np.ndarray:
        """``value`` as a numeric array, or a 400 saying what was expected."""
        if isinstance(value, np.ndarray):
            x = value
        elif isinstance(value, list | tuple | int | float | np.generic):
            try:
                x = np.asarray(value)
            except (ValueError, TypeError) as exc:  # ragged lists
                raise InvalidRequestError(f"input {self.name!r}: {what}; {exc}") from None
        else:
            raise InvalidRequestError(f"input {self.name!r}: {what}; got {type(value).__name__}")
        if x.dtype.kind not in _NUMERIC:
            raise InvalidRequestError(f"input {self.name!r}: {what}; got dtype {x.dtype}")
        if x.dtype.kind == "f" and x.size and not _finite(x):
            raise InvalidRequestError(f"input {self.name!r} holds NaN or infinite values")
        return x


class _TensorPlan(_Plan):
    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self.affine = (spec.scale, spec.offset) != (1.0, 0.0)

    def prepare(self, value: object) -> _Out:
        spec = self.spec
        want = f"expected {spec.datatype} of shape {spec.shape}"
        x = self._numeric(value, want)
        if x.ndim == len(spec.shape) - 1:
            x = x[None]
        if not spec.accepts(x.shape):
            raise InvalidRequestError(
                f"input {self.name!r}: {want}, got {x.dtype} of shape {list(x.shape)}"
            )
        if x.dtype == self.dtype and (self.dtype.kind != "f" or not self.affine):
            # the model's own datatype: already model-ready (quantized, for an integer one)
            tensor = _contiguous(x)
            return _Out(tensor, lambda: _dequantize(tensor, self.spec.quantization))
        real = x * np.float32(spec.scale) + np.float32(spec.offset) if self.affine else x
        return _Out(_to_model(real, self.dtype, spec.quantization, self.name), lambda: _f32(real))


class _AudioPlan(_Plan):
    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        assert spec.audio is not None
        self.audio = spec.audio
        batched = len(spec.shape) > 1  # a leading dimension is the batch: 1
        self.dims = [1 if i == 0 and batched else d for i, d in enumerate(spec.shape)]
        if self.dims.count(-1) > 1:
            raise ContractError(f"audio input {spec.name!r}: shape {spec.shape} is ambiguous")
        fixed = -1 not in self.dims
        self.window = spec.audio.window or (math.prod(self.dims) if fixed else None)
        self.quant = spec.quantization
        if self.dtype.kind in "iu" and self.quant is None:
            if self.dtype != np.int16:
                raise ContractError(f"audio input {spec.name!r} of {spec.datatype} needs a scale")
            self.quant = _PCM  # an int16 input without quantization takes PCM samples

    def prepare(self, value: object) -> _Out:
        want = "a waveform [n] or [1, n] of float in [-1, 1] or int16 PCM"
        x = self._numeric(value, want)
        if x.ndim == 2 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 1 or x.size == 0:
            raise InvalidRequestError(f"input {self.name!r}: {want}; got shape {list(x.shape)}")
        n = x.shape[0]
        if self.window is not None and n != self.window:
            raise InvalidRequestError(
                f"audio input {self.name!r} takes a window of {self.window} samples "
                f"({self.window / self.audio.sample_rate:g} s at {self.audio.sample_rate} Hz), "
                f"got {n}"
            )
        shape = [n if d == -1 else d for d in self.dims]
        if math.prod(shape) != n:
            raise InvalidRequestError(
                f"audio input {self.name!r}: {n} samples do not make its shape {shape}"
            )
        if x.dtype == np.int16:
            if self.dtype == np.int16 and self.quant == _PCM:
                tensor = _contiguous(x).reshape(shape)
                return _Out(tensor, lambda: _dequantize(tensor, _PCM))
            real = x * np.float32(1 / 32768)
        elif x.dtype.kind == "f":
            peak = max(-float(np.min(x)), float(np.max(x)))
            if peak > 1.0:
                raise InvalidRequestError(
                    f"audio input {self.name!r}: float samples must be within [-1, 1] (got "
                    f"{peak:g}); int16 PCM is read as x / 32768"
                )
            real = x
        else:
            raise InvalidRequestError(f"input {self.name!r}: {want}; got dtype {x.dtype}")
        tensor = _to_model(real, self.dtype, self.quant, self.name).reshape(shape)
        return _Out(tensor, lambda: _f32(real).reshape(shape))


class _ImagePlan(_Plan):
    def __init__(self, spec: InputSpec, max_pixels: int) -> None:
        super().__init__(spec)
        assert spec.image is not None
        image = spec.image
        self.max_pixels = max_pixels
        self.h, self.w, self.c = spec.image_dims
        self.nchw = image.layout == "NCHW"
        self.shape = (1, self.c, self.h, self.w) if self.nchw else (1, self.h, self.w, self.c)
        self.mode = image.resize
        self.gray = image.colour == "GRAY"
        self.bgr = image.colour == "BGR"
        if self.dtype.kind == "b":
            raise ContractError(f"image input {spec.name!r} cannot be {spec.datatype}")
        mean = _per_channel(image.mean, self.c, "mean", spec.name)
        std = _per_channel(image.std, self.c, "std", spec.name)
        real = (np.arange(256, dtype=np.float64)[None, :] - mean[:, None]) / std[:, None]
        self.real_lut = real.astype(np.float32)
        try:
            self.lut = _to_model(real, self.dtype, spec.quantization, spec.name)
        except InvalidRequestError as exc:  # (x - mean) / std that its datatype cannot hold
            raise ContractError(
                f"{exc.message}: image input {spec.name!r} needs a quantization"
            ) from None
        self.shared_lut = bool((self.lut == self.lut[0]).all())
        self.identity = (
            self.dtype == np.uint8
            and not self.bgr
            and (self.c == 1 or not self.nchw)
            and bool((self.lut == np.arange(256)).all())
        )
        self.want = (
            f"image input {spec.name!r} takes JPEG/PNG bytes, a uint8 frame (H x W x C) or "
            f"the preprocessed tensor of shape {list(self.shape)}"
        )

    def prepare(self, value: object) -> _Out:
        if isinstance(value, _ENCODED):
            return self._encoded(bytes(value))
        if isinstance(value, np.ndarray):
            if value.dtype == object and value.size == 1 and isinstance(value.flat[0], _ENCODED):
                return self._encoded(bytes(value.flat[0]))  # an OIP BYTES element
            if value.dtype == np.uint8:
                return self._frame(value)
        return self._tensor(self._numeric(value, self.want))

    def _encoded(self, data: bytes) -> _Out:
        picture = images.open_image(data, self.max_pixels)
        how = fit(self.mode, picture.height, picture.width, self.h, self.w)
        x0, y0, x1, y1 = how.region
        fw, fh = how.size
        decoded = picture.decode(
            self.gray,
            (math.ceil(fw * picture.width / (x1 - x0)), math.ceil(fh * picture.height / (y1 - y0))),
        )
        # the region in the decoded image's pixels (smaller ones, if JPEG decoded it reduced)
        bx0, by0, bx1, by1 = decoded.box
        kx, ky = (bx1 - bx0) / picture.width, (by1 - by0) / picture.height
        box = (bx0 + x0 * kx, by0 + y0 * ky, bx0 + x1 * kx, by0 + y1 * ky)
        if decoded.image.size == how.size and box == (0.0, 0.0, float(fw), float(fh)):
            pixels = decoded.array()
        else:
            pixels = images.resize(decoded.image, how.size, box)
        tensor = self._fill(pixels, how, self.lut, self.dtype)
        real = self._real_of(pixels, how)
        frame = partial(images.decode_image, data, self.max_pixels)
        return _Out(tensor, real, how.placement, frame, data)

    def _frame(self, value: np.ndarray) -> _Out:
        a = value[0] if value.ndim == 4 and value.shape[0] == 1 else value
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3:
            raise InvalidRequestError(f"{self.want}; got a uint8 array of shape {list(a.shape)}")
        h, w, channels = a.shape
        if channels not in (1, 3, 4):
            raise InvalidRequestError(
                f"input {self.name!r}: frame has {channels} channels, the model takes {self.c} "
                "(a frame is H x W or H x W x 1 gray, H x W x 3 RGB, H x W x 4 RGBA)"
            )
        if h * w == 0 or h * w > self.max_pixels:
            raise InvalidRequestError(
                f"input {self.name!r}: a frame of {w}x{h} (at least one pixel, at most "
                f"{self.max_pixels:,}: images.max_pixels)"
            )
        if channels == 4:
            a = a[..., :3]  # RGBA: alpha dropped
        how = fit(self.mode, h, w, self.h, self.w)
        same_channels = a.shape[2] == self.c
        if how.identity and self.identity and same_channels and a.flags.c_contiguous:
            tensor = a.reshape(self.shape)  # a view: the frame goes in as it is
            return _Out(tensor, self._real_of(a, how), how.placement, a)
        source: np.ndarray | Image.Image = a
        if self.gray and a.shape[2] == 3:
            source = images.to_gray(a)
        if how.identity:
            pixels = source if isinstance(source, np.ndarray) else np.asarray(source)[..., None]
        else:
            pixels = images.resize(source, how.size, how.region)
        tensor = self._fill(pixels, how, self.lut, self.dtype)
        return _Out(tensor, self._real_of(pixels, how), how.placement, a)

    def _tensor(self, x: np.ndarray) -> _Out:
        if x.shape == self.shape[1:]:
            x = x[None]
        if x.shape != self.shape:
            raise InvalidRequestError(f"{self.want}; got {x.dtype} of shape {list(x.shape)}")
        if x.dtype == self.dtype:
            tensor = _contiguous(x)
            return _Out(tensor, lambda: _dequantize(tensor, self.spec.quantization))
        return _Out(_to_model(x, self.dtype, self.spec.quantization, self.name), lambda: _f32(x))

    def _real_of(self, pixels: np.ndarray, how: Fit) -> _Thunk:
        return lambda: self._fill(pixels, how, self.real_lut, np.dtype(np.float32))

    def _fill(self, pixels: np.ndarray, how: Fit, luts: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """The model's picture from ``pixels`` (``h x w x 1|3`` uint8, already the size
        ``how`` says) through one lookup table per channel, padded as ``how`` says."""
        out = np.empty(self.shape, dtype=dtype)
        (px, py), (fw, fh) = how.pad, how.size
        if how.padded:  # letterbox: black, normalised and quantized
            out[0] = luts[:, 0][:, None, None] if self.nchw else luts[:, 0]
        if self.nchw:
            inner = out[0, :, py : py + fh, px : px + fw]
        else:
            inner = out[0, py : py + fh, px : px + fw, :]
        gray_in = pixels.shape[2] == 1
        if self.shared_lut and not self.nchw:
            if gray_in:
                src = np.broadcast_to(pixels, inner.shape)
            else:
                src = pixels[..., ::-1] if self.bgr else pixels
            np.take(luts[0], src, out=inner, mode="clip")  # clip: no buffering (in range)
            return out
        for c in range(self.c):
            k = 0 if gray_in else (self.c - 1 - c if self.bgr else c)
            dst = inner[c] if self.nchw else inner[..., c]
            np.take(luts[c], pixels[..., k], out=dst, mode="clip")
        return out


def _per_channel(values: list[float], channels: int, what: str, name: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float64)
    if len(values) != channels:
        raise ContractError(
            f"image input {name!r}: {len(values)} {what} values for {channels} channels"
        )
    return np.asarray(values, dtype=np.float64)


def _finite(x: np.ndarray) -> bool:
    """No NaN or infinity, without a boolean temporary (min and max propagate NaN); the raw
    reductions, as ``np.min``'s wrapper costs more than a feature vector's whole check."""
    lo, hi = np.minimum.reduce(x, axis=None), np.maximum.reduce(x, axis=None)
    return math.isfinite(lo) and math.isfinite(hi)


def _contiguous(x: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """C-contiguous, in ``dtype`` if given, copied only if it is not already; a 0-d array
    stays 0-d (``np.ascontiguousarray`` makes it 1-d: silero-vad's ``sr`` input is 0-d)."""
    return np.require(x, dtype, "C")


def _f32(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _dequantize(q: np.ndarray, quant: Quantization | None) -> np.ndarray:
    if quant is None or q.dtype.kind == "f":
        return _f32(q)
    return (q.astype(np.float32) - np.float32(quant.zero_point)) * np.float32(quant.scale)


def _to_model(
    real: np.ndarray, dtype: np.dtype, quant: Quantization | None, name: str
) -> np.ndarray:
    """Real values to the model's datatype: quantized (``real / scale + zero_point``,
    rounded half to even as the TFLite backend does, saturated) for an integer input with a
    quantization, cast for a float one. An integer input without one takes integers in its
    range (token ids, flags), and refuses anything else."""
    if dtype.kind == "f":
        return _contiguous(real, dtype)
    if dtype.kind == "b":
        if real.dtype.kind != "b" and real.size and not np.isin(real, (0, 1)).all():
            raise InvalidRequestError(f"input {name!r} is BOOL: values must be 0 or 1")
        return _contiguous(real, dtype)
    info = np.iinfo(dtype)
    if quant is not None:
        precise = np.float64 if real.dtype == np.float64 else np.float32
        q = np.multiply(real, precise(1 / quant.scale), dtype=precise)
        if quant.zero_point:
            np.add(q, precise(quant.zero_point), out=q)
        np.rint(q, out=q)
        np.clip(q, info.min, info.max, out=q)
        quantized: np.ndarray = q.astype(dtype)
        return quantized
    if real.size:
        if real.dtype.kind == "f" and not (real == np.rint(real)).all():
            raise InvalidRequestError(f"input {name!r} takes integers ({dtype}); got fractions")
        lo, hi = np.min(real), np.max(real)
        if lo < info.min or hi > info.max:
            raise InvalidRequestError(
                f"input {name!r} takes {dtype} values in [{info.min}, {info.max}]; got [{lo}, {hi}]"
            )
    return _contiguous(real, dtype)
