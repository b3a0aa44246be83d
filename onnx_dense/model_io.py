"""Loading and saving models so that bad files get one clear line and nothing is half written.

Loading refuses, before anything else reads them, external data outside the model's folder
(an absolute location, one with '..', or a symbolic link: onnx refuses the same at its own
load, after the rewrite already ran) and graphs that reference a tensor nothing defines
(onnx-ir would warn and carry on).

Loading parses the file through a memory map (``onnx.load`` first reads it into one bytes
object, then parses a second copy out of it) and hands the proto to onnx-ir, which wraps it
without copying and memory-maps external weights.

Saving writes to a temporary file beside the destination and renames it into place, so an
interrupted or failed run never leaves a truncated model, and it refuses to write over the
input model or the input's external-data file, or through a symbolic link (see
onnx_dense/files.py). A model with external data is written with its ``.data`` file in a
private temporary folder and both are renamed into place. A single-file model is streamed: the graph
without its weights, then each initializer as its own fragment of the graph message
(protobuf merges repeated occurrences of an embedded message). ``onnx_ir.save`` and
``onnx.save`` both build the whole serialised model in memory first, three to four times
the weights at peak (measured in benchmarks/); streaming holds one tensor at a time.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.files import atomic_output, atomic_outputs, refuse_link

#: Above this many bytes of weights a model is saved with external data (protobuf caps at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model, turning every way a file can be wrong into a DenseError."""
    p = Path(path)
    try:
        return _load(p)
    except OSError as exc:  # unreadable, a name too long, a device that cannot be mapped
        raise DenseError(f"{p}: cannot be read ({exc.strerror or _first_line(exc)})") from None


def _load(p: Path) -> ir.Model:
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
    _check_locations(proto.graph, p)
    _check_references(proto.graph, p)
    _check_tensors(proto.graph, p)
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)  # what onnx-ir would warn about is refused above
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types for malformed protos
        raise DenseError(f"{p}: malformed ONNX model ({_first_line(exc)})") from None
    finally:
        logger.setLevel(level)
    negative_dims_unknown(model)
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    _check_external_data(model, p)
    model.meta["onnx_dense.path"] = str(p)
    info = metadata.read(model)  # one line for corrupt onnx_dense metadata, before anything relies on it
    if info is not None:
        try:
            metadata.check_against(info, model)
        except ValueError as exc:
            raise DenseError(
                f"{p}: its onnx_dense metadata does not fit the model ({exc}); write the dense model again with "
                "onnx-dense rewrite"
            ) from None
    return model


def negative_dims_unknown(model: ir.Model) -> ir.Model:
    """Graph input/output dims declared negative (paddle2onnx's -1 batch) as unknown dims."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape.dims):
            value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in value.shape.dims])
    return model


def proto_negative_dims_unknown(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same for a ModelProto: ``proto`` itself when it has none, else a fixed copy."""
    def negative(vi) -> bool:
        return any(d.HasField("dim_value") and d.dim_value < 0 for d in vi.type.tensor_type.shape.dim)

    if not any(negative(vi) for vi in [*proto.graph.input, *proto.graph.output]):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for vi in [*copy.graph.input, *copy.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                d.Clear()
    return copy


def _parse(path: Path) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            proto.ParseFromString(view)
        finally:
            view.release()
    return proto


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(sub)


def _check_locations(graph: onnx.GraphProto, path: Path) -> None:
    """External data only from files inside the model's folder, reached without a link."""
    folder = path.parent
    for g in _graphs(graph):
        attribute_tensors = [t for node in g.node for a in node.attribute for t in [a.t, *a.tensors]]
        for init in [*g.initializer, *attribute_tensors]:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in init.external_data if e.key == "location"), "")
            why = _outside(folder, location)
            if why:
                raise DenseError(
                    f"{path}: initializer '{init.name}' has its weights in '{location}', outside the model's "
                    f"folder ({why}); onnx-dense reads external data only from files beside the model: move the "
                    "file there and give its location relative to the model"
                )


def _outside(folder: Path, location: str) -> str | None:
    """Why ``location`` (an external-data location) is not a file inside ``folder``, or None."""
    if not location:
        return "the location is empty"
    if "\0" in location:
        return "the location holds a NUL byte"
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        return "an absolute path"
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        return "the location goes up with '..'"
    current = folder
    for part in parts:
        current = current / part
        if current.is_symlink():
            return f"'{current.relative_to(folder)}' is a symbolic link to {os.readlink(current)}"
    return None


def _check_references(graph: onnx.GraphProto, path: Path, outer: frozenset = frozenset()) -> None:
    """Every node input and graph output is a tensor something defines (in this or an outer scope)."""
    known = set(outer) | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    known |= {i.values.name for i in graph.sparse_initializer}
    computed = {o for node in graph.node for o in node.output if o}
    for node in graph.node:
        label = f"'{node.name}' ({node.op_type})" if node.name else f"{node.op_type} (unnamed)"
        for name in node.input:
            if name and name not in known:
                if name in computed:
                    raise DenseError(
                        f"{path}: node {label} reads '{name}' before a node computes it (the nodes are not in "
                        "topological order, or form a cycle); the model is invalid: re-export it"
                    )
                raise DenseError(
                    f"{path}: node {label} reads '{name}', which no node, graph input or initializer defines; "
                    "the model is invalid: re-export it"
                )
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _check_references(sub, path, frozenset(known))
        for name in node.output:
            if name and name in known:
                raise DenseError(
                    f"{path}: node {label} computes '{name}', which is already defined (by a node, graph input or "
                    "initializer); the model is invalid: re-export it"
                )
            known.add(name)
    if not outer:
        if not graph.output:
            raise DenseError(f"{path}: the graph has no outputs; the model is invalid: re-export it")
        for out in graph.output:
            if out.name not in known:
                raise DenseError(
                    f"{path}: graph output '{out.name}' is computed by no node (and is no input or initializer); "
                    "the model is invalid: re-export it or cut it with --outputs"
                )


def _nbytes(dims, bits: int) -> int | None:
    """Bytes a dense tensor of these dims takes (None: strings, which have no fixed size)."""
    if not bits:
        return None
    count = 1
    for d in dims:
        count *= int(d)
    return (count * bits + 7) // 8


#: Strings have no fixed size; sub-byte types are packed (two or four values a byte).
_UNCHECKED_TYPES = {
    getattr(onnx.TensorProto, name) for name in ("STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
}


def _check_tensors(graph: onnx.GraphProto, path: Path) -> None:
    """Every in-file initializer holds as many values as its dims say (else a reshape fails mid-rewrite)."""
    for g in _graphs(graph):
        for init in g.initializer:
            dims = list(init.dims)
            if any(d < 0 for d in dims):
                raise DenseError(f"{path}: initializer '{init.name}' has a negative dimension {dims}; the model is invalid")
            if init.data_location == onnx.TensorProto.EXTERNAL:
                continue
            count = 1
            for d in dims:
                count *= d
            try:
                bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            except Exception:  # string, sub-byte or unknown types: onnx-ir and onnx judge them
                bits = None
            if init.data_type in _UNCHECKED_TYPES or bits is None:
                continue
            if init.HasField("raw_data"):
                have, need, unit = len(init.raw_data), count * bits // 8, "bytes"
            else:
                fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
                have, unit = sum(len(getattr(init, f)) for f in fields), "values"
                complex_ = init.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
                need = count * (2 if complex_ else 1)
            if have != need:
                raise DenseError(
                    f"{path}: initializer '{init.name}' holds {have} {unit} but its shape {dims} needs {need}; "
                    "the model is invalid (truncated or corrupt): re-export it"
                )


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
            need = _nbytes(list(tensor.shape.numpy()), tensor.dtype.bitwidth)
            if tensor.length is not None and need is not None and tensor.length != need:
                raise DenseError(
                    f"{path}: initializer '{value.name}' has {tensor.length} bytes in '{tensor.location}' but its "
                    f"shape {list(tensor.shape.numpy())} needs {need}; the model is invalid: re-export it"
                )
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else (need or 0))
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
    """Write ``model`` to ``path`` atomically, never over one of ``inputs`` (nor their weights) or a link.

    Models whose weights would not fit in a protobuf, or whose source kept weights in
    external data, are written with their weights in ``<name>.data`` beside the model.
    """
    out = Path(path)
    check_output(out, inputs)
    external = None
    source = model.meta.get("onnx_dense.path")
    data_of_inputs = [Path(v.const_value.path) for v in model.graph.initializers.values()
                      if isinstance(v.const_value, ir.ExternalTensor)]
    others = [src for src in inputs if src is not None and not (source and same_file(Path(src), Path(source)))]
    if _uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        external = out.name + ".data"
        check_outputs([out, out.parent / external], inputs, data_of_inputs, others)
    else:
        check_outputs([out], inputs, data_of_inputs, others)

    if external is None:
        with atomic_output(out, "the model") as tmp:
            _save_streaming(model, tmp)
    else:
        with atomic_outputs([out, out.parent / external], "the model") as (tmp, _):
            ir.save(model, tmp, external_data=external)


def check_outputs(outs, inputs=(), input_data=(), parse=()) -> None:
    """One line for an output path that is a symbolic link, an input file, or an external-data
    file of an input model (``input_data``, plus those read from the models in ``parse``)."""
    for out in outs:
        out = Path(out)
        refuse_link(out, "the model")
        if out.is_dir():
            raise DenseError(f"{out}: is a directory, where the model's file would go; remove it or choose another name")
        if not out.exists():
            continue
        for src in inputs:
            if src is not None and same_file(out, Path(src)):
                raise DenseError(f"{out}: would overwrite the input {src}; choose another output name")
        data = list(input_data)
        for src in parse:
            data += data_files(src)
        for d in data:
            if same_file(out, d):
                raise DenseError(
                    f"{out}: would overwrite '{d}', the external data (weights) of an input model; "
                    "choose another output name"
                )


def data_files(path) -> list[Path]:
    """The external-data files a model file refers to (none if it is not a readable model)."""
    p = Path(path)
    try:
        proto = _parse(p)
    except Exception:
        return []
    found = []
    for g in _graphs(proto.graph):
        for init in g.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in init.external_data if e.key == "location"), "")
                if location and not _outside(p.parent, location):
                    found.append(p.parent / location)
    return found


def check_output(out: Path, inputs=()) -> None:
    """One line for an output path that is one of ``inputs`` (None entries skipped), a directory,
    in a directory that does not exist, or a symbolic link."""
    try:
        _check_output(out, inputs)
    except OSError as exc:  # a name too long, a folder that cannot be searched
        raise DenseError(f"{out}: cannot write there ({exc.strerror or _first_line(exc)})") from None


def _check_output(out: Path, inputs) -> None:
    for src in inputs:
        if src is not None and same_file(out, Path(src)):
            raise DenseError(f"{out}: refusing to overwrite the input model {src}; choose another output path")
    if out.is_dir():
        raise DenseError(f"{out}: is a directory; give a file name for the output model")
    if not out.parent.is_dir():
        raise DenseError(f"{out}: directory '{out.parent}' does not exist")
    refuse_link(out, "the model")


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
