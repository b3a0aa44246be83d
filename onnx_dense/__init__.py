"""onnx-dense: dense (eConv/ePool) equivalents of CNNs exported to ONNX.

The public API mirrors the command line::

    import onnx_dense
    dense = onnx_dense.rewrite("vgg16.onnx", "vgg16_dense.onnx", output_stride=8)
    report = onnx_dense.verify("vgg16.onnx", "vgg16_dense.onnx")
    assert report
"""

from onnx_dense.errors import DenseError

__all__ = ["DenseError", "inspect_model", "rewrite", "rewrite_model", "verify"]
__version__ = "0.1.0"
_API = ("inspect_model", "rewrite", "rewrite_model", "verify")


def __getattr__(name: str):
    # The API (onnx, onnx-ir, the passes: about a second) is imported when first used, so that
    # the console script can start a budgeted run again (onnx_dense/_entry.py) before paying for it.
    if name in _API:
        from onnx_dense import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnx_dense' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_API})
