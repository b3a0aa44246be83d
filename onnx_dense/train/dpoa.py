"""dpoa: the dense net's parameters in the original architecture.

The dense model keeps every weight of the original under the same name and shape, so the
weights trained on the dense model go straight back into the original. :func:`export_dpoa`
writes ORIGINAL with only its initializers' values replaced: the proto is edited in place
(each float initializer's data fields swapped for the trained raw bytes), so nodes,
attributes, names, value_info, opset, doc strings and metadata stay byte-for-byte what they
were. Shape or name mismatches are refused with one line; ORIGINAL is never written to.

TRAINED is a checkpoint (``.pt`` from ``onnx-dense train``, needs torch to read) or a trained
dense ONNX model (needs no torch). :func:`write_trained` does the same for the model that
was trained, dense or original (from a checkpoint, or from a module in memory).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_dense import model_io
from onnx_dense.errors import DenseError
from onnx_dense.files import atomic_output, atomic_outputs

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_DATA_FIELDS = (
    "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data", "raw_data", "external_data",
)


@dataclasses.dataclass
class Trained:
    """Weights read from TRAINED, by ONNX name, and what is known about where they came from."""

    source: str
    weights: dict[str, np.ndarray]
    kind: str  # "checkpoint", "onnx" or "memory"
    dense_model: str | None = None
    checkpoint: dict[str, Any] | None = None


@dataclasses.dataclass
class DpoaResult:
    out: Path
    replaced: int  # initializers whose values were written
    changed: int  # of those, how many differ from ORIGINAL's values
    unused: int  # trained tensors with no counterpart in ORIGINAL (dense-only)
    dense_out: Path | None = None


# --------------------------------------------------------------------------------------------
# reading TRAINED
# --------------------------------------------------------------------------------------------


def read_trained(trained) -> Trained:
    """TRAINED as weights: a checkpoint path, a trained ONNX path, or {name: array/tensor}."""
    if isinstance(trained, Trained):
        return trained
    if isinstance(trained, Mapping):
        return Trained("weights", {k: _to_numpy(v) for k, v in trained.items()}, "memory")
    if hasattr(trained, "state_dict_onnx"):  # an OnnxGraphModule
        return Trained("module", {k: _to_numpy(v) for k, v in trained.state_dict_onnx().items()}, "memory",
                       dense_model=getattr(trained, "source_path", None))
    path = Path(trained)
    if not path.exists():
        raise DenseError(f"{path}: no such file (TRAINED is a checkpoint .pt or a trained dense .onnx)")
    if path.is_dir():
        raise DenseError(f"{path}: is a directory; give a checkpoint file (e.g. {path}/last.pt) or a trained .onnx")
    if path.suffix.lower() != ".onnx" and zipfile.is_zipfile(path):
        from onnx_dense.train.checkpoint import load_checkpoint

        data = load_checkpoint(path)
        weights = {k: _to_numpy(v) for k, v in data["weights"].items()}
        return Trained(str(path), weights, "checkpoint", data.get("dense_model"), data)
    if path.suffix.lower() in (".pt", ".pth", ".ckpt"):
        raise DenseError(f"{path}: not an onnx-dense checkpoint (not a torch zip archive)")
    proto = _load_proto(path, "TRAINED")
    weights = {
        init.name: numpy_helper.to_array(init, str(path.parent))
        for init in proto.graph.initializer
        if init.data_type in _FLOAT_TYPES
    }
    return Trained(str(path), weights, "onnx", str(path))


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()
            return value.numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(value)


def _load_proto(path: Path, what: str) -> onnx.ModelProto:
    from onnx_dense.runnable import check_model_runs

    check_model_runs(model_io.load(path))  # one clear line for a bad file, or a graph that cannot run
    try:
        return onnx.load(str(path))
    except Exception as exc:  # pragma: no cover - model_io.load accepted it
        raise DenseError(f"{path}: {what} could not be read ({str(exc).splitlines()[0][:200]})") from None


# --------------------------------------------------------------------------------------------
# replacing initializer values
# --------------------------------------------------------------------------------------------


def replace_initializers(
    proto: onnx.ModelProto,
    weights: Mapping[str, np.ndarray],
    *,
    model_label: str,
    weights_label: str,
    require: str = "used",
) -> tuple[int, int]:
    """Overwrite the values of ``proto``'s float initializers with ``weights`` (in place).

    ``require``: "used" — every float initializer with at least one dimension that a node
    reads must be in ``weights``; "all" — every float initializer must be. Returns
    (replaced, changed).
    """
    used = _used_names(proto.graph)
    fixed = _fixed_upsampling_kernels(proto.graph) if require == "used" else set()
    missing, replaced, changed = [], 0, 0
    for init in proto.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            continue
        new = weights.get(init.name)
        if new is None:
            if require == "all" or (init.name in used and len(init.dims) > 0 and init.name not in fixed):
                missing.append(init.name)
            continue
        new = np.asarray(new)
        if tuple(new.shape) != tuple(init.dims):
            raise DenseError(
                f"weight '{init.name}': {model_label} has shape {list(init.dims)} but {weights_label} has "
                f"{list(new.shape)}; {weights_label} was not trained from a dense model of {model_label}"
            )
        if not np.all(np.isfinite(new.astype(np.float64, copy=False))):
            raise DenseError(f"weight '{init.name}' in {weights_label} has NaN or infinite values; refusing to export it")
        data = _raw_bytes(new, init.data_type)
        old = numpy_helper.to_array(init) if init.data_location != onnx.TensorProto.EXTERNAL else None
        if old is None or old.tobytes() != np.frombuffer(data, dtype=old.dtype).tobytes():
            changed += 1
        for field in _DATA_FIELDS:
            init.ClearField(field)
        init.ClearField("data_location")
        init.raw_data = data
        replaced += 1
    if missing:
        raise DenseError(
            f"{weights_label} lacks {len(missing)} of {model_label}'s weights (e.g. '{missing[0]}'); "
            f"it was not trained from a dense model of {model_label}"
        )
    if replaced == 0:
        raise DenseError(f"{weights_label} shares no weight names with {model_label}; are these a pair?")
    return replaced, changed


def _fixed_upsampling_kernels(graph: onnx.GraphProto) -> set[str]:
    """Weights of ConvTransposes that are a fixed bilinear upsampling (FCN's final one): the
    dense model rebuilds that upsampling by its remaining factor (passes/final_upsampling.py), so
    trained weights lack the kernel, which is never trained: the original keeps its own."""
    from onnx_dense.passes.analysis.final_upsampling import bilinear_weight_problem

    inits = {t.name: t for t in graph.initializer}
    found = set()
    for node in graph.node:
        if node.op_type != "ConvTranspose" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim < 3:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        strides = list(attrs.get("strides", [1] * (w.ndim - 2)))
        if bilinear_weight_problem(w, strides, attrs.get("group", 1)) is None:
            found.add(node.input[1])
    return found


def _used_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _used_names(g)
    names.update(o.name for o in graph.output)
    return names


def _raw_bytes(array: np.ndarray, data_type: int) -> bytes:
    if data_type == onnx.TensorProto.BFLOAT16:
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
        return rounded.tobytes()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type).newbyteorder("<")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike, *, inputs=(), external: bool | None = None) -> Path:
    """Write ``proto`` atomically (temporary file, then rename), never over one of ``inputs``.

    Like :func:`onnx_dense.model_io.save`, but for a proto edited in place: onnx-ir would
    rebuild the proto (it drops the value_info of initializers, for one), and dpoa promises
    ORIGINAL's proto with nothing changed but the weights.
    """
    out = Path(path)
    model_io.check_output(out, inputs)
    if external is None:
        external = sum(len(i.raw_data) for i in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    location = out.name + ".data"
    sources = [src for src in inputs if src is not None]
    model_io.check_outputs([out, out.parent / location] if external else [out], sources, (), sources)
    try:
        if external:
            with atomic_outputs([out, out.parent / location], "the model") as (tmp, _):
                onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=location)
        else:
            with atomic_output(out, "the model") as tmp, open(tmp, "wb") as f:
                f.write(proto.SerializeToString())
    except ValueError as exc:  # protobuf: a message too large to serialise
        raise DenseError(f"{out}: could not write the model ({exc})") from None
    return out


# --------------------------------------------------------------------------------------------
# the two exports
# --------------------------------------------------------------------------------------------


def write_trained(model, trained, out: str | os.PathLike) -> Path:
    """``model``, the graph that was trained, with the trained values of every float initializer.

    ``model``: an ONNX path (the dense model, or the original when that is what was trained) or
    a ModelProto, which is copied, never edited. Every float initializer must be in TRAINED
    under its name and with its shape; OUT is written atomically and never over ``model`` or
    TRAINED.
    """
    t = read_trained(trained)
    if isinstance(model, onnx.ModelProto):
        proto, path, label = onnx.ModelProto(), None, "the model"
        proto.CopyFrom(model)
    else:
        path = Path(model)
        proto, label = _load_proto(path, "the model"), str(path)
    replace_initializers(proto, t.weights, model_label=label, weights_label=t.source, require="all")
    return save_proto(proto, out, inputs=(path, t.source if t.kind != "memory" else None))


write_trained_dense = write_trained  # the former name, still exported by onnx_dense.train


def export_dpoa(
    original: str | os.PathLike,
    trained,
    out: str | os.PathLike,
    *,
    dense: str | os.PathLike | None = None,
    dense_out: str | os.PathLike | None = None,
) -> DpoaResult:
    """Write ORIGINAL with the weights of TRAINED (checkpoint, trained dense ONNX, module or dict).

    ``dense_out``: also write the trained dense model there; its graph comes from ``dense``, or
    from TRAINED itself when it is an ONNX model, or from the dense model path a checkpoint
    records.
    """
    original = Path(original)
    t = read_trained(trained)
    proto = _load_proto(original, "ORIGINAL")
    label = f"TRAINED ({t.source})"
    replaced, changed = replace_initializers(proto, t.weights, model_label=f"ORIGINAL ({original})", weights_label=label)
    others = [original, t.source if t.kind != "memory" else None, dense]
    if dense_out is not None and (Path(out).resolve() == Path(dense_out).resolve() or model_io.same_file(Path(out), Path(dense_out))):
        raise DenseError(f"{out}: the dpoa output and the dense output are the same file")
    skeleton = None
    if dense_out is not None:  # every output checked before the first is written
        skeleton = dense or t.dense_model
        if skeleton is None:
            raise DenseError("to write the trained dense model, give the dense model it was trained from (--dense DENSE.onnx)")
        if not Path(skeleton).is_file():
            raise DenseError(
                f"{skeleton}: the dense model recorded in the checkpoint is gone; give it with --dense DENSE.onnx"
            )
        sources = [p for p in (*others, skeleton) if p is not None]
        model_io.check_output(Path(dense_out), sources)
        model_io.check_outputs([Path(dense_out)], sources, (), sources)
    result_path = save_proto(proto, out, inputs=others)
    names = {i.name for i in proto.graph.initializer}
    unused = sum(1 for n in t.weights if n not in names)
    result = DpoaResult(result_path, replaced, changed, unused)
    if dense_out is not None:
        result.dense_out = write_trained(skeleton, t, dense_out)
    return result
