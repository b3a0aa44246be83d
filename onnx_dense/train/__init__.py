"""Fine-tune dense models in PyTorch and export the weights back (dpoa).

PyTorch is an optional extra (``pip install "onnx-dense[torch]"``); importing this package does
not import it. The names below load their module on first use::

    from onnx_dense import train as dt
    result = dt.train("vgg_dense.onnx", task="classification", data="data/", steps=100)
    result.save_onnx("vgg_dense_trained.onnx")
    dt.export_dpoa("vgg.onnx", result.checkpoint or result.state_dict_onnx(), "vgg_dpoa.onnx")

* :func:`train`, :func:`evaluate`, :func:`predict`, :func:`geometry_from`, :class:`TrainResult`
  (``onnx_dense.train.trainer``);
* :class:`OnnxGraphModule` (``onnx_dense.train.graph_module``): any ONNX graph as an nn.Module;
* :class:`TaskLoss`, :class:`Geometry` (``onnx_dense.train.losses``);
* :func:`open_dataset` (``onnx_dense.train.data``; no torch);
* :func:`export_dpoa`, :func:`write_trained` (``onnx_dense.train.dpoa``; torch only to read
  a .pt checkpoint; ``write_trained_dense`` is its former name);
* :func:`save_checkpoint`, :func:`load_checkpoint` (``onnx_dense.train.checkpoint``).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "train": "trainer", "evaluate": "trainer", "predict": "trainer", "geometry_from": "trainer",
    "TrainResult": "trainer", "resolve_device": "trainer",
    "OnnxGraphModule": "graph_module", "SUPPORTED_OPS": "graph_module",
    "TaskLoss": "losses", "Geometry": "losses",
    "open_dataset": "data", "Dataset": "data", "TASKS": "data",
    "export_dpoa": "dpoa", "write_trained": "dpoa", "write_trained_dense": "dpoa", "read_trained": "dpoa",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnx_dense.train' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"onnx_dense.train.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
