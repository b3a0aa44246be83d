"""Loading and saving models so that bad files get one clear line and nothing is half written.

Loading parses the file through a memory map (``onnx.load`` first reads it into one bytes
object, then parses a second copy out of it) and hands the proto to onnx-ir, which wraps it
without copying and memory-maps external weights.

Saving writes to a temporary file beside the destination and renames it into place, so an
interrupted or failed run never leaves a truncated model, and it refuses to write over the
input model or the input's external-data file. A single-file model is streamed: the graph
without its weights, then each initializer as its own fragment of the graph message
(protobuf merges repeated occurrences of an embedded message). ``onnx_ir.save`` and
``onnx.save`` both build the whole serialised model in memory first, three to four times
the weights at peak (measured in benchmarks/); streaming holds one tensor at a time.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnx_dense.errors import DenseError
from onnx_dense.files import atomic_output

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
        proto = _parse(p)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        from onnx_dense.hints import not_onnx

        hint = not_onnx(p)
        raise DenseError(
            f"{p}: {hint}" if hint else f"{p}: not an ONNX model (protobuf could not be parsed: {_first_line(exc)})"
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


def _parse(path: Path) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            proto.ParseFromString(view)
        finally:
            view.release()
    return proto


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
    check_output(out, inputs)
    external = None
    if _uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        external = out.name + ".data"
        data_path = out.parent / external
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and same_file(data_path, Path(tensor.path)):
                raise DenseError(
                    f"{out}: its external data file '{data_path.name}' would overwrite the input's "
                    "weights; choose another output name"
                )

    with atomic_output(out, "the model") as tmp:
        if external is None:
            _save_streaming(model, tmp)
        else:
            ir.save(model, tmp, external_data=external)


def check_output(out: Path, inputs=()) -> None:
    """One line for an output path that is one of ``inputs`` (None entries skipped), a directory,
    or in a directory that does not exist."""
    for src in inputs:
        if src is not None and same_file(out, Path(src)):
            raise DenseError(f"{out}: refusing to overwrite the input model {src}; choose another output path")
    if out.is_dir():
        raise DenseError(f"{out}: is a directory; give a file name for the output model")
    if not out.parent.is_dir():
        raise DenseError(f"{out}: directory '{out.parent}' does not exist")


# Protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _save_streaming(model: ir.Model, path: str) -> None:
    graph = model.graph
    initializers = list(graph.initializers.values())
    graph.initializers.clear()
    try:
        skeleton = ir.serde.serialize_model(model)
    finally:
        for value in initializers:
            graph.register_initializer(value)
    with open(path, "wb") as f:
        f.write(skeleton.SerializeToString())
        del skeleton
        for value in initializers:
            _write_initializer(f, value)


def _write_initializer(f, value: ir.Value) -> None:
    """One ``graph { initializer { ... } }`` fragment; raw tensor bytes written from their buffer."""
    tensor = value.const_value
    data = _raw_bytes(tensor)
    if data is None:  # strings and other odd tensors: the ordinary (copying) serialiser
        body = ir.serde.serialize_tensor(tensor).SerializeToString()
        body_len, tail = len(body), b""
        head = body
    else:
        header = onnx.TensorProto(name=value.name, data_type=tensor.dtype.value, dims=list(tensor.shape.numpy()))
        if tensor.doc_string:
            header.doc_string = tensor.doc_string
        head = header.SerializeToString() + _tag(_TENSOR_RAW_DATA) + _varint(data.nbytes)
        body_len, tail = len(head) + data.nbytes, data
    initializer = _tag(_GRAPH_INITIALIZER) + _varint(body_len)
    f.write(_tag(_MODEL_GRAPH) + _varint(len(initializer) + body_len) + initializer + head)
    if data is not None:
        f.write(tail)


def _raw_bytes(tensor) -> memoryview | None:
    """Little-endian raw bytes of a tensor as ONNX stores them, without a copy where possible."""
    if tensor.dtype == ir.DataType.STRING:
        return None
    if tensor.dtype.bitwidth < 8 or tensor.dtype.bitwidth % 8:
        return memoryview(tensor.tobytes())  # packed sub-byte types
    array = tensor.numpy()
    if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _tag(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def same_file(a: Path, b: Path) -> bool:
    """Both exist and are the same file (links and other spellings of a path included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
