"""Loading and saving models so that bad files get one clear line and nothing is half written.

Loading goes through onnx-ir, which memory-maps external weights instead of copying them.
Saving writes to a temporary file beside the destination and renames it into place, so an
interrupted or failed run never leaves a truncated model, and it refuses to write over the
input model or the input's external-data file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnx_dense.errors import DenseError

#: Above this many bytes of weights a model is saved with external data (protobuf caps at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model, turning every way a file can be wrong into a DenseError."""
    p = Path(path)
    if not p.exists():
        raise DenseError(f"{p}: no such file")
    if p.is_dir():
        raise DenseError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise DenseError(f"{p}: empty file, expected an ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise DenseError(
            f"{p}: not an ONNX model (protobuf could not be parsed: {_first_line(exc)})"
        ) from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise DenseError(f"{p}: not an ONNX model or its graph is empty")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types for malformed protos
        raise DenseError(f"{p}: malformed ONNX model ({_first_line(exc)})") from None
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    _check_external_data(model, p)
    model.meta["onnx_dense.path"] = str(p)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.path)
            if not data.is_file():
                raise DenseError(
                    f"{path}: initializer '{value.name}' lives in external data file "
                    f"'{tensor.location}', which is missing; keep it beside the model"
                )
            end = (tensor.offset or 0) + (tensor.length or 0)
            if end > data.stat().st_size:
                raise DenseError(
                    f"{path}: external data file '{tensor.location}' is truncated "
                    f"(initializer '{value.name}' needs bytes up to {end})"
                )


def weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def _uses_external_data(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )


def save(model: ir.Model, path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Write ``model`` to ``path`` atomically, never over one of ``inputs``.

    Models whose weights would not fit in a protobuf, or whose source kept weights in
    external data, are written with their weights in ``<name>.data`` beside the model.
    """
    out = Path(path)
    for src in inputs:
        if _same_file(out, Path(src)):
            raise DenseError(f"{out}: refusing to overwrite the input model; choose another output path")
    if out.is_dir():
        raise DenseError(f"{out}: is a directory; give a file name for the output model")
    if not out.parent.is_dir():
        raise DenseError(f"{out}: directory '{out.parent}' does not exist")

    external = None
    if _uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        external = out.name + ".data"
        data_path = out.parent / external
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and _same_file(data_path, Path(tensor.path)):
                raise DenseError(
                    f"{out}: its external data file '{data_path.name}' would overwrite the input's "
                    "weights; choose another output name"
                )

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if external is None:
            ir.save(model, tmp)
        else:
            ir.save(model, tmp, external_data=external)
        os.replace(tmp, out)
    except DenseError:
        raise
    except OSError as exc:
        raise DenseError(f"{out}: could not write the model ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
