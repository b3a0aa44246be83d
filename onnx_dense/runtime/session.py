"""ONNX Runtime sessions as context managers, the way verify and bench use them, and the
session settings they share with :class:`~onnx_dense.runtime.dense_session.DenseSession`.

``OrtRunner`` picks the provider, optionally turns graph optimisations off (a comparison
must not let ORT's fusions hide or cause a difference), and runs on numpy arrays.

Settings, and why:

* CUDA: the provider options of :func:`cuda_options` (cuDNN algorithm search EXHAUSTIVE
  for the fixed shapes verify and bench run, never DEFAULT; maximum workspace), and no
  quiet retry on the CPU provider (``enable_fallback=0``; the providers are checked after
  creation), so a number measured "on CUDA" was measured on CUDA.
* Spin-waiting (``spinning=False``): ORT's intra-op worker threads spin after a run by
  default. Good for one session serving back to back; on a machine with few cores, the
  session that ran last keeps a core busy while the next one starts (measured: up to 1.9x
  on a 2-core VM, benchmarks/README.md). ``None`` keeps ORT's default.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from onnx_dense.errors import DenseError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC")


def available_providers() -> list[str]:
    return [name for name, ep in PROVIDERS.items() if ep in ort.get_available_providers()]


def cuda_options(
    *, device_id: int = 0, fixed_shapes: bool = False, conv_algo_search: str | None = None,
    max_workspace: bool = True, nhwc: bool = False,
) -> dict[str, str]:
    """CUDA execution provider options for a convolution-heavy graph.

    cuDNN's algorithm search is EXHAUSTIVE when every run has the same shape (paid once
    per shape) and HEURISTIC otherwise; DEFAULT is refused (reported 4x-50x slower for
    dilated convolutions). ``max_workspace`` lets cuDNN pick algorithms that need memory;
    ``nhwc`` asks for channels-last kernels (``prefer_nhwc``).
    """
    search = (conv_algo_search or ("EXHAUSTIVE" if fixed_shapes else "HEURISTIC")).upper()
    if search not in CONV_ALGO_SEARCH:
        raise DenseError(
            f"cudnn_conv_algo_search '{conv_algo_search}': use EXHAUSTIVE (fixed shapes) or HEURISTIC (varying "
            "shapes); DEFAULT is refused (reported 4x-50x slower for dilated convolutions)"
        )
    options = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": search,
        "cudnn_conv_use_max_workspace": "1" if max_workspace else "0",
        "do_copy_in_default_stream": "1",
    }
    if nhwc:
        options["prefer_nhwc"] = "1"
    return options


def preload_cuda() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels where onnxruntime can (onnxruntime >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:  # the libraries may come from the system instead; session creation will tell
        pass


def set_spinning(so: ort.SessionOptions, spinning: bool | None) -> None:
    """``False``: ORT's worker threads sleep instead of spin-waiting after a run; ``None``: ORT's default."""
    if spinning is None:
        return
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)


class OrtRunner:
    """``with OrtRunner(model) as run: outputs = run(feeds)``.

    ``model`` is a path or a ModelProto; ``optimize`` False disables every ORT graph
    optimisation so the graph runs as written; ``spinning`` False stops the worker threads
    spin-waiting after a run (see the module docstring).
    """

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        *,
        provider: str = "cpu",
        optimize: bool = False,
        threads: int | None = None,
        spinning: bool | None = None,
    ) -> None:
        self.model = model
        self.provider = provider
        self.optimize = optimize
        self.threads = threads
        self.spinning = spinning
        self.session: ort.InferenceSession | None = None

    def __enter__(self) -> "OrtRunner":
        if self.provider not in PROVIDERS:
            raise DenseError(f"unknown provider '{self.provider}'; use one of {', '.join(PROVIDERS)}")
        ep = PROVIDERS[self.provider]
        if ep not in ort.get_available_providers():
            raise DenseError(
                f"provider '{self.provider}' is not available in this onnxruntime "
                f"({', '.join(ort.get_available_providers())}); for CUDA install onnxruntime-gpu in place of onnxruntime"
            )
        so = ort.SessionOptions()
        if not self.optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
        set_spinning(so, self.spinning)
        so.log_severity_level = 4  # errors come back as exceptions (one line); ORT's own log would add a second
        providers: list = [ep]
        if self.provider == "cuda":
            providers = [(ep, cuda_options(fixed_shapes=True))]
            preload_cuda()
        source = self.model.SerializeToString() if isinstance(self.model, onnx.ModelProto) else str(self.model)
        try:
            self.session = ort.InferenceSession(source, so, providers=providers, enable_fallback=0)
        except Exception as exc:  # ORT raises its own exception types
            raise DenseError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None
        got = self.session.get_providers()
        if not got or got[0] != ep:
            self.session = None
            raise DenseError(
                f"onnxruntime did not start the {self.provider} provider (session providers: {', '.join(got)}); "
                "check the NVIDIA driver, CUDA and cuDNN libraries, or use --provider cpu"
            )
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        try:
            options = ort.RunOptions()
            options.log_severity_level = 4
            values = self.session.run(names, dict(feeds), options)
        except Exception as exc:
            raise DenseError(f"onnxruntime failed to run the model: {str(exc).strip().splitlines()[0][:300]}") from None
        return dict(zip(names, values))
