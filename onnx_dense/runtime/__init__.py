"""Running models in ONNX Runtime (see :mod:`onnx_dense.runtime.session`)."""

from onnx_dense.runtime.session import OrtRunner, available_providers

__all__ = ["OrtRunner", "available_providers"]
