"""The graph passes of the dense rewrite, one module per pass (see onnx_dense.pipeline)."""
