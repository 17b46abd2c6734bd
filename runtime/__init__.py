"""qbert_edge.runtime: run an exported qbert-edge ONNX model on a CPU or an ARM board.

NumPy and onnxruntime only: importing this package never imports torch or transformers.
"""
