"""Running models in ONNX Runtime.

* :class:`OrtRunner` (:mod:`onnx_dense.runtime.session`): plain sessions as verify and bench use them.
* :class:`DenseSession` (:mod:`onnx_dense.runtime.dense_session`): serving a dense model, with
  provider choice, CUDA settings, IOBinding, exact tiling (:mod:`onnx_dense.runtime.tiling`) and,
  with each output, the :class:`PixelGrid` that puts its predictions on the input image.
* :func:`run_images` (:mod:`onnx_dense.runtime.batch`): ``onnx-dense run`` as a function;
  :func:`load_image` and :func:`render` (:mod:`onnx_dense.runtime.images`) its two halves.
"""

from onnx_dense.runtime.session import OrtRunner, available_providers, cuda_options
from onnx_dense.runtime.dense_session import DenseMap, DenseSession, PixelGrid, resolve_provider
from onnx_dense.runtime.batch import RunSummary, run_images
from onnx_dense.runtime.images import load_image, render

__all__ = [
    "DenseMap", "DenseSession", "OrtRunner", "PixelGrid", "RunSummary", "available_providers", "cuda_options",
    "load_image", "render", "resolve_provider", "run_images",
]
