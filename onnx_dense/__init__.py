"""onnx-dense: dense (eConv/ePool) equivalents of CNNs exported to ONNX.

The public API mirrors the command line::

    import onnx_dense
    dense = onnx_dense.rewrite("vgg16.onnx", "vgg16_dense.onnx", output_stride=8)
    report = onnx_dense.verify("vgg16.onnx", "vgg16_dense.onnx")
    assert report
"""

from onnx_dense.errors import DenseError
from onnx_dense.api import inspect_model, rewrite, rewrite_model, verify

__all__ = ["DenseError", "inspect_model", "rewrite", "rewrite_model", "verify"]
__version__ = "0.1.0"
