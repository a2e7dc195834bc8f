"""Shadow candidates for tests: a real digits TFLite model made deliberately worse.

``swapped_classes`` rewrites the float digits model's last layer so that two classes trade
places (its weights' rows and biases swapped): on those two digits it is always wrong, on
the others it answers as the original. Its template's golden labels are swapped to match,
so packaging signs it like any release. Built with TFLite's schema (``tests.tflite_builder``),
never TensorFlow itself.
"""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np

from shared.manifest import MANIFEST_FILE, Manifest
from tests.tflite_builder import tflite_schema


def swapped_classes(edge_dir: Path, out_dir: Path, a: int = 3, b: int = 8) -> Path:
    """A model folder (``model.tflite`` + a template ``manifest.json``) whose classes ``a``
    and ``b`` are swapped; ``edge_dir`` holds a float flat classifier (digits-f32)."""
    schema = tflite_schema()
    blob = (edge_dir / "model.tflite").read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    graph = model.subgraphs[0]
    classes = int(graph.tensors[graph.outputs[0]].shape[-1])
    swapped = 0
    for tensor in graph.tensors:
        data = model.buffers[tensor.buffer].data
        shape = [int(d) for d in tensor.shape]
        if data is None or not shape or shape[0] != classes:
            continue
        values = np.frombuffer(bytes(data), dtype=np.float32).reshape(shape).copy()
        values[[a, b]] = values[[b, a]]
        model.buffers[tensor.buffer].data = np.frombuffer(values.tobytes(), dtype=np.uint8)
        swapped += 1
    assert swapped == 2, f"expected the last layer's weights and bias, swapped {swapped}"
    builder = flatbuffers.Builder(len(blob) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.tflite").write_bytes(bytes(builder.Output()))
    template = Manifest.load(edge_dir)
    swap = {a: b, b: a}
    golden = [g.model_copy(update={"label": swap.get(g.label, g.label)}) for g in template.golden]
    (out_dir / MANIFEST_FILE).write_text(template.model_copy(update={"golden": golden}).to_json())
    return out_dir
