"""Zoo models exported once per test run and shared by the pytest-xdist workers.

The dynamo exporter takes seconds per model; a file lock in the run's shared temporary folder
lets the first worker that needs a model export it and the others reuse the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx_dense_train_zoo"
    root.mkdir(exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export_zoo(root: Path, name: str, exporter: str = "torchscript", *, keep_batchnorm: bool = True) -> str:
    from samples import zoo
    from samples.export import export_onnx

    path = root / f"{name}_{exporter}{'_bn' if keep_batchnorm else ''}.onnx"
    with _locked(path):
        if not path.exists():
            model = zoo.build(name)
            tmp = path.with_name(path.name + ".tmp.onnx")
            export_onnx(model, model.input_shape, tmp, exporter=exporter, keep_batchnorm=keep_batchnorm)
            os.replace(tmp, path)
    return str(path)


def ort_run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def input_shape(path, extra: int = 0) -> tuple[str, list[int]]:
    """The first input's name and a concrete shape (static size from the metadata, plus ``extra``)."""
    from onnx_dense import metadata

    proto = onnx.load(str(path), load_external_data=False)
    info = metadata.read(proto)
    vi = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if info is not None and vi.name in info.inputs:
        entry = info.inputs[vi.name]
        for a, s in zip(entry.spatial_axes, entry.size):
            dims[a] = s + extra
    return vi.name, [1 if d is None else d for d in dims]
