"""The model pipeline behind ``tandem-cloud model optimize``: from a data split and a cloud
teacher to edge variants, their measured trade-offs, a calibrated routing default, a report
and a bundle ``tandem-cloud model package`` accepts.

- ``data``: the split file (NumPy only);
- ``calibrate``: temperature scaling, reliability, the hybrid curve and the threshold choice
  (NumPy only);
- ``train``: Keras MLPs on labels, distilled from the teacher, magnitude-pruned (TensorFlow);
- ``convert``: TFLite float32 / dynamic-range / float16 / int8 and ONNX (TensorFlow, onnx);
- ``onnx_quant``: ONNX Runtime's dynamic and static int8 for the cloud model;
- ``measure``: every variant in its real runtime: accuracy, agreement, size, latency;
- ``report``: the JSON and the HTML page with its charts (matplotlib);
- ``run``: the steps in order, and the bundle.

TensorFlow is imported by ``train``/``convert`` only, when they run: the ``build`` extra,
never the agent.
"""
