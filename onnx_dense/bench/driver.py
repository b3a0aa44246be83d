"""The driver of ``onnx-dense bench``: load the pair, time original, dense and shift-and-stitch
round-robin, check the outputs. The method (what is timed, how, what is compared) is in
onnx_dense/bench/__init__.py."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.runtime.session import PROVIDERS, OrtRunner
from onnx_dense.bench.flops import _shape_problem, count_flops
from onnx_dense.bench.machine import machine_info
from onnx_dense.bench.profiling import _aliases, _profile_nodes
from onnx_dense.bench.results import DEFAULT_ATOL, DEFAULT_RTOL, BenchResult, Measurement
from onnx_dense.bench.stitch import _compare, _positions, _stitch_phases, _Stitcher

def bench(
    original,
    dense,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    provider: str = "cpu",
    threads: int | None = 2,
    optimize: bool = True,
    warmup: int = 1,
    repeat: int = 10,
    stitch: bool = True,
    profile: bool = False,
    seed: int = 0,
    settle: float = 0.2,
    prepass: bool = True,
    spinning: bool | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``original``, ``dense`` and shift-and-stitch side by side (see the module docstring).

    ``original`` and ``dense`` are paths or ModelProtos. ``inputs``: arrays (or an .npz)
    to run; default random at ``input_shapes``, or at the size the rewrite was computed at.
    At any other size the original runs as a copy with symbolic spatial dims and its
    padding fixed as at the static size (what the dense model is equivalent to).
    ``settle`` and ``prepass``: before each timed measurement, a pause of ``settle`` seconds,
    then one untimed pass of the same session (see the module docstring, "Timing").
    ``spinning``: False stops ORT's worker threads spin-waiting between runs (None: ORT's default).
    """
    if provider not in PROVIDERS:
        raise DenseError(f"unknown provider '{provider}'; use one of {', '.join(PROVIDERS)}")
    _require_provider(provider)
    if repeat < 1 or warmup < 0 or settle < 0:
        raise DenseError(f"--repeat must be >= 1, --warmup and --settle >= 0 (got {repeat}, {warmup} and {settle:g})")
    say = progress or (lambda _msg: None)
    pair = load_pair(original, dense, inputs=inputs, input_shapes=input_shapes, seed=seed)
    dense_proto, info, feeds, names, static, spatial = pair.dense_proto, pair.info, pair.feeds, pair.names, pair.static, pair.spatial
    run_orig_model = pair.original

    say("loading sessions")
    runner = dict(provider=provider, optimize=optimize, threads=threads, spinning=spinning)
    with OrtRunner(run_orig_model, **runner) as run_orig, OrtRunner(pair.dense, **runner) as run_dense:
        def one_original():
            return run_orig(feeds, names)

        def one_dense():
            return run_dense(feeds)

        est = _stitch_phases(info, spatial)
        fns: dict[str, Callable[[], dict]] = {"original": one_original, "dense": one_dense}
        if stitch and spatial:
            stitcher = _Stitcher(run_orig, info, spatial, feeds, est)
            fns["shift-and-stitch"] = stitcher
        say(f"warm-up ({warmup})")
        last: dict[str, dict] = {}
        if not static:
            try:
                last["original"] = one_original()
            except DenseError as exc:
                raise _not_at_size(feeds, str(exc)) from None
        for _ in range(warmup):
            for k, fn in fns.items():
                last[k] = fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        for r in range(repeat):
            say(f"round {r + 1} of {repeat}")
            shift = r % len(order)
            for k in order[shift:] + order[:shift]:
                if settle:
                    time.sleep(settle)
                if prepass:
                    (one_original if k == "shift-and-stitch" else fns[k])()
                c0 = time.process_time()
                t0 = time.perf_counter()
                last[k] = fns[k]()
                times[k].append((time.perf_counter() - t0) * 1000)
                cpu[k].append((time.process_time() - c0) * 1000)
        expected, got = last["original"], last["dense"]

    from onnx_dense.equivalence import subgrid

    checks = []
    for n in spatial:
        out = info.outputs[n]
        sampled = subgrid(got[n], out)
        positions = _positions(expected[n], out, original=True) // max(1, expected[n].shape[0])
        checks.append(_compare(n, "subgrid", expected[n], sampled, None, positions, rtol, atol))
        if "shift-and-stitch" in last:
            stitched = last["shift-and-stitch"][n]
            mask, overlap = stitcher.mask(n, got[n].shape)
            index = tuple(slice(0, s) for s in overlap)
            checks.append(
                _compare(
                    n, "shift-and-stitch", got[n][index], stitched[index], mask,
                    math.prod(overlap[a] for a in out.spatial_axes), rtol, atol,
                )
            )

    say("counting FLOPs")
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    orig_flops, orig_nodes = count_flops(pair.original_counted, shapes)
    dense_flops, dense_nodes = count_flops(dense_proto, shapes)
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    orig_preds = sum(_positions(expected[n], info.outputs[n], original=True) for n in spatial) or batch
    dense_preds = sum(_positions(got[n], info.outputs[n], original=False) for n in spatial) or batch
    measurements = [
        Measurement("original", 1, times["original"], orig_preds, orig_flops, cpu["original"]),
        Measurement("dense", 1, times["dense"], dense_preds, dense_flops, cpu["dense"]),
    ]
    if "shift-and-stitch" in times:
        passes = math.prod(est)
        measurements.append(
            Measurement(
                "shift-and-stitch", passes, times["shift-and-stitch"],
                sum(_positions(last["shift-and-stitch"][n], info.outputs[n], original=False) for n in spatial),
                orig_flops * passes if orig_flops is not None else None, cpu["shift-and-stitch"],
            )
        )
    nodes = None
    if profile:
        say("profiling per node")
        orig_counted = pair.original_counted
        nodes = _profile_nodes(
            run_orig_model, pair.dense, feeds, names, provider, optimize, threads, max(3, min(repeat, 10)),
            (orig_nodes, _aliases(orig_counted, orig_nodes)), (dense_nodes, _aliases(dense_proto, dense_nodes)),
        )
    return BenchResult(
        original_path=pair.original_label, dense_path=pair.dense_label, provider=provider, threads=threads, optimize=optimize,
        warmup=warmup, repeat=repeat, prepass=prepass, settle=settle, spinning=spinning, inputs={k: list(v.shape) for k, v in feeds.items()},
        outputs=[
            {"name": n, "est": list(info.outputs[n].est), "stride": list(info.outputs[n].stride),
             "original_stride": list(info.outputs[n].original_stride), "inserted": info.outputs[n].inserted}
            for n in spatial
        ],
        est=list(est), measurements=measurements, checks=checks, nodes=nodes, machine=machine_info(),
    )

@dataclasses.dataclass
class Pair:
    """An original and its dense model as ``bench`` runs them, with the inputs (also what
    benchmarks/gpu_speed.py times, so both measure the same graphs)."""

    original: str | os.PathLike | onnx.ModelProto  # what a session loads: the file, or a copy cut / made flexible
    original_proto: onnx.ModelProto  # as loaded (external weights not loaded)
    original_label: str
    dense: str | os.PathLike | onnx.ModelProto  # what a session loads
    dense_proto: onnx.ModelProto
    dense_label: str
    info: metadata.DenseInfo
    feeds: dict[str, np.ndarray]
    names: list[str]  # the dense model's outputs, in order; the original is run for these
    spatial: list[str]  # those of them with a dense grid
    static: bool  # the original runs at its own static size

    @property
    def original_counted(self) -> onnx.ModelProto:
        """The original's graph as run (for FLOPs)."""
        return self.original if isinstance(self.original, onnx.ModelProto) else self.original_proto

def load_pair(
    original,
    dense,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> Pair:
    """Load ``original`` and ``dense`` (paths or ModelProtos) and the inputs as ``bench`` does
    (see :func:`bench`); one-line DenseErrors for what cannot be run."""
    orig_proto, orig_label = _load(original, "original")
    dense_proto, dense_label = _load(dense, "dense")
    info = metadata.read(dense_proto)
    if info is None:
        from onnx_dense.hints import not_dense

        if not isinstance(original, onnx.ModelProto) and not isinstance(dense, onnx.ModelProto):
            raise DenseError(not_dense("bench", original, dense))
        raise DenseError(f"{dense_label}: no onnx_dense metadata; was it written by `onnx-dense rewrite`?")
    from onnx_dense.equivalence import load_inputs, make_inputs

    if inputs is None:
        feeds = make_inputs(orig_proto, info, seed, sizes=dict(input_shapes) if input_shapes else None)
    elif isinstance(inputs, Mapping):
        feeds = dict(inputs)
    else:
        feeds = load_inputs(inputs)
    names = [o.name for o in dense_proto.graph.output]
    dense_inputs = [vi.name for vi in dense_proto.graph.input if vi.name not in {i.name for i in dense_proto.graph.initializer}]
    missing = [n for n in dense_inputs if n not in feeds]
    if missing:
        raise DenseError(f"inputs lack model input(s) {', '.join(missing)}")
    feeds = {k: np.ascontiguousarray(feeds[k]) for k in dense_inputs}
    static = _at_static_size(orig_proto, feeds)
    run_orig_model = _original_for(orig_proto, dense_proto, info, names, static, original)
    if not static:
        problem = _shape_problem(run_orig_model, {k: v.shape for k, v in feeds.items()})
        if problem:
            raise _not_at_size(feeds, problem)
    spatial = [n for n in names if n in info.outputs]
    return Pair(
        run_orig_model, orig_proto, orig_label, _source(dense, dense_proto), dense_proto, dense_label, info, feeds, names,
        spatial, static,
    )

def _require_provider(provider: str) -> None:
    import onnxruntime as ort

    if PROVIDERS[provider] not in ort.get_available_providers():
        raise DenseError(
            f"provider '{provider}' is not available in this onnxruntime {ort.__version__} "
            f"({', '.join(ort.get_available_providers())}); for CUDA install onnxruntime-gpu in place of onnxruntime"
        )

def _load(model, what: str) -> tuple[onnx.ModelProto, str]:
    """The proto (a negative dim, paddle2onnx's -1 batch, read as dynamic, as verify reads it) and its label."""
    from onnx_dense import model_io

    if isinstance(model, onnx.ModelProto):
        return model_io.proto_negative_dims_unknown(model), f"<{what} ModelProto>"
    path = Path(model)
    from onnx_dense.runnable import check_model_runs

    check_model_runs(model_io.load(path))  # one-line errors for bad files and graphs that cannot run
    return model_io.proto_negative_dims_unknown(onnx.load(str(path), load_external_data=False)), str(path)

def _source(model, proto: onnx.ModelProto):
    """What OrtRunner should load: the path when there is one (external data resolves), else the proto."""
    return model if not isinstance(model, onnx.ModelProto) else proto

def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)

def _at_static_size(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> bool:
    """True when every input of the original has a static shape equal to the feed's (batch aside)."""
    for vi in proto.graph.input:
        if vi.name not in feeds:
            continue
        dims = vi.type.tensor_type.shape.dim
        shape = feeds[vi.name].shape
        if len(dims) != len(shape):
            raise DenseError(f"input '{vi.name}': rank {len(shape)} given, the original has rank {len(dims)}")
        for i, (d, s) in enumerate(zip(dims, shape)):
            if i > 0 and (not d.HasField("dim_value") or d.dim_value != s):
                return False
    return True

def _original_for(orig, dense, info, names, static: bool, source):
    """The original as it is run: its outputs those of the dense model, flexible if not at its size."""
    from onnx_dense.equivalence import _flexible, _with_outputs

    same_outputs = [o.name for o in orig.graph.output] == names
    if static and same_outputs:
        return _source(source, orig)
    if _uses_external_data(orig) and not isinstance(source, onnx.ModelProto):
        raise DenseError(
            f"{source}: an original with external data can only be benchmarked as is (same outputs as the dense model, "
            "at its static size)"
        )
    model = orig if static else _flexible(orig, info)
    model = _with_outputs(model, names, dense)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [o for o in copy.graph.output if o.name in names]
    keep.sort(key=lambda o: names.index(o.name))
    del copy.graph.output[:]
    copy.graph.output.extend(keep)
    _prune(copy.graph)
    return copy

def _not_at_size(feeds, problem: str) -> DenseError:
    shape = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    return DenseError(
        f"the original does not run at input {shape} ({problem}); bench at its own size, or give an original that "
        "runs at any size (`onnx-dense rewrite` at the original's own output stride turns a classifier head into a "
        "convolution)"
    )

def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no graph output needs (outer-scope names of subgraphs count)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if not any(o in needed for o in node.output if o):
            continue
        kept.append(node)
        needed.update(i for i in node.input if i)
        needed.update(_subgraph_names(node))
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)

def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names.update(_subgraph_names(n))
    return names



