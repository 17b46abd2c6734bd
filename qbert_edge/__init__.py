"""qbert-edge: Hessian-guided ultra-low-precision quantization of BERT for small devices.

The top-level package is light on purpose: it imports neither torch nor onnx, so that
``qbert_edge.runtime`` can run on a device that has neither torch nor transformers.
"""

__version__ = "0.1.0"
