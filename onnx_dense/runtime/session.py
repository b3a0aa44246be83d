"""ONNX Runtime sessions as context managers, the way verify and bench use them.

Thin for now: picks the provider, optionally turns graph optimisations off (a comparison
must not let ORT's fusions hide or cause a difference), and runs on numpy arrays.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from onnx_dense.errors import DenseError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_providers() -> list[str]:
    return [name for name, ep in PROVIDERS.items() if ep in ort.get_available_providers()]


class OrtRunner:
    """``with OrtRunner(model) as run: outputs = run(feeds)``.

    ``model`` is a path or a ModelProto; ``optimize`` False disables every ORT graph
    optimisation so the graph runs as written.
    """

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        *,
        provider: str = "cpu",
        optimize: bool = False,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.provider = provider
        self.optimize = optimize
        self.threads = threads
        self.session: ort.InferenceSession | None = None

    def __enter__(self) -> "OrtRunner":
        if self.provider not in PROVIDERS:
            raise DenseError(f"unknown provider '{self.provider}'; use one of {', '.join(PROVIDERS)}")
        ep = PROVIDERS[self.provider]
        if ep not in ort.get_available_providers():
            raise DenseError(
                f"provider '{self.provider}' is not available in this onnxruntime "
                f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA"
            )
        so = ort.SessionOptions()
        if not self.optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        source = self.model.SerializeToString() if isinstance(self.model, onnx.ModelProto) else str(self.model)
        try:
            self.session = ort.InferenceSession(source, so, providers=[ep])
        except Exception as exc:  # ORT raises its own exception types
            raise DenseError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None
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
            values = self.session.run(names, dict(feeds))
        except Exception as exc:
            raise DenseError(f"onnxruntime failed to run the model: {str(exc).strip().splitlines()[0][:300]}") from None
        return dict(zip(names, values))
