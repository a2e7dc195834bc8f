"""Small TFLite files written for tests, without TensorFlow's converter: a model built op by
op, and TFLite Metadata written into a model as TFLite Support's writer does.

Both use TFLite's generated schema module (``schema_py_generated``, part of TensorFlow's
files, loaded by path so TensorFlow itself is never imported: a second, not a minute) and
the ``flatbuffers`` runtime. The metadata writer builds ``ModelMetadata`` tables by field
id (``metadata_schema.fbs``); packaging's reader (``cloud.releases.tflite_file``) is
checked against real MediaPipe files too, so the two do not merely agree with each other.
"""

from __future__ import annotations

import importlib.util
import io
import zipfile
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import flatbuffers
import numpy as np


@cache
def tflite_schema() -> ModuleType:
    """TFLite's generated schema module, loaded from TensorFlow's files without importing
    TensorFlow (only ``flatbuffers`` and NumPy)."""
    spec = importlib.util.find_spec("tensorflow")
    assert spec is not None and spec.submodule_search_locations, "the build extra has TF"
    path = Path(next(iter(spec.submodule_search_locations))) / "lite/python/schema_py_generated.py"
    loaded = importlib.util.spec_from_file_location("_tflite_schema", path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _table(b: flatbuffers.Builder, fields: dict[int, tuple[str, Any]]) -> int:
    """A table of ``fields``: id -> ("offset" | "byte" | "ubyte", value)."""
    b.StartObject(max(fields) + 1)
    for slot, (kind, value) in sorted(fields.items()):
        if kind == "offset":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "byte":
            b.PrependInt8Slot(slot, value, 0)
        else:
            b.PrependUint8Slot(slot, value, 0)
    return int(b.EndObject())


def metadata_buffer(
    *,
    colour: int = 2,
    mean: float = 127.5,
    std: float = 127.5,
    labels_file: str | None = "emotions.txt",
    label_type: int = 2,
) -> bytes:
    """A ``ModelMetadata`` for a one-input, one-output image classifier: the input an image
    (``colour``: 1 RGB, 2 GRAYSCALE) with NormalizationOptions, the output with an
    associated labels file (``label_type`` 2: TENSOR_AXIS_LABELS, 3: TENSOR_VALUE_LABELS)."""
    b = flatbuffers.Builder(1024)
    out_fields: dict[int, tuple[str, Any]] = {0: ("offset", b.CreateString("probability"))}
    if labels_file is not None:
        name = b.CreateString(labels_file)
        associated = _table(b, {0: ("offset", name), 2: ("byte", label_type)})
        out_fields[6] = ("offset", _vector(b, [associated]))
    output = _table(b, out_fields)
    means = b.CreateNumpyVector(np.array([mean], dtype=np.float32))
    stds = b.CreateNumpyVector(np.array([std], dtype=np.float32))
    normalization = _table(b, {0: ("offset", means), 1: ("offset", stds)})
    unit = _table(b, {0: ("ubyte", 1), 1: ("offset", normalization)})  # NormalizationOptions
    image = _table(b, {0: ("byte", colour)})  # ImageProperties.color_space
    content = _table(b, {0: ("ubyte", 2), 1: ("offset", image)})  # ContentProperties.Image
    in_name = b.CreateString("image")
    inp = _table(
        b, {0: ("offset", in_name), 3: ("offset", content), 4: ("offset", _vector(b, [unit]))}
    )
    subgraph = _table(b, {2: ("offset", _vector(b, [inp])), 3: ("offset", _vector(b, [output]))})
    model_name = b.CreateString("emotions with metadata")
    root = _table(b, {0: ("offset", model_name), 3: ("offset", _vector(b, [subgraph]))})
    b.Finish(root, file_identifier=b"M001")
    return bytes(b.Output())


def with_metadata(blob: bytes, metadata: bytes, files: dict[str, bytes]) -> bytes:
    """``blob`` with ``metadata`` as its TFLITE_METADATA buffer (instead of any it had) and
    ``files`` zipped onto its end, as TFLite Support's MetadataPopulator writes them."""
    schema = tflite_schema()
    model = schema.ModelT.InitFromPackedBuf(blob, 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = "TFLITE_METADATA"
    entry.buffer = len(model.buffers) - 1
    # replacing any metadata the model had (MediaPipe's models carry some)
    kept = [
        m for m in model.metadata or [] if m.name not in (b"TFLITE_METADATA", "TFLITE_METADATA")
    ]
    model.metadata = [*kept, entry]
    b = flatbuffers.Builder(len(blob) + len(metadata) + 1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    out = io.BytesIO(bytes(b.Output()))
    if files:
        with zipfile.ZipFile(out, "a") as z:
            for name, data in files.items():
                z.writestr(name, data)
    return out.getvalue()


def waveform_model(samples: int = 16000) -> bytes:
    """A raw 1-D waveform model: ``waveform`` [samples] float32 -> ``loudness`` [1], the
    mean absolute sample (ABS then MEAN over axis 0, keep_dims)."""
    s = tflite_schema()

    def tensor(name: str, shape: list[int], kind: int, buffer: int) -> Any:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, kind, buffer
        return t

    def code(builtin: int) -> Any:
        c = s.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = builtin
        c.version = 1
        return c

    absolute = s.OperatorT()
    absolute.opcodeIndex, absolute.inputs, absolute.outputs = 0, [0], [3]
    mean = s.OperatorT()
    mean.opcodeIndex, mean.inputs, mean.outputs = 1, [3, 1], [2]
    mean.builtinOptionsType = s.BuiltinOptions.ReducerOptions
    mean.builtinOptions = s.ReducerOptionsT()
    mean.builtinOptions.keepDims = True
    graph = s.SubGraphT()
    float32, int32 = s.TensorType.FLOAT32, s.TensorType.INT32
    graph.tensors = [
        tensor("waveform", [samples], float32, 0),
        tensor("axis", [1], int32, 1),
        tensor("loudness", [1], float32, 0),
        tensor("magnitude", [samples], float32, 0),
    ]
    graph.inputs, graph.outputs, graph.operators = [0], [2], [absolute, mean]
    graph.name = "main"
    axis = s.BufferT()
    axis.data = np.zeros(1, dtype=np.int32).view(np.uint8)
    model = s.ModelT()
    model.version = 3
    model.description = "waveform loudness"
    model.operatorCodes = [code(s.BuiltinOperator.ABS), code(s.BuiltinOperator.MEAN)]
    model.subgraphs = [graph]
    model.buffers = [s.BufferT(), axis]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())
