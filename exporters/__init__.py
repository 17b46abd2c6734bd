"""qbert_edge.exporters: lower a quantized ``model.pt`` (or an fp32 BERT) to ONNX.

- :mod:`~qbert_edge.exporters.graph`: BERT's ONNX graph, built node by node with ``onnx.helper``;
- :mod:`~qbert_edge.exporters.onnx_export`: ``model.pt`` dict -> ``onnx.ModelProto`` (pure) and the
  file-level :func:`~qbert_edge.exporters.onnx_export.export_file`;
- :mod:`~qbert_edge.exporters.validate`: the exported model vs the torch model on real sentences;
- :mod:`~qbert_edge.exporters.sizes`: bytes per part (packed codes, scales, fp32, graph);
- :mod:`~qbert_edge.exporters.metadata`: the ``qbert-edge/onnx`` metadata the runtime reads.

Importing this package imports nothing heavy; torch is needed only to read ``model.pt`` and to
validate against the torch model.
"""
