"""Tandem's cloud: an ONNX Runtime server for the Open Inference Protocol (KServe v2)."""

__version__ = "0.1.0"
