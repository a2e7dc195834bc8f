"""What a ``.tflite`` file says about itself beyond what its interpreter reports.

- its subgraph's input and output tensor *names* in order, and the custom operators it
  needs (so a model the runtime cannot run is refused naming the op);
- its TFLite Metadata (``metadata_schema.fbs``, stored in the ``TFLITE_METADATA`` buffer):
  per input, whether it is an image, its colour space and the ``NormalizationOptions``
  mean/std; per output, the content (a feature, or bounding boxes with their corner order
  and coordinate type), the label files associated with it (``TENSOR_AXIS_LABELS``: line
  *i* names index *i* of the last axis; ``TENSOR_VALUE_LABELS``: a value names a line) and
  a score threshold;
- the associated files themselves, which the metadata writer appends to the flatbuffer as
  a zip archive (``zipfile`` finds the archive at the file's end).

Field ids below are those of the two schemas (TFLite ``schema.fbs`` and
``tensorflow_lite_support/metadata/metadata_schema.fbs``, schema version 1.x); a union
takes two ids, its type and its value.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

from cloud.releases.flatbuf import Table
from shared.contract import BoxFormat, Colour
from shared.errors import ContractError

#: The flatbuffer file identifier of a TFLite model (bytes 4-8).
TFLITE_IDENTIFIER = b"TFL3"
METADATA_NAME = "TFLITE_METADATA"
_CUSTOM = 32  # BuiltinOperator.CUSTOM
#: VAR_HANDLE, READ_VARIABLE, ASSIGN_VARIABLE: resource variables, the state a streaming
#: model (a keyword spotter) keeps from one call to the next.
_VARIABLE_OPS = frozenset({142, 143, 144})
#: Most bytes read out of the associated-files zip (labels and the like are small).
MAX_ASSOCIATED_BYTES = 16 * 1024 * 1024

# AssociatedFileType
_AXIS_LABELS, _VALUE_LABELS = 2, 3
# ContentProperties union members
_IMAGE, _BOXES = 2, 3
# ProcessUnitOptions union members
_NORMALIZATION, _THRESHOLD = 1, 3


@dataclass(frozen=True)
class AssociatedFile:
    name: str
    #: ``axis``: labels of the last axis; ``value``: labels of the tensor's values
    #: (class ids); ``other``: anything else (descriptions, vocabularies).
    kind: str


@dataclass(frozen=True)
class TensorMetadata:
    name: str | None = None
    image: bool = False
    colour: Colour | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    boxes: bool = False
    box_format: BoxFormat | None = None
    box_normalized: bool = True
    score_threshold: float | None = None
    files: list[AssociatedFile] = field(default_factory=list)

    def labels_file(self) -> AssociatedFile | None:
        """The first label file (the metadata's convention when there are several)."""
        return next((f for f in self.files if f.kind in ("axis", "value")), None)


@dataclass(frozen=True)
class TFLiteFile:
    inputs: list[str]
    outputs: list[str]
    custom_ops: list[str]
    #: The model keeps state in resource variables between calls.
    stateful: bool = False
    #: None when the model carries no TFLite Metadata.
    metadata_name: str | None = None
    input_meta: list[TensorMetadata] = field(default_factory=list)
    output_meta: list[TensorMetadata] = field(default_factory=list)
    #: The associated files embedded in the model, by name.
    embedded: dict[str, bytes] = field(default_factory=dict)

    @property
    def has_metadata(self) -> bool:
        return self.metadata_name is not None or bool(self.input_meta or self.output_meta)


def is_tflite(blob: bytes) -> bool:
    return len(blob) >= 8 and blob[4:8] == TFLITE_IDENTIFIER


def read_tflite(blob: bytes) -> TFLiteFile:
    """Parse ``blob`` (a ``.tflite`` file). ``ContractError`` if it is not one, or is cut."""
    if not is_tflite(blob):
        raise ContractError("not a TFLite model (no TFL3 flatbuffer identifier)")
    model = Table.root(blob)
    subgraphs = model.tables(2)
    if not subgraphs:
        raise ContractError("the TFLite model has no subgraph")
    graph = subgraphs[0]
    tensors = graph.tables(0)

    def names(field_id: int) -> list[str]:
        out = []
        for i in graph.numbers(field_id, "i"):
            if not 0 <= i < len(tensors):
                raise ContractError("the TFLite model names a tensor it does not have")
            out.append(tensors[int(i)].text(3) or f"tensor_{int(i)}")
        return out

    custom = []
    builtins = set()
    for code in model.tables(1):
        builtin = max(code.integer(0, "b"), code.integer(3, "i"))
        builtins.add(builtin)
        if builtin == _CUSTOM:
            custom.append(code.text(1) or "?")
    result = TFLiteFile(
        inputs=names(1),
        outputs=names(2),
        custom_ops=custom,
        stateful=bool(builtins & _VARIABLE_OPS),
    )
    meta = _metadata_buffer(blob, model)
    if meta is None:
        return result
    root = Table.root(meta)
    sub = root.tables(3)
    graph_meta = sub[0] if sub else None
    return TFLiteFile(
        inputs=result.inputs,
        outputs=result.outputs,
        custom_ops=custom,
        stateful=result.stateful,
        metadata_name=root.text(0) or "",
        input_meta=[_tensor_meta(t) for t in graph_meta.tables(2)] if graph_meta else [],
        output_meta=[_tensor_meta(t) for t in graph_meta.tables(3)] if graph_meta else [],
        embedded=_embedded_files(blob),
    )


def _metadata_buffer(blob: bytes, model: Table) -> memoryview | None:
    buffers = model.tables(4)
    for entry in model.tables(6):
        if entry.text(0) != METADATA_NAME:
            continue
        index = entry.integer(1, "I")
        if index >= len(buffers):
            raise ContractError("the TFLite model's metadata points at a missing buffer")
        buffer = buffers[index]
        data = buffer.blob(0)
        if not len(data) and buffer.integer(1, "Q"):  # a model over 2 GB keeps buffers outside
            start, size = buffer.integer(1, "Q"), buffer.integer(2, "Q")
            if start + size > len(blob):
                raise ContractError("the TFLite model's metadata buffer is truncated")
            data = memoryview(blob)[start : start + size]
        return data if len(data) >= 8 else None
    return None


def _tensor_meta(t: Table) -> TensorMetadata:
    image = boxes = False
    colour: Colour | None = None
    box_format: BoxFormat | None = None
    normalized = True
    content = t.table(3)
    if content is not None:
        kind = content.integer(0)
        props = content.table(1)
        if kind == _IMAGE and props is not None:
            image = True
            colour = {1: "RGB", 2: "GRAY"}.get(props.integer(0, "b"))  # type: ignore[assignment]
        elif kind == _BOXES and props is not None:
            boxes = True
            box_format = _box_format(props.integer(1, "b"), props.numbers(0, "I"))
            normalized = props.integer(2, "b") == 0  # RATIO; PIXEL is 1
    mean = std = None
    threshold = None
    for unit in t.tables(4):
        options = unit.table(1)
        if options is None:
            continue
        if unit.integer(0) == _NORMALIZATION:
            mean, std = options.numbers(0, "f") or None, options.numbers(1, "f") or None
        elif unit.integer(0) == _THRESHOLD:
            threshold = options.real(0)
    files = [
        AssociatedFile(
            name=f.text(0) or "",
            kind={_AXIS_LABELS: "axis", _VALUE_LABELS: "value"}.get(f.integer(2, "b"), "other"),
        )
        for f in t.tables(6)
    ]
    return TensorMetadata(
        name=t.text(0),
        image=image,
        colour=colour,
        mean=mean,
        std=std,
        boxes=boxes,
        box_format=box_format,
        box_normalized=normalized,
        score_threshold=threshold,
        files=files,
    )


_DEFAULT_ORDER = {1: ("x1", "y1", "x2", "y2"), 2: ("x1", "y1", "w", "h"), 3: ("cx", "cy", "w", "h")}
_FORMATS: dict[tuple[str, ...], BoxFormat] = {
    ("x1", "y1", "x2", "y2"): "xyxy",
    ("y1", "x1", "y2", "x2"): "yxyx",
    ("x1", "y1", "w", "h"): "xywh",
    ("cx", "cy", "w", "h"): "cxcywh",
}


def _box_format(kind: int, index: list[float]) -> BoxFormat | None:
    """The corner order of a ``BoundingBoxProperties``: ``index[k]`` is where the type's
    k-th default element sits in the tensor (SSD's ``BOUNDARIES`` with index
    ``[1, 0, 3, 2]`` is top, left, bottom, right: ``yxyx``). None: an order Tandem has no
    name for (the contract file must then say ``box_format``)."""
    default = _DEFAULT_ORDER.get(kind)
    if default is None:
        return None
    if not index:
        return _FORMATS.get(default)
    if sorted(int(i) for i in index) != [0, 1, 2, 3]:
        return None
    order = [""] * 4
    for element, position in zip(default, index):
        order[int(position)] = element
    return _FORMATS.get(tuple(order))


def _embedded_files(blob: bytes) -> dict[str, bytes]:
    """The zip the metadata writer appends to the model: name -> bytes."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            if sum(i.file_size for i in infos) > MAX_ASSOCIATED_BYTES:
                raise ContractError("the model's associated files are too large to read")
            return {i.filename: z.read(i) for i in infos}
    except zipfile.BadZipFile:
        return {}
    except (OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise ContractError(f"the model's associated files cannot be read: {exc}") from None
