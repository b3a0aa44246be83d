"""Prove a dense model equivalent to its original, output by output.

polygraphy compares outputs of equal shape; a dense output is a superset of the original's
(sampled every eST positions it *is* the original), and its other phases are the original
applied to shifted inputs. Neither fits polygraphy's comparator, which is why this exists.

Checks, each a :class:`Comparison` in a :class:`Report` that is truthy when all pass:

* ``subgrid``: dense output sampled every eST positions vs the original output, at the
  static input size, on the same inputs.
* ``phase a``: (``phases=True``) dense positions eST*o + a vs the original run on the input
  cropped by a * (dense grid stride) at the top/left, at the positions whose receptive field
  does not reach the cropped input's new border (there zero padding differs by design). For
  an output marked exact, the phase must have the shifted original's length and is compared
  to its end (random inputs are odd-sized so that strided windows end partial).
* ``weights``: every weight of the original is in the dense model with the same name,
  shape and values (what makes dpoa export possible).
* ``any size``: the dense model also runs at a larger input (skipped when the original does
  not run at that size either, e.g. an upsampling to a baked size); where the original runs
  there, and one pixel larger (off every stride), each rebuilt upsampling has the original's
  output size.

A dense model cut with ``--outputs`` is compared with the same part of the original: its
weights, and its runs, leave out what follows the cut.

Tolerance: an output passes when max|dense - original| <= atol + rtol * max|original|
(error relative to the output's scale; per-element relative error is meaningless where the
original crosses zero).

Why one module of about 700 lines: the checks share the inputs, the sessions of both models
and the tolerance rule, and each is a few short functions; split, each part would import all
of the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
from typing import Iterable, Mapping

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.grid import fmt
from onnx_dense.runtime.session import OrtRunner

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-6


@dataclasses.dataclass
class Comparison:
    output: str
    check: str  # "subgrid", "phase 1,0", "weights", "any size"
    passed: bool
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0  # max_abs / max|original|
    scale: float = 0.0
    compared: int = 0  # number of values compared
    worst: tuple[int, ...] | None = None  # index of the largest difference (original's indexing)
    tolerance: float = 0.0
    note: str = ""
    skipped: bool = False  # nothing was compared (the note says why); passed stays True

    def line(self) -> str:
        status = "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"
        if self.compared:
            where = f" at {list(self.worst)}" if self.worst is not None else ""
            return (
                f"{status}  {self.output:<24} {self.check:<12} max abs {self.max_abs:.3e}{where}  mean abs "
                f"{self.mean_abs:.3e}  max rel {self.max_rel:.3e}  tol {self.tolerance:.3e}  ({self.compared} values)"
                + (f"  {self.note}" if self.note else "")
            )
        return f"{status}  {self.output:<24} {self.check:<12} {self.note}"


@dataclasses.dataclass
class Report:
    comparisons: list[Comparison]
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def __bool__(self) -> bool:
        return self.passed

    def text(self) -> str:
        """One line per check, then the verdict; skipped checks are counted apart, never as passed."""
        lines = [c.line() for c in self.comparisons]
        n_skip = sum(c.skipped for c in self.comparisons)
        n_fail = sum(not c.passed for c in self.comparisons)
        n_run = len(self.comparisons) - n_skip
        skipped = f"; {n_skip} SKIPPED, not checked (see why on its line)" if n_skip else ""
        lines.append(
            f"{'PASSED' if self.passed else 'FAILED'}: {n_run - n_fail} of {n_run} checks passed{skipped}; "
            f"rtol {self.rtol:g}, atol {self.atol:g}"
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "passed": self.passed,
                "rtol": self.rtol,
                "atol": self.atol,
                "checks": [dataclasses.asdict(c) for c in self.comparisons],
            },
            indent=2,
        )


def _load_proto(model, what: str) -> onnx.ModelProto:
    from onnx_dense.model_io import proto_negative_dims_unknown

    return proto_negative_dims_unknown(_load_any(model, what))


def _load_any(model, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if hasattr(model, "graph") and hasattr(model, "opset_imports"):  # onnx-ir Model
        import onnx_ir as ir

        return ir.serde.serialize_model(model)
    from onnx_dense import model_io

    from onnx_dense.runnable import check_model_runs

    ir_model = model_io.load(model)  # clear errors for bad files
    check_model_runs(ir_model)  # and for graphs that cannot run (onnxruntime would say less)
    del ir_model
    return onnx.load(str(model))


def make_inputs(
    proto: onnx.ModelProto, info: metadata.DenseInfo | None, seed: int = 0,
    sizes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs at the size the rewrite was computed at (``info`` None: dynamic dims 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dims, dtype) in input_dims(proto, info, sizes).items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 10, dims).astype(dtype)
    return feeds


def input_dims(
    proto: onnx.ModelProto, info: metadata.DenseInfo | None, sizes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[list[int], np.dtype]]:
    """Per graph input, the dims and dtype :func:`make_inputs` feeds."""
    initializers = {i.name for i in proto.graph.initializer}
    found = {}
    for vi in proto.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if sizes and vi.name in sizes:
            dims = list(sizes[vi.name])
        entry = info.inputs.get(vi.name) if info is not None else None
        if entry is not None:
            for a, s in zip(entry.spatial_axes, entry.size):
                if dims[a] is None:
                    dims[a] = s
        dims = [1 if d is None else d for d in dims]
        found[vi.name] = (dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return found


#: Running a CNN holds several activations of many channels at once: verify declines declared sizes
#: whose random inputs alone would take more than this fraction of the memory available.
MEMORY_FRACTION = 1 / 32


def _memory_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 8 << 30


def _unaffordable(proto: onnx.ModelProto, info: metadata.DenseInfo) -> str | None:
    """Why the inputs at the declared size cannot be afforded here, or None when they can."""
    dims = input_dims(proto, info)
    need = sum(math.prod(d) * t.itemsize for d, t in dims.values())
    have = _memory_available()
    if need <= have * MEMORY_FRACTION:
        return None
    shapes = ", ".join(f"{k} {'x'.join(map(str, d))}" for k, (d, _) in dims.items())
    return f"the declared input size ({shapes}) needs {need / 2**30:.1f} GiB for the inputs alone and many times that " \
           f"to run ({have / 2**30:.1f} GiB of memory available)"


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise DenseError(f"{path}: no such file") from None
    except Exception as exc:
        raise DenseError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None


def _with_outputs(proto: onnx.ModelProto, names: Iterable[str], dense: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose outputs include ``names`` (cut points of the dense model)."""
    present = {o.name for o in proto.graph.output}
    missing = [n for n in names if n not in present]
    if not missing:
        return proto
    produced = {o for node in proto.graph.node for o in node.output}
    dense_types = {o.name: o.type.tensor_type.elem_type for o in dense.graph.output}
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for name in missing:
        if name not in produced:
            raise DenseError(f"dense output '{name}' is not a tensor of the original model; are these two models a pair?")
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, dense_types.get(name, 1), None))
    return copy


def _restrict_to_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``proto`` computing exactly ``names``: the part of the original a cut dense model covers.

    A dense model cut with ``--outputs`` lacks the nodes and weights after the cut; its
    weights are checked against, and its original run as, the same part of the original
    (whose remainder may not even run at other sizes, e.g. a neck with baked upsampling sizes).
    """
    if [o.name for o in proto.graph.output] == list(names):
        return proto
    by_name = {o.name: o for o in proto.graph.output}
    needed = set(names)
    kept = []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_reads(node))
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.output[:]
    graph.output.extend(by_name[n] for n in names)
    listed = {v.name for v in graph.input}  # old exports list weights as inputs too: keep those
    initializers = [i for i in graph.initializer if i.name in needed or i.name in listed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return copy


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read, outer-scope ones included."""
    reads: set[str] = set()
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for inner in sub.node:
                reads.update(i for i in inner.input if i)
                reads.update(_subgraph_reads(inner))
    return reads


def _flexible(proto: onnx.ModelProto, info: metadata.DenseInfo) -> onnx.ModelProto:
    """The original with its padding fixed as at the static size and symbolic spatial input dims.

    Shifted inputs have other sizes, where ``auto_pad=SAME_*`` and ``ceil_mode`` would pad
    differently (SAME moves the whole grid). The dense model was built from the original with
    those pads made explicit at the static size, so that is the reference at every size.
    """
    import onnx_ir as ir

    from onnx_dense.passes.explicit_padding import ExplicitAutoPad, ExplicitCeilMode
    from onnx_dense.passes.static_shapes import InferStaticShapes, SetStaticInputShapes
    from onnx_dense.pipeline import Step

    shapes = {}
    for vi in proto.graph.input:
        entry = info.inputs.get(vi.name)
        if entry is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        for a, size in zip(entry.spatial_axes, entry.size):
            dims[a] = size
        shapes[vi.name] = tuple(dims)
    model = ir.serde.deserialize_model(proto)
    Step(SetStaticInputShapes(shapes), InferStaticShapes(), ExplicitAutoPad(), ExplicitCeilMode())(model)
    copy = ir.serde.serialize_model(model)
    del copy.graph.value_info[:]
    for vi in copy.graph.input:
        entry = info.inputs.get(vi.name)
        if entry is None:
            continue
        for a in entry.spatial_axes:
            dim = vi.type.tensor_type.shape.dim[a]
            dim.Clear()
            dim.dim_param = f"{vi.name}_s{a}"
    for vi in copy.graph.output:
        vi.type.tensor_type.ClearField("shape")
    return copy


def compare(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float, output: str, check: str) -> Comparison:
    """Max-abs comparison; NaN/Inf are equal where both have the same one at the same position
    (a model with non-finite weights computes them in both), and are reported."""
    if expected.shape != actual.shape:
        return Comparison(
            output, check, False, note=f"shape mismatch: original {list(expected.shape)}, dense sampled {list(actual.shape)}"
        )
    expected = expected.astype(np.float64)
    actual = actual.astype(np.float64)
    finite = np.isfinite(expected) & np.isfinite(actual)
    note = ""
    if not finite.all():
        same = (np.isnan(expected) & np.isnan(actual)) | (expected == actual)
        differ = ~finite & ~same
        if differ.any():
            at = tuple(int(i) for i in np.unravel_index(int(np.argmax(differ)), differ.shape))
            return Comparison(
                output, check, False, worst=at,
                note=f"non-finite values differ at {int(differ.sum())} positions (first at {list(at)}: original "
                     f"{expected[at]}, dense {actual[at]})",
            )
        note = f"{int((~finite).sum())} non-finite values (NaN/Inf) at the same positions in both, counted equal"
    diff = np.abs(np.where(finite, expected, 0.0) - np.where(finite, actual, 0.0))
    scale = float(np.max(np.abs(expected[finite]))) if finite.any() else 0.0
    tolerance = atol + rtol * scale
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else None
    max_abs = float(diff.max()) if diff.size else 0.0
    return Comparison(
        output, check, max_abs <= tolerance, max_abs=max_abs, mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf), scale=scale,
        compared=int(diff.size), worst=worst, tolerance=tolerance, note=note,
    )


def subgrid(dense: np.ndarray, out: metadata.DenseOutput, phase: tuple[int, ...] | None = None) -> np.ndarray:
    """Dense output sampled every eST positions (starting at ``phase``) on its spatial axes."""
    index: list[slice] = [slice(None)] * dense.ndim
    for k, a in enumerate(out.spatial_axes):
        index[a] = slice(phase[k] if phase else 0, None, out.est[k])
    sampled = dense[tuple(index)]
    if out.inserted:
        if any(sampled.shape[a] != 1 for a in out.spatial_axes):
            return sampled  # shape check fails and says so
        sampled = np.squeeze(sampled, axis=tuple(out.spatial_axes))
    return sampled


def verify(
    original,
    dense,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    phases: bool = False,
    max_phases: int = 64,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    provider: str = "cpu",
    optimize: bool = False,
) -> Report:
    """Compare ``dense`` against ``original`` (paths, ModelProtos or onnx-ir Models)."""
    orig = _load_proto(original, "original")
    dens = _load_proto(dense, "dense")
    info = metadata.read(dens)
    if info is None:
        from onnx_dense.hints import not_dense

        if isinstance(original, (str, os.PathLike)) and isinstance(dense, (str, os.PathLike)):
            raise DenseError(not_dense("verify", original, dense))
        raise DenseError("the dense model has no onnx_dense metadata; was it written by `onnx-dense rewrite`?")
    scaled = None
    if inputs is None:
        scaled = _unaffordable(orig, info)
        if scaled is None:
            feeds = make_inputs(orig, info, seed)
        else:  # the original made size-flexible (as for phases), at a size with room for its receptive field
            orig = _flexible(orig, info)
            feeds = make_inputs(orig, info, seed, sizes=_phase_sizes(orig, info, small=True))
    elif isinstance(inputs, Mapping):
        feeds = dict(inputs)
    else:
        feeds = load_inputs(inputs)
    names = [o.name for o in dens.graph.output]
    orig = _restrict_to_outputs(_with_outputs(orig, names, dens), names)
    # Outputs whose final upsampling was rebuilt (passes/final_upsampling.py): the original's
    # weights of that block are not in the dense model, which upsamples its dense score map.
    rebuilt = {n for n in names if n in info.outputs and info.outputs[n].upsampling}
    weights_of = _restrict_to_outputs(orig, [n for n in names if n not in rebuilt]) if rebuilt else orig
    comparisons: list[Comparison] = []
    with OrtRunner(orig, provider=provider, optimize=optimize) as run_orig:
        missing = [n for n in run_orig.input_names if n not in feeds]
        if missing:
            raise DenseError(f"inputs file lacks model input(s) {', '.join(missing)}")
        try:
            expected = run_orig({k: feeds[k] for k in run_orig.input_names}, names)
        except DenseError as exc:
            if scaled is None:
                raise
            raise _too_large(scaled, feeds, exc) from None
    with OrtRunner(dens, provider=provider, optimize=optimize) as run_dense:
        try:
            got = run_dense({k: feeds[k] for k in run_dense.input_names})
        except DenseError as exc:
            if scaled is None:
                raise
            raise _too_large(scaled, feeds, exc) from None
        if scaled is not None:
            at = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feeds.items())
            comparisons.append(Comparison("(inputs)", "size", True, note=f"verified at {at} instead: {scaled}"))
        for name in names:
            out = info.outputs.get(name)
            if out is None:
                comparisons.append(compare(expected[name], got[name], rtol, atol, name, "same"))
                continue
            if out.upsampling:
                comparisons.extend(_check_upsampling(name, out, expected[name], got, rtol, atol))
                continue
            comparisons.append(compare(expected[name], subgrid(got[name], out), rtol, atol, name, "subgrid"))
        comparisons.append(_check_weights(weights_of, dens))
        comparisons.append(_check_any_size(run_dense, feeds, info, orig, provider, optimize))
        if phases:
            if inputs is None:  # random inputs: make them large enough to have an interior
                feeds = make_inputs(orig, info, seed + 1, sizes=_phase_sizes(orig, info, small=scaled is not None))
                try:
                    got = run_dense({k: feeds[k] for k in run_dense.input_names})
                except DenseError:  # e.g. a U-Net, whose skip connections need sizes divisible by 8
                    feeds = make_inputs(orig, info, seed + 1, sizes=_phase_sizes(orig, info, align=True, small=scaled is not None))
                    try:
                        got = run_dense({k: feeds[k] for k in run_dense.input_names})
                    except DenseError as exc:
                        if _runs_at(orig, info, feeds, provider, optimize):
                            raise
                        got = None  # neither model runs at a larger size (sizes baked in at export)
                        comparisons.append(Comparison(
                            "(model)", "phases", True, skipped=True,
                            note=f"skipped: neither model runs at a larger input ({str(exc)[:120]})",
                        ))
            if got is not None:
                comparisons.extend(
                    _check_phases(orig, dens, info, feeds, got, names, rtol, atol, max_phases, provider, optimize)
                )
    return Report(comparisons, rtol, atol)


def _check_upsampling(name, out: metadata.DenseOutput, expected, got, rtol, atol) -> list[Comparison]:
    """A rebuilt final upsampling: the output has the original's shape, and it is the documented
    upsampling (onnx_dense/interpolation.py) of the dense score map, recomputed in numpy. The
    score map itself is an output, compared on the subgrid and the phases like any other."""
    from onnx_dense.interpolation import near_ties, reference

    up = out.upsampling
    dense = got[name]
    if tuple(expected.shape) != tuple(dense.shape):
        return [Comparison(name, "size", False, note=f"shape {list(dense.shape)}, original {list(expected.shape)}")]
    size = Comparison(name, "size", True, note=f"same shape as the original's output {list(expected.shape)}")
    score = got[up["score"]]
    axes = tuple(up.get("score_axes", out.spatial_axes))
    out_size = tuple(dense.shape[a] for a in out.spatial_axes)
    want = reference(score, up, axes, out_size)
    tied = near_ties(score, up, axes, out_size, 1e-5 + rtol)
    ties = 0
    if tied is not None and want.shape == dense.shape:  # an ArgMax: a near tie may go either way
        differ = want != dense
        ties = int(np.count_nonzero(differ & tied))
        want = np.where(differ & tied, dense, want)
    # float32 round-off of the interpolated scores passes through the tail (a Sigmoid, a Softmax):
    # the tolerance is relative to those scores' scale too, not only to the output's
    pre = reference(score, {**up, "tail": []}, axes, out_size) if up["tail"] else None
    scale = float(np.abs(pre).max()) if pre is not None and pre.size else 0.0
    check = compare(want, dense, rtol, atol + rtol * scale, name, "upsampling")
    if ties:
        check.note = f"{ties} labels chosen among scores within the tolerance of each other" + (
            f"; {check.note}" if check.note else "")
    check.note = (
        f"= x{fmt(up['factor'])} {up['kind']} {up['mode']} of dense '{up['score']}' (a prediction every "
        f"{fmt(up['information_stride'])} px), recomputed in numpy" + (f"; {check.note}" if check.note else "")
    )
    return [size, check]


def _too_large(why: str, feeds, exc: Exception) -> DenseError:
    at = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feeds.items())
    return DenseError(
        f"verify: {why}, and the models do not run at the smaller size tried ({at}: {str(exc)[:160]}); rewrite "
        "at a smaller --input-shape (or export the original smaller) and verify that"
    )


def _check_weights(orig: onnx.ModelProto, dens: onnx.ModelProto) -> Comparison:
    dense_inits = {i.name: i for i in dens.graph.initializer}
    used = {name for node in orig.graph.node for name in node.input}
    bad, n = [], 0
    for init in orig.graph.initializer:
        if init.name not in used or not _is_weight(init):
            continue
        n += 1
        other = dense_inits.get(init.name)
        if other is None or list(other.dims) != list(init.dims):
            bad.append(init.name)
            continue
        a = onnx.numpy_helper.to_array(init)
        b = onnx.numpy_helper.to_array(other)
        if not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            bad.append(init.name)
    if bad:
        return Comparison("(weights)", "weights", False, note=f"{len(bad)} of {n} differ or are missing: {', '.join(bad[:5])}")
    return Comparison("(weights)", "weights", True, note=f"{n} weights shared by name, shape and value")


def _is_weight(init: onnx.TensorProto) -> bool:
    return init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _check_any_size(
    run_dense: OrtRunner, feeds, info: metadata.DenseInfo, orig: onnx.ModelProto | None = None,
    provider: str = "cpu", optimize: bool = False,
) -> Comparison:
    bigger = _grown(feeds, info, 0)
    try:
        outs = run_dense(bigger)
    except DenseError as exc:
        if orig is not None and not _runs_at(orig, info, bigger, provider, optimize):
            return Comparison(
                "(model)", "any size", True, skipped=True,
                note=f"skipped: the original does not run at input {list(next(iter(bigger.values())).shape)} either",
            )
        return Comparison("(model)", "any size", False, note=f"dense model fails on a larger input: {exc}")
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in outs.items())
    first = next(iter(bigger.values()))
    note = f"runs at input {list(first.shape)} -> {shapes}"
    if orig is None or not any(o.upsampling for o in info.outputs.values()):
        return Comparison("(model)", "any size", True, note=note)
    sized = []
    with contextlib.ExitStack() as stack:
        try:
            run_orig = stack.enter_context(OrtRunner(_flexible(orig, info), provider=provider, optimize=optimize))
        except DenseError:  # onnxruntime refuses the original with symbolic sizes (pads it checks at load)
            return Comparison("(model)", "any size", True, note=note)
        for extra in (0, 1):  # and one pixel more: a size off the strides, where border pixels are lost or kept
            x = bigger if extra == 0 else _grown(feeds, info, 1)
            shape = list(next(iter(x.values())).shape)
            try:
                want = run_orig({k: x[k] for k in run_orig.input_names})
            except DenseError:
                continue  # the original does not run there: no size to compare with
            try:
                got = outs if extra == 0 else run_dense(x)
            except DenseError as exc:
                return Comparison("(model)", "any size", False,
                                  note=f"the original runs at input {shape}, the dense model fails: {exc}")
            for name, value in want.items():
                why = _size_mismatch(name, value.shape, got[name].shape, info.outputs.get(name)) if name in got else None
                if why:
                    return Comparison("(model)", "any size", False, note=f"at input {shape}: {why}")
            sized.append("x".join(map(str, shape)))
    if sized:
        note += f"; upsampled outputs sized as the original's at {' and '.join(sized)}"
    return Comparison("(model)", "any size", True, note=note)


def _grown(feeds, info: metadata.DenseInfo, extra: int) -> dict:
    """Feeds grown by a quarter (at least 3 px) plus ``extra`` per spatial axis."""
    bigger = {}
    for name, x in feeds.items():
        entry = info.inputs.get(name)
        if entry is None:
            bigger[name] = x
            continue
        pad = [(0, 0)] * x.ndim
        for a in entry.spatial_axes:
            pad[a] = (0, max(3, x.shape[a] // 4) + extra)
        bigger[name] = np.pad(x, pad, mode="reflect" if all(x.shape[a] > p[1] for a, p in enumerate(pad)) else "edge")
    return bigger


def _size_mismatch(name: str, want, got, out: metadata.DenseOutput | None) -> str | None:
    """Why a rebuilt upsampling's output is not the original's size at the same input (None: it
    is, or the check does not apply). Only those: a dense map is the original's function at
    the static size, whose global pools and absolute slices the original at another size
    changes; and an original whose output keeps its static size (baked at export) is bound to
    that size."""
    want, got = tuple(want), tuple(got)
    if out is None or not out.upsampling or want == got:
        return None
    if tuple(want[a] for a in out.spatial_axes if a < len(want)) == tuple(out.size):
        return None
    return f"output '{name}' is {list(got)}, the original's {list(want)}"


def _runs_at(orig: onnx.ModelProto, info: metadata.DenseInfo, feeds, provider: str, optimize: bool) -> bool:
    """Whether the original itself runs at these (other) input sizes."""
    try:
        with OrtRunner(_flexible(orig, info), provider=provider, optimize=optimize) as run:
            run({k: feeds[k] for k in run.input_names})
    except DenseError:
        return False
    return True


def _phase_sizes(
    orig: onnx.ModelProto, info: metadata.DenseInfo, align: bool = False, small: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Input shapes with room for predictions whose receptive field misses the shifted border.

    The shifted input loses up to eST * dense stride pixels at the top/left and positions within
    a receptive field of the border are excluded, so each spatial axis grows by the largest
    receptive field plus a few original strides. ``align``: grow by multiples of the largest
    power of two dividing the static size instead, for models that only run at such sizes.
    ``small``: that room alone, not added to a static size too large to afford.
    """
    sizes = {}
    for vi in orig.graph.input:
        entry = info.inputs.get(vi.name)
        if entry is None:
            continue
        outs = [o for o in info.outputs.values() if o.input == vi.name and not o.inserted]
        if not outs:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        for k, a in enumerate(entry.spatial_axes):
            rf = max(o.rf_size[k] for o in outs)
            step = max(o.original_stride[k] for o in outs)
            dims[a] = 2 * rf + 4 * step if small else max(entry.size[k], 2 * rf + 4 * step)
            if align and not small:
                q = min(entry.size[k] & -entry.size[k], 256)
                dims[a] = entry.size[k] + -(-(dims[a] - entry.size[k]) // q) * q
            elif dims[a] % 2 == 0:
                dims[a] += 1  # odd: strided windows end partial there (ceil_mode, padding at the end)
        sizes[vi.name] = tuple(dims)
    return sizes


def _check_phases(orig, dens, info, feeds, got, names, rtol, atol, max_phases, provider, optimize) -> list[Comparison]:
    results: list[Comparison] = []
    checkable = [
        n for n in names if n in info.outputs and not info.outputs[n].inserted and info.outputs[n].off_grid != "global"
        and not info.outputs[n].upsampling
    ]
    for n in names:
        if n in info.outputs and info.outputs[n].inserted:
            results.append(
                Comparison(n, "phases", True, skipped=True, note="skipped: classifier head (the original pools or flattens the whole map)")
            )
        elif n in info.outputs and info.outputs[n].off_grid == "global":
            results.append(
                Comparison(
                    n, "phases", True, skipped=True, note="skipped: global context in the dense region (an off-grid phase is the "
                    "original whose first removed-stride node reads a shifted map; no cropped input reproduces it)",
                )
            )
    if not checkable:
        return results
    flexible = _with_outputs(_flexible(orig, info), checkable, dens)
    with OrtRunner(flexible, provider=provider, optimize=optimize) as run_orig:
        by_input: dict[str, list[str]] = {}
        for n in checkable:
            by_input.setdefault(info.outputs[n].input, []).append(n)
        for input_name, outs in by_input.items():
            entry = info.inputs[input_name]
            # outputs cut at several strides (a detector's backbone): phases of the densest one
            first = max((info.outputs[n] for n in outs), key=lambda o: math.prod(o.est))
            all_phases = [p for p in itertools.product(*(range(e) for e in first.est)) if any(p)]
            if len(all_phases) > max_phases:
                rng = np.random.default_rng(0)
                pick = rng.choice(len(all_phases), size=max_phases, replace=False)
                all_phases = [all_phases[i] for i in sorted(pick)]
            for phase in all_phases:
                shifted = dict(feeds)
                x = feeds[input_name]
                index = [slice(None)] * x.ndim
                for k, a in enumerate(entry.spatial_axes):
                    index[a] = slice(phase[k] * first.stride[k], None)
                shifted[input_name] = np.ascontiguousarray(x[tuple(index)])
                end_cropped = False
                try:
                    expected = run_orig(shifted, outs)
                except DenseError as exc:
                    # Some originals (a U-Net's skip connections) only run at sizes divisible by
                    # their total stride: crop the end too, keep the size's power-of-two factor,
                    # and leave out the positions that see past the new end.
                    try:
                        shifted[input_name] = _aligned_crop(x, entry, phase, first)
                        expected = run_orig(shifted, outs)
                        end_cropped = True
                    except DenseError:
                        results.extend(
                            Comparison(n, "phases", True, skipped=True, note=f"skipped: the original does not run at other sizes ({exc})")
                            for n in outs
                        )
                        break
                lengths = tuple(shifted[input_name].shape[a] for a in entry.spatial_axes)
                for n in outs:
                    out = info.outputs[n]
                    if out.stride != first.stride or any(p >= e for p, e in zip(phase, out.est)):
                        continue  # a coarser output: this shift is not one of its phases
                    results.append(_compare_phase(n, out, phase, expected[n], got[n], rtol, atol, lengths, end_cropped))
    return results


def _aligned_crop(x: np.ndarray, entry: metadata.DenseInput, phase, out: metadata.DenseOutput) -> np.ndarray:
    """``x`` shifted by ``phase`` and cut at the end to a multiple of the power of two that
    divides the model's own input size (at most 256): the sizes such originals run at."""
    index = [slice(None)] * x.ndim
    for k, a in enumerate(entry.spatial_axes):
        q = min(entry.size[k] & -entry.size[k], 256)
        shift = phase[k] * out.stride[k]
        length = (x.shape[a] - shift) // q * q
        if length <= 0:
            raise DenseError("input too small to crop")
        index[a] = slice(shift, shift + length)
    return np.ascontiguousarray(x[tuple(index)])


def _compare_phase(
    name, out: metadata.DenseOutput, phase, expected, dense, rtol, atol, lengths=None, end_cropped=False
) -> Comparison:
    """Dense phase ``phase`` vs the original on the cropped input, away from the new border
    (and, for off_grid "interior" (fragments), from the end border: positions whose receptive
    field passes the end of the cropped input are left out)."""
    label = "phase " + ",".join(map(str, phase))
    sampled = subgrid(dense, out, phase)
    e_index: list[slice] = [slice(None)] * expected.ndim
    d_index: list[slice] = [slice(None)] * sampled.ndim
    for k, a in enumerate(out.spatial_axes):
        start = math.ceil(-out.rf_start[k] / out.original_stride[k]) if out.rf_start[k] < 0 else 0
        stop = min(expected.shape[a], sampled.shape[a])
        if (out.off_grid == "interior" or end_cropped) and lengths is not None:
            stop = min(stop, (lengths[k] - out.rf_start[k] - out.rf_size[k]) // out.original_stride[k] + 1)
        if stop <= start:
            return Comparison(name, label, True, skipped=True,
                              note="skipped: no position away from the border at this input size")
        e_index[a] = slice(start, stop)
        d_index[a] = slice(start, stop)
    result = compare(expected[tuple(e_index)], sampled[tuple(d_index)], rtol, atol, name, label)
    whole = out.off_grid == "exact" and not end_cropped
    if not whole:
        return result
    # an exact output: the phase has the shifted original's length, and is compared to its end
    want = tuple(expected.shape[a] for a in out.spatial_axes)
    have = tuple(sampled.shape[a] for a in out.spatial_axes)
    if want != have:
        result.passed = False
        result.note = (f"the dense phase has {'x'.join(map(str, have))} positions, the original on the shifted input "
                       f"{'x'.join(map(str, want))}")
    else:
        result.note = "whole phase to its end border" + (f"; {result.note}" if result.note else "")
    return result
