"""What a wrong file most likely is, for error lines that say what to do instead.

* :func:`not_onnx` recognises files people pass as a model by mistake: a PyTorch checkpoint
  (a zip archive, or a pickle from older ``torch.save``), a NumPy file, an image; it returns
  the advice for that case, or None when the bytes say nothing useful.
* :func:`swapped_pair` turns "the dense model has no onnx_dense metadata" into "the arguments
  are swapped" with the command in the right order, when the first argument is the dense one.

Sniffing the first bytes is all it takes; no library knows these cases better.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

_MAGIC = {
    b"PK\x03\x04": "a zip archive",
    b"\x80\x02": "a pickle",
    b"\x80\x03": "a pickle",
    b"\x80\x04": "a pickle",
    b"\x80\x05": "a pickle",
    b"\x93NUMPY": "a NumPy array file",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
}


def not_onnx(path: str | os.PathLike) -> str | None:
    """Advice for a file that is not an ONNX model, from its first bytes and name; None if unknown."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    kind = next((what for magic, what in _MAGIC.items() if head.startswith(magic)), None)
    checkpoint = p.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin") or kind in ("a zip archive", "a pickle")
    if checkpoint and kind in ("a zip archive", "a pickle", None):
        return (
            "this is a PyTorch checkpoint, not an ONNX model: give it as TRAINED to "
            "`onnx-dense export-dpoa ORIGINAL CHECKPOINT OUT` (or to `onnx-dense train --resume`); "
            "commands that take a model want the .onnx file"
        )
    if kind is not None:
        return f"this is {kind}, not an ONNX model: give the .onnx file"
    return None


def swapped_pair(command: str, original: str | os.PathLike, dense: str | os.PathLike) -> str | None:
    """When DENSE is not a dense model but ORIGINAL is: the line saying the arguments look swapped."""
    from onnx_dense import metadata

    try:
        import onnx

        first = onnx.load(str(original), load_external_data=False)
    except Exception:  # the caller's own error stands
        return None
    if metadata.read(first) is None:
        return None
    right = " ".join(shlex.quote(str(a)) for a in (dense, original))
    return (
        f"{dense} has no onnx_dense metadata but {original} has: the arguments look swapped. "
        f"The order is ORIGINAL then DENSE: onnx-dense {command} {right}"
    )


def not_dense(command: str, original: str | os.PathLike, dense: str | os.PathLike) -> str:
    """The line for a DENSE argument that `onnx-dense rewrite` did not write."""
    return swapped_pair(command, original, dense) or (
        f"{dense} has no onnx_dense metadata, so it was not written by `onnx-dense rewrite`; "
        f"the order is `onnx-dense {command} ORIGINAL DENSE`, DENSE being what rewrite wrote"
    )
