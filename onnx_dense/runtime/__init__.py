"""Running models in ONNX Runtime.

* :class:`OrtRunner` (:mod:`onnx_dense.runtime.session`): plain sessions as verify and bench use them.
* :class:`DenseSession` (:mod:`onnx_dense.runtime.dense_session`): serving a dense model, with
  provider choice, CUDA settings, IOBinding, exact tiling (:mod:`onnx_dense.runtime.tiling`) and,
  with each output, the :class:`PixelGrid` that puts its predictions on the input image.
* :func:`run_images` (:mod:`onnx_dense.runtime.batch`): ``onnx-dense run`` as a function;
  :func:`load_image` and :func:`render` (:mod:`onnx_dense.runtime.images`) its two halves.
"""

# What a session would import while it runs (onnx-ir when it is made, onnx's reference
# evaluator for an estimate: 34 MiB and more) is imported here, before a budget's estimate
# reads the process's memory; the package itself imports its API lazily (onnx_dense/__init__.py).
import onnx_dense.api  # noqa: F401, E402
import onnx.reference  # noqa: F401, E402
from onnx_dense.runtime.session import OrtRunner, available_providers, cuda_options
from onnx_dense.runtime.dense_session import DenseMap, DenseSession, PixelGrid, resolve_provider
from onnx_dense.runtime.batch import RunSummary, run_images
from onnx_dense.runtime.images import load_image, render

__all__ = [
    "DenseMap", "DenseSession", "OrtRunner", "PixelGrid", "RunSummary", "available_providers", "cuda_options",
    "load_image", "render", "resolve_provider", "run_images",
]
