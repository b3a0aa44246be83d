"""Training checkpoints: a torch ``.pt`` holding the ONNX-named weights and what produced them.

Contents (a plain dict, readable with ``torch.load(path, weights_only=True)``)::

    format       "onnx-dense-checkpoint"
    version      1
    weights      {onnx initializer name: tensor (CPU)}  every float initializer of the dense model
    dense_model  path of the dense ONNX model trained (absolute), or None
    dense_info   the dense model's onnx_dense metadata (JSON text), or None
    task, step, epoch, loss, config (the train() arguments that are plain values)
    optimizer    the optimizer's state_dict (for resuming), or None

Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from onnx_dense.errors import DenseError
from onnx_dense.files import atomic_output

FORMAT = "onnx-dense-checkpoint"
VERSION = 1
TORCH_HINT = 'PyTorch is needed for this: pip install "onnx-dense[torch]"'


def require_torch():
    try:
        import torch
    except ImportError:
        raise DenseError(TORCH_HINT) from None
    return torch


def save_checkpoint(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    torch = require_torch()
    out = Path(path)
    if not out.parent.is_dir():
        raise DenseError(f"{out}: directory '{out.parent}' does not exist")
    payload = {"format": FORMAT, "version": VERSION, **data}
    with atomic_output(out, "the checkpoint") as tmp:
        torch.save(payload, tmp)
    return out


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict; a DenseError in one line for anything that is not one."""
    p = Path(path)
    if not p.is_file():
        raise DenseError(f"{p}: no such checkpoint file")
    torch = require_torch()
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DenseError(f"{p}: not an onnx-dense checkpoint (torch.load failed: {text})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("weights"), dict):
        raise DenseError(f"{p}: not an onnx-dense checkpoint (written by `onnx-dense train` or onnx_dense.train.train)")
    if int(data.get("version", 0)) > VERSION:
        raise DenseError(f"{p}: checkpoint format {data.get('version')} is newer than this onnx-dense understands")
    return data
