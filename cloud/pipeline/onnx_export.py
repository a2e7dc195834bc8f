"""A Keras conv net of ``cloud.pipeline.image_models`` written out as an ONNX graph with
``onnx.helper``, from its weights: there is no converter for TensorFlow 2.21 / Keras 3 in
the environment (tf2onnx does not install beside it), and the nets use a handful of ops.

The graph takes what the Keras model takes, ``image`` ``[batch, S, S, 3]`` float32 raw
pixels (NHWC, batch dynamic), transposes once to ONNX's NCHW for the convolutions, and
gives the same outputs by the same names: ``logits`` ``[batch, C]`` for a classifier,
``boxes`` ``[batch, N, 4]`` and ``scores`` ``[batch, N, C]`` for a detector (the head is
transposed back to NHWC before its reshape, so cells come in Keras's row-major order).
Opset 17, IR version 8: readable by every ONNX Runtime of the last years.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloud.pipeline.image_models import INPUT, LOGIT_BOUND, NetSpec, box_matrix


class _Graph:
    """Nodes and initializers, added in order; ``add`` returns the node's output name."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(value, name))
        return name

    def add(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _conv(g: _Graph, x: str, layer: Any, name: str) -> str:
    kernel, bias = layer.get_weights()  # Keras: [kh, kw, in, out]; ONNX: [out, in, kh, kw]
    kh, kw = kernel.shape[:2]
    w = g.const(f"{name}.w", np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), np.float32))
    b = g.const(f"{name}.b", bias.astype(np.float32))
    pads = [kh // 2, kw // 2, kh // 2, kw // 2]  # "same" for odd kernels at stride 1
    return g.add("Conv", [x, w, b], name, kernel_shape=[kh, kw], pads=pads)


def _gemm(g: _Graph, x: str, layer: Any, name: str) -> str:
    kernel, bias = layer.get_weights()
    w = g.const(f"{name}.w", kernel.astype(np.float32))
    b = g.const(f"{name}.b", bias.astype(np.float32))
    return g.add("Gemm", [x, w, b], name)


def to_onnx(model: Any, spec: NetSpec, graph_name: str) -> bytes:
    """The ONNX model of ``model`` (built by ``image_models.build(spec)``)."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    x = g.add("Transpose", [INPUT], "nchw", perm=[0, 3, 1, 2])
    convs = pools = 0
    for item in spec.backbone:
        if item == "M":
            x = g.add("MaxPool", [x], f"pool{pools}", kernel_shape=[2, 2], strides=[2, 2])
            pools += 1
        else:
            x = _conv(g, x, model.get_layer(f"conv{convs}"), f"conv{convs}")
            x = g.add("Relu", [x], f"relu{convs}")
            convs += 1
    batch = "batch"
    if spec.kind == "classifier":
        # Keras flattens NHWC: back to it first, so the dense weights read the same order
        x = g.add("Flatten", [g.add("Transpose", [x], "nhwc", perm=[0, 2, 3, 1])], "flat")
        for i in range(len(spec.dense)):
            x = g.add("Relu", [_gemm(g, x, model.get_layer(f"dense{i}"), f"dense{i}")], f"r{i}")
        g.add("Identity", [_gemm(g, x, model.get_layer("head"), "head")], "logits")
        logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, spec.classes])
        outputs = [logits]
    else:
        n, c = spec.cells, spec.classes
        x = _conv(g, x, model.get_layer("head"), "head")
        x = g.add("Transpose", [x], "nhwc", perm=[0, 2, 3, 1])
        shape = g.const("cells_shape", np.array([-1, n, 4 + c], dtype=np.int64))
        x = g.add("Reshape", [x, shape], "cells")
        low = g.const("logit_min", np.array(-LOGIT_BOUND, dtype=np.float32))
        high = g.const("logit_max", np.array(LOGIT_BOUND, dtype=np.float32))
        sig = g.add("Sigmoid", [g.add("Clip", [x, low, high], "bounded")], "sig")
        axis = g.const("last_axis", np.array([-1], dtype=np.int64))
        at0, at4 = (g.const(k, np.array([v], np.int64)) for k, v in (("at0", 0), ("at4", 4)))
        end = g.const("at_end", np.array([4 + c], dtype=np.int64))
        numbers = g.add("Slice", [sig, at0, at4, axis], "box_numbers")
        m, offsets = box_matrix(spec.grid)
        x = g.add("MatMul", [numbers, g.const("box_matrix", m)], "box_linear")
        x = g.add("Add", [x, g.const("box_offsets", offsets)], "box_raw")
        lo = g.const("zero", np.array(0.0, dtype=np.float32))
        hi = g.const("one", np.array(1.0, dtype=np.float32))
        g.add("Clip", [x, lo, hi], "boxes")
        g.add("Slice", [sig, at4, end, axis], "scores")
        outputs = [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, n, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, n, c]),
        ]
    size = spec.size
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, size, size, 3])]
    graph = helper.make_graph(g.nodes, graph_name, inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())
