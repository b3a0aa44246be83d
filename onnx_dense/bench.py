"""Speed of a dense model against its original and against shift-and-stitch: ``onnx-dense bench``.

One run, the same inputs, the same provider and session options for all three:

* ``original``: the original model, one pass (restricted to the dense model's outputs when
  the rewrite cut the graph, so both compute the same thing);
* ``dense``: the dense model, one pass;
* ``shift-and-stitch``: what a user without this tool would do to get the same dense map
  from the original: run it eST² times on shifted inputs and interleave the outputs.

Shift-and-stitch, precisely. Let ``s`` be the dense grid's stride in input pixels (the
output stride, ``DenseOutput.stride``), ``e`` the eST and ``H`` the input size, per spatial
axis. The input is zero-padded at the end of each spatial axis by ``(e - 1) * s`` pixels;
phase ``k`` (``0 <= k < e`` per axis) runs the original on the crop
``padded[k*s : k*s + H]``, which has the original's own static size, so the original model
runs as exported (no symbolic dims, its padding exactly as at export). The output of phase
``k`` at original position ``o`` goes to position ``e*o + k`` of the stitched map, which has
``e * n`` positions per axis for an original output of ``n``. Classifier outputs with no
spatial axes (a Flatten+Gemm or global-pool head) are one position per phase.

The stitched map is a third, independent check of the dense output. Stitched position
``j = e*o + k`` and dense position ``j`` both see input pixels
``rf_start + j*s .. rf_start + j*s + rf_size - 1`` (from the dense model's metadata). They
are equal where neither computation reaches padding that the other does not have: phase 0
everywhere (its crop is the input itself: the original's own output, the ``subgrid`` check),
and phase ``k > 0`` where that window lies inside the crop and inside the real image
(``rf_start + o*e*s >= 0`` and ``rf_start + j*s + rf_size <= H``). The check compares those
positions (``compared``) out of the positions both maps have (``overlap``); the others differ
by design (the crop's border is a padding border for the original, real pixels for the
dense model; the zero pixels past ``H`` are padding for the dense model only at the input).
Where global context (SE blocks, InstanceNorm) lies in the dense region, the metadata says so
(``off_grid == "global"``): no shifted input reproduces the other phases, and only phase 0 is
compared.

Timing: one warm-up of each, then ``repeat`` rounds; each round runs all three, the order
rotating from round to round (round-robin), so a machine shared with other work slows all
three alike. Reported: the median (and min, and the process CPU time) per measurement;
ratios are ratios of medians. Each timed measurement is preceded by a pause (``settle``,
0.2 s) and then one untimed pass of the same session. The pause: ONNX Runtime's intra-op
worker threads spin-wait after a run, so on a machine with few cores the session that ran
last takes a core from the next one for a while; without it, whichever model follows
shift-and-stitch (which runs the original's session eST² times) was measured up to 1.9x
slower on a 2-core VM. The untimed pass, after the pause: the timed one then finds its own
threads awake and its caches warm, as shift-and-stitch's back-to-back passes do (with the
pause between the two instead, single passes of sub-millisecond models took 0.8-0.9 ms
against 0.5 ms and lost to shift-and-stitch by that alone).
FLOPs are counted on the graphs as run (ONNX shape inference at the benchmark size;
multiply-add = 2; Conv/ConvTranspose, Gemm/MatMul and pooling, as ``inspect`` counts them).
Shift-and-stitch costs eST² original passes.

Targets of the issue: ``shift-and-stitch / dense >= 0.8 * eST² / (dense FLOPs / original FLOPs)``
and ``(dense time / original time) / (dense FLOPs / original FLOPs) <= 1.15`` (dilated kernels
as efficient per FLOP as undilated ones). ``profile=True`` adds per-node times from ORT's
profiler for the original and the dense model, matched by node name, to find slow nodes.

``load_pair`` gives the graphs and inputs exactly as ``bench`` runs them, and
``undilated_twin`` a dense model's undilated twin (same map sizes and FLOPs, no dilation): the
reference benchmarks/gpu_speed.py measures the dense model's TFLOP/s against.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.runtime.session import PROVIDERS, OrtRunner

STITCH_TARGET = 0.8  # dense must beat shift-and-stitch by 0.8 * eST^2 / FLOP ratio
EFFICIENCY_TARGET = 1.15  # dense time ratio within 1.15x its FLOP ratio
DEFAULT_RTOL = 1e-4  # optimised sessions fuse and reorder: looser than verify's 1e-5
DEFAULT_ATOL = 1e-5


@dataclasses.dataclass
class Measurement:
    """One of the three things timed."""

    name: str  # "original", "dense", "shift-and-stitch"
    passes: int  # model passes per measurement (eST² for shift-and-stitch)
    times_ms: list[float]
    predictions: int  # spatial positions (x batch) per measurement, summed over the outputs
    flops: int | None  # per measurement; None if a shape could not be inferred
    cpu_ms: list[float] = dataclasses.field(default_factory=list)  # process CPU time (all threads, ORT's spinning too)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms)) if self.times_ms else math.nan

    @property
    def min_ms(self) -> float:
        return float(np.min(self.times_ms)) if self.times_ms else math.nan

    @property
    def predictions_per_s(self) -> float:
        return self.predictions / (self.median_ms / 1000) if self.times_ms else math.nan

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            median_ms=self.median_ms, min_ms=self.min_ms, predictions_per_s=self.predictions_per_s,
            median_cpu_ms=float(np.median(self.cpu_ms)) if self.cpu_ms else None,
        )
        return d


@dataclasses.dataclass
class Check:
    """A comparison of two ways of computing the dense map."""

    output: str
    check: str  # "subgrid" (dense sampled every eST vs original) or "shift-and-stitch"
    passed: bool
    max_abs: float
    max_rel: float  # max_abs / max|reference| on the compared positions
    tolerance: float
    compared: int  # spatial positions compared (per batch item)
    overlap: int  # spatial positions both maps have (per batch item)
    border_max_abs: float | None = None  # max difference on overlap - compared (differs by design)
    note: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        text = (
            f"{status}  {self.output:<20} {self.check:<17} max abs {self.max_abs:.3e}  max rel {self.max_rel:.3e}  "
            f"tol {self.tolerance:.3e}  ({self.compared} of {self.overlap} positions"
        )
        if self.compared < self.overlap:  # the border's difference stays in --json (border_max_abs)
            text += f"; {self.overlap - self.compared} border positions left out: padding differs there by design)"
        else:
            text += ")"
        return text + (f"  {self.note}" if self.note else "")


@dataclasses.dataclass
class NodeTime:
    """Per-node time from ORT's profiler (optimised graph: fused nodes keep their first node's name)."""

    node: str
    op: str
    original_ms: float | None
    dense_ms: float | None
    original_flops: int | None
    dense_flops: int | None

    @property
    def efficiency(self) -> float | None:
        """(dense time / original time) / (dense FLOPs / original FLOPs): 1 = as efficient per FLOP."""
        if not (self.original_ms and self.dense_ms and self.original_flops and self.dense_flops):
            return None
        return (self.dense_ms / self.original_ms) / (self.dense_flops / self.original_flops)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["efficiency"] = self.efficiency
        return d


@dataclasses.dataclass
class BenchResult:
    original_path: str
    dense_path: str
    provider: str
    threads: int | None
    optimize: bool
    warmup: int
    repeat: int
    prepass: bool
    settle: float
    inputs: dict[str, list[int]]
    outputs: list[dict]  # per output: name, est, stride (dense grid), original_stride
    est: list[int]  # shift-and-stitch phases per spatial axis (largest eST of the outputs)
    measurements: list[Measurement]
    checks: list[Check]
    nodes: list[NodeTime] | None = None
    machine: dict = dataclasses.field(default_factory=dict)
    spinning: bool | None = None  # ORT worker threads spin-wait between runs; None: ORT's default (on)

    def get(self, name: str) -> Measurement | None:
        return next((m for m in self.measurements if m.name == name), None)

    @property
    def stitch_passes(self) -> int:
        return math.prod(self.est)

    @property
    def flop_ratio(self) -> float | None:
        o, d = self.get("original"), self.get("dense")
        return d.flops / o.flops if o and d and o.flops and d.flops else None

    @property
    def time_ratio(self) -> float:
        return self.get("dense").median_ms / self.get("original").median_ms

    @property
    def time_per_flop(self) -> float | None:
        """Dense time ratio over its FLOP ratio: 1.0 = dense kernels as fast per FLOP as the original's."""
        return self.time_ratio / self.flop_ratio if self.flop_ratio else None

    @property
    def stitch_ratio(self) -> float | None:
        s = self.get("shift-and-stitch")
        return s.median_ms / self.get("dense").median_ms if s else None

    @property
    def stitch_target(self) -> float | None:
        return STITCH_TARGET * self.stitch_passes / self.flop_ratio if self.flop_ratio else None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def other_ratios(self) -> dict:
        """The same ratios from the fastest run of each (least disturbed by other work on the machine),
        as the median of the per-round ratios (each round runs all three back to back), and from the
        median process CPU time (all threads; includes ORT's spin-waiting)."""
        o, d, s = self.get("original"), self.get("dense"), self.get("shift-and-stitch")
        fr = self.flop_ratio
        out = {"min": {"dense_over_original_time": d.min_ms / o.min_ms}, "per_round_median": {}}
        out["min"]["time_per_flop"] = d.min_ms / o.min_ms / fr if fr else None
        rounds = list(zip(o.times_ms[-self.repeat:], d.times_ms[-self.repeat:]))
        out["per_round_median"]["dense_over_original_time"] = float(np.median([b / a for a, b in rounds]))
        out["per_round_median"]["time_per_flop"] = out["per_round_median"]["dense_over_original_time"] / fr if fr else None
        if o.cpu_ms and d.cpu_ms:
            cpu_ratio = float(np.median(d.cpu_ms) / np.median(o.cpu_ms))
            out["cpu_median"] = {"dense_over_original_time": cpu_ratio, "time_per_flop": cpu_ratio / fr if fr else None}
            if s is not None and s.cpu_ms:
                out["cpu_median"]["stitch_over_dense_time"] = float(np.median(s.cpu_ms) / np.median(d.cpu_ms))
        if s is not None:
            out["min"]["stitch_over_dense_time"] = s.min_ms / d.min_ms
            out["per_round_median"]["stitch_over_dense_time"] = float(
                np.median([c / b for b, c in zip(d.times_ms[-self.repeat:], s.times_ms[-self.repeat:])])
            )
        return out

    def targets(self) -> dict:
        out = {}
        if self.stitch_ratio is not None and self.stitch_target is not None:
            out["stitch_over_dense"] = {
                "value": self.stitch_ratio, "target": self.stitch_target, "met": self.stitch_ratio >= self.stitch_target,
                "rule": f">= {STITCH_TARGET} * eST^2 / (dense FLOPs / original FLOPs)",
            }
        if self.time_per_flop is not None:
            out["time_per_flop"] = {
                "value": self.time_per_flop, "target": EFFICIENCY_TARGET, "met": self.time_per_flop <= EFFICIENCY_TARGET,
                "rule": f"(dense time / original time) / (dense FLOPs / original FLOPs) <= {EFFICIENCY_TARGET}",
            }
        return out

    def to_dict(self) -> dict:
        return {
            "original": self.original_path,
            "dense": self.dense_path,
            "provider": self.provider,
            "threads": self.threads,
            "optimize": self.optimize,
            "warmup": self.warmup,
            "repeat": self.repeat,
            "prepass": self.prepass,
            "settle_s": self.settle,
            "spinning": self.spinning,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "est": self.est,
            "stitch_passes": self.stitch_passes,
            "measurements": {m.name: m.as_dict() for m in self.measurements},
            "ratios": {
                "dense_over_original_time": self.time_ratio,
                "dense_over_original_flops": self.flop_ratio,
                "time_per_flop": self.time_per_flop,
                "stitch_over_dense_time": self.stitch_ratio,
            },
            "ratios_other_statistics": self.other_ratios(),
            "targets": self.targets(),
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "passed": self.passed,
            "nodes": [n.as_dict() for n in self.nodes] if self.nodes is not None else None,
            "machine": self.machine,
        }

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2)

    def text(self, top_nodes: int = 15) -> str:
        lines = [
            f"onnx-dense bench: {self.provider}, {self.threads or 'default'} intra-op threads, graph optimisations "
            f"{'on' if self.optimize else 'off'}, input {', '.join(f'{k} {v}' for k, v in self.inputs.items())}, "
            f"median of {self.repeat} round-robin rounds after {self.warmup} warm-up"
            + (f", each pass after a {self.settle:g} s pause and an untimed one" if self.prepass else "")
            + (f", {self.settle:g} s pause before each" if self.settle and not self.prepass else "")
            + (", no spin-waiting" if self.spinning is False else ""),
            f"{'':<18}{'ms':>10}{'min ms':>10}{'cpu ms':>10}{'passes':>8}{'predictions':>13}{'pred/s':>12}{'GFLOPs':>10}",
        ]
        for m in self.measurements:
            flops = f"{m.flops / 1e9:.3f}" if m.flops is not None else "?"
            cpu_ms = f"{np.median(m.cpu_ms):.2f}" if m.cpu_ms else "-"
            lines.append(
                f"{m.name:<18}{m.median_ms:>10.2f}{m.min_ms:>10.2f}{cpu_ms:>10}{m.passes:>8}{m.predictions:>13}"
                f"{m.predictions_per_s:>12.1f}{flops:>10}"
            )
        fr = f"{self.flop_ratio:.3f}x" if self.flop_ratio else "?"
        tpf = f"{self.time_per_flop:.3f}" if self.time_per_flop else "?"
        lines.append(
            f"dense / original: {self.time_ratio:.3f}x time, {fr} FLOPs; time per FLOP {tpf} (target <= {EFFICIENCY_TARGET})"
        )
        if self.stitch_ratio is not None:
            target = f"{self.stitch_target:.2f}" if self.stitch_target else "?"
            lines.append(
                f"shift-and-stitch / dense: {self.stitch_ratio:.2f}x time (eST^2 = {self.stitch_passes} passes; target >= "
                f"{STITCH_TARGET} x {self.stitch_passes} / FLOP ratio = {target})"
            )
        mins = self.other_ratios()["min"]
        lines.append(
            "from the fastest runs: dense / original "
            + f"{mins['dense_over_original_time']:.3f}x time"
            + (f", time per FLOP {mins['time_per_flop']:.3f}" if mins.get("time_per_flop") else "")
            + (f"; shift-and-stitch / dense {mins['stitch_over_dense_time']:.2f}x" if "stitch_over_dense_time" in mins else "")
        )
        for name, t in self.targets().items():
            lines.append(f"target {name}: {'met' if t['met'] else 'NOT met'} ({t['value']:.3f} vs {t['target']:.3f})")
        lines.extend(c.line() for c in self.checks)
        if self.nodes:
            lines.append(f"per node (ORT profiler, fastest of several passes, ms; the {top_nodes} slowest in the dense model):")
            lines.append(f"{'node':<48}{'op':<16}{'orig ms':>9}{'dense ms':>10}{'FLOP x':>8}{'time x':>8}{'eff':>7}")
            ranked = sorted(self.nodes, key=lambda n: -(n.dense_ms or 0))[:top_nodes]
            for n in ranked:
                fx = f"{n.dense_flops / n.original_flops:.2f}" if n.original_flops and n.dense_flops else "-"
                tx = f"{n.dense_ms / n.original_ms:.2f}" if n.original_ms and n.dense_ms else "-"
                eff = f"{n.efficiency:.2f}" if n.efficiency is not None else "-"
                om = f"{n.original_ms:.2f}" if n.original_ms is not None else "-"
                dm = f"{n.dense_ms:.2f}" if n.dense_ms is not None else "-"
                lines.append(f"{n.node[-47:]:<48}{n.op[:15]:<16}{om:>9}{dm:>10}{fx:>8}{tx:>8}{eff:>7}")
        return "\n".join(lines)


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


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


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
    if isinstance(model, onnx.ModelProto):
        return model, f"<{what} ModelProto>"
    from onnx_dense import model_io

    path = Path(model)
    model_io.load(path)  # one-line errors for missing, empty, corrupt files
    return onnx.load(str(path), load_external_data=False), str(path)


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


def _shape_problem(proto: onnx.ModelProto, shapes) -> str | None:
    """ONNX shape inference's complaint about running ``proto`` at ``shapes`` (strict), or None."""
    light = _light(proto)
    _set_input_shapes(light, shapes)
    try:
        onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=True, data_prop=True)
    except Exception as exc:
        return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:300]
    return None


def _set_input_shapes(proto: onnx.ModelProto, shapes) -> None:
    for vi in proto.graph.input:
        if vi.name in shapes:
            tt = vi.type.tensor_type
            tt.shape.Clear()
            for d in shapes[vi.name]:
                tt.shape.dim.add().dim_value = int(d)


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


# --------------------------------------------------------------------------
# shift-and-stitch
# --------------------------------------------------------------------------


def _stitch_phases(info: metadata.DenseInfo, spatial: list[str]) -> tuple[int, ...]:
    if not spatial:
        return ()
    ests = [info.outputs[n].est for n in spatial]
    strides = {info.outputs[n].stride for n in spatial}
    inputs = {info.outputs[n].input for n in spatial}
    if len(inputs) > 1 or len(strides) > 1 or len({len(e) for e in ests}) > 1:
        raise DenseError(
            "shift-and-stitch needs every spatial output on one input and one dense grid; benchmark with --no-stitch"
        )
    return tuple(max(e[a] for e in ests) for a in range(len(ests[0])))


class _Stitcher:
    """The original run eST² times on shifted crops of the zero-padded input, interleaved."""

    def __init__(self, run_orig: OrtRunner, info: metadata.DenseInfo, names: list[str], feeds, est) -> None:
        self.run = run_orig
        self.names = names
        self.outs = {n: info.outputs[n] for n in names}
        first = self.outs[names[0]]
        self.input = first.input
        self.axes = info.inputs[first.input].spatial_axes
        self.stride = first.stride
        self.est = est
        self.feeds = feeds
        x = feeds[self.input]
        self.size = tuple(x.shape[a] for a in self.axes)
        self.pad = [(0, 0)] * x.ndim
        for k, a in enumerate(self.axes):
            self.pad[a] = (0, (est[k] - 1) * self.stride[k])
        self.phases = list(itertools.product(*(range(e) for e in est)))
        self.out_shapes: dict[str, tuple[int, ...]] = {}

    def __call__(self) -> dict[str, np.ndarray]:
        x = self.feeds[self.input]
        padded = np.pad(x, self.pad)
        stitched: dict[str, np.ndarray] = {}
        for phase in self.phases:
            index = [slice(None)] * x.ndim
            for k, a in enumerate(self.axes):
                start = phase[k] * self.stride[k]
                index[a] = slice(start, start + self.size[k])
            feeds = dict(self.feeds)
            feeds[self.input] = np.ascontiguousarray(padded[tuple(index)])
            wanted = [n for n in self.names if all(p < e for p, e in zip(phase, self.outs[n].est))]
            result = self.run(feeds, wanted)
            for n in wanted:
                out = self.outs[n]
                y = result[n]
                if out.inserted and y.ndim <= max(out.spatial_axes):  # a classifier: one position per phase
                    y = np.expand_dims(y, tuple(out.spatial_axes))
                if n not in stitched:
                    shape = list(y.shape)
                    for k, a in enumerate(out.spatial_axes):
                        shape[a] *= out.est[k]
                    stitched[n] = np.empty(shape, dtype=y.dtype)
                    self.out_shapes[n] = y.shape
                target = [slice(None)] * y.ndim
                for k, a in enumerate(out.spatial_axes):
                    target[a] = slice(phase[k], None, out.est[k])
                stitched[n][tuple(target)] = y
        return stitched

    def mask(self, name: str, dense_shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """Positions of the overlap of stitched and dense maps where the two must agree (module docstring)."""
        out = self.outs[name]
        n_orig = self.out_shapes[name]
        overlap = list(dense_shape)
        per_axis = []
        for k, a in enumerate(out.spatial_axes):
            e, s = out.est[k], out.stride[k]
            length = min(dense_shape[a], n_orig[a] * e)
            overlap[a] = length
            j = np.arange(length)
            phase, o = j % e, j // e
            inside = (out.rf_start[k] + o * e * s >= 0) & (out.rf_start[k] + j * s + out.rf_size[k] <= self.size[k])
            if getattr(out, "off_grid", "exact") == "global":  # off-grid phases see per-phase global context
                inside[:] = False
            per_axis.append((phase == 0) | inside)
        mask = np.ones([1] * len(dense_shape), dtype=bool)
        for k, a in enumerate(out.spatial_axes):
            shape = [1] * len(dense_shape)
            shape[a] = -1
            mask = mask & per_axis[k].reshape(shape)
        return mask, tuple(overlap)


def _positions(y: np.ndarray, out: metadata.DenseOutput, *, original: bool) -> int:
    """Predictions in an output: batch x spatial positions (1 per batch item without spatial axes)."""
    if original and out.inserted and y.ndim <= max(out.spatial_axes):
        return int(y.shape[0])
    return int(y.shape[0] * math.prod(y.shape[a] for a in out.spatial_axes))


def _compare(name, check, reference, actual, mask, positions: int, rtol, atol) -> Check:
    """max|reference - actual| where ``mask`` (broadcastable to both; None: everywhere) is set.

    ``positions`` is the number of spatial positions of the maps; the mask counts the compared ones.
    """
    if reference.shape != actual.shape:
        return Check(
            name, check, False, math.inf, math.inf, 0.0, 0, positions,
            note=f"shape mismatch: {list(reference.shape)} vs {list(actual.shape)}",
        )
    diff = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
    if mask is None:
        full = np.ones(diff.shape, dtype=bool)
        compared = positions
    else:
        full = np.broadcast_to(mask, diff.shape)
        compared = int(mask.sum())
    inside, ref_inside, outside = diff[full], np.abs(reference[full]), diff[~full]
    border = float(outside.max()) if outside.size else None
    scale = float(ref_inside.max()) if ref_inside.size else 0.0
    max_abs = float(inside.max()) if inside.size else 0.0
    tolerance = atol + rtol * scale
    note = "" if compared else "no position away from the borders at this input size"
    return Check(
        name, check, bool(max_abs <= tolerance), max_abs, max_abs / scale if scale else 0.0, tolerance, compared,
        positions, border, note,
    )


# --------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------


def count_flops(proto: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, dict[str, int]]:
    """FLOPs of one pass at ``input_shapes`` (total, per node name); total None if a shape is unknown.

    Same convention as ``inspect``: a multiply-add is 2 FLOPs; Conv/ConvTranspose/Gemm/MatMul
    count 2 per weight per output position, pooling one per window element, global pools one
    per input element. Shapes come from ONNX shape inference with data propagation on a copy
    without the weights.
    """
    light = _light(proto)
    _set_input_shapes(light, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return None, {}
    shapes: dict[str, tuple | None] = {}
    for vi in itertools.chain(inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
    for t in proto.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    total, per_node, unknown = 0, {}, False
    for i, node in enumerate(inferred.graph.node):
        flops = _node_flops(node, shapes)
        if flops is None:
            unknown = True
            continue
        if flops:
            per_node[node.name or f"{node.op_type}_{i}"] = flops
            total += flops
    return (None if unknown else total), per_node


def _light(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph with large initializers replaced by typed inputs (no weight copied)."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "domain", "model_version"):
        setattr(light, field, getattr(proto, field))
    light.opset_import.extend(proto.opset_import)
    g = light.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    present = {vi.name for vi in proto.graph.input}
    for t in proto.graph.initializer:
        small = t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= 1024
        if small:
            g.initializer.append(t)
        elif t.name not in present:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _node_flops(node: onnx.NodeProto, shapes: dict) -> int | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return 0
    out = shapes.get(node.output[0]) if node.output else None

    def attr(name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    if op in ("Conv", "ConvTranspose"):
        w = shapes.get(node.input[1])
        if w is None or out is None:
            return None
        if op == "ConvTranspose":
            x = shapes.get(node.input[0])
            if x is None:
                return None
            return 2 * math.prod(w) * x[0] * math.prod(x[2:])
        return 2 * math.prod(w) * out[0] * math.prod(out[2:])
    if op in ("Gemm", "MatMul"):
        b = shapes.get(node.input[1])
        if b is None or out is None:
            return None
        k = b[-1] if (op == "Gemm" and attr("transB", 0)) else b[-2] if len(b) >= 2 else b[0]
        return 2 * math.prod(out) * k
    if op in ("MaxPool", "AveragePool", "LpPool"):
        if out is None:
            return None
        return math.prod(out) * math.prod(attr("kernel_shape", [1]))
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        x = shapes.get(node.input[0])
        return math.prod(x) if x is not None else None
    return 0


# --------------------------------------------------------------------------
# undilated twin
# --------------------------------------------------------------------------

_WINDOW_OPS = ("Conv", "MaxPool", "AveragePool")
_INT64_MAX = 2**63 - 1


def undilated_twin(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy of a dense model with every Conv/MaxPool/AveragePool dilation set to 1, at the same map sizes.

    Why: the achieved TFLOP/s of a dense model means little on its own; its twin does the same
    FLOPs on maps of the same size with undilated windows, so dense TFLOP/s over twin TFLOP/s
    is what dilation costs on that machine (benchmarks/gpu_speed.py). Its outputs are not the
    dense model's values, only the same workload.

    Per window and spatial axis, the dilated extent shrinks by ``(d-1)*(k-1)``; the pads shrink
    by as much in total (split between begin and end, never below 0) and, where the pads are
    smaller than that (a dense pool or fc6 with no padding), a Slice crops the window's input by
    the rest, so every output keeps the dense model's size and FLOPs (a Slice counts none; its
    copy is in the twin's time). ``auto_pad=SAME_*`` outputs do not depend on the dilation: only
    the dilation changes. ``input_shapes``: check with ONNX shape inference that the twin runs
    there (one-line DenseError if not). The input proto is not modified.
    """
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    graph = twin.graph
    opset = next((o.version for o in twin.opset_import if o.domain in ("", "ai.onnx")), 0)
    inferred: list[dict] = []

    def weight_shape(name: str) -> tuple | None:
        if not inferred:  # only for a Conv without kernel_shape
            inferred.append(_static_shapes(model))
        return inferred[0].get(name)

    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        attrs = {a.name: a for a in node.attribute}
        dil = list(attrs["dilations"].ints) if "dilations" in attrs else []
        if node.op_type in _WINDOW_OPS and node.domain in ("", "ai.onnx") and any(d > 1 for d in dil):
            crop = _undilate(node, attrs, dil, weight_shape)
            if any(crop):
                if opset < 10:
                    raise DenseError(f"undilated twin: cropping needs Slice with inputs (opset >= 10); the model has opset {opset}")
                nodes.append(_crop_node(graph, node, i, crop))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [p for p in twin.metadata_props if p.key != metadata.KEY]  # its grid is not the dense model's
    del twin.metadata_props[:]
    twin.metadata_props.extend(kept)
    twin.doc_string = "undilated twin (onnx_dense.bench.undilated_twin): a timing workload, not the dense model"
    if input_shapes:
        problem = _shape_problem(twin, input_shapes)
        if problem:
            raise DenseError(f"the undilated twin does not run at {dict(input_shapes)}: {problem}")
    return twin


def _undilate(node: onnx.NodeProto, attrs: dict, dil: list[int], weight_shape: Callable[[str], tuple | None]) -> list[int]:
    """Set the node's dilations to 1 and shrink its pads; returns the input crop (begins, ends) still needed."""
    rank = len(dil)
    label = f"node '{node.name or node.output[0]}' ({node.op_type})"
    if "kernel_shape" in attrs:
        kernel = list(attrs["kernel_shape"].ints)
    else:
        weight = weight_shape(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight) != rank + 2:
            raise DenseError(f"undilated twin: {label} has no kernel_shape and no static weight shape")
        kernel = list(weight[2:])
    auto = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    attrs["dilations"].ints[:] = [1] * rank
    if auto in ("SAME_UPPER", "SAME_LOWER"):  # output ceil(n / s) whatever the dilation
        return [0] * (2 * rank)
    pads = list(attrs["pads"].ints) if "pads" in attrs and auto != "VALID" else [0] * (2 * rank)
    crop = [0] * (2 * rank)
    for ax in range(rank):
        need = (dil[ax] - 1) * (kernel[ax] - 1)
        begin = min(pads[ax], need // 2)
        end = min(pads[ax + rank], need - begin)
        begin = min(pads[ax], need - end)
        pads[ax] -= begin
        pads[ax + rank] -= end
        rest = need - begin - end
        crop[ax], crop[ax + rank] = rest // 2, rest - rest // 2
    if "pads" in attrs:
        attrs["pads"].ints[:] = pads
    return crop


def _crop_node(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, crop: list[int]) -> onnx.NodeProto:
    """A Slice cropping ``node``'s data input by ``crop`` (begins, ends) on its spatial axes; rewires ``node``."""
    rank = len(crop) // 2
    prefix = f"onnx_dense_twin_{index}_"
    values = {
        "starts": crop[:rank], "ends": [-e if e else _INT64_MAX for e in crop[rank:]], "axes": list(range(2, 2 + rank)),
    }
    for key, value in values.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), prefix + key))
    cropped = prefix + "input"
    slice_node = onnx.helper.make_node(
        "Slice", [node.input[0], prefix + "starts", prefix + "ends", prefix + "axes"], [cropped], name=prefix + "crop"
    )
    node.input[0] = cropped
    return slice_node


def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    """Static shapes ONNX shape inference finds at the model's own input sizes (weights included)."""
    light = _light(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    shapes: dict[str, tuple] = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for vi in itertools.chain(inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes.setdefault(vi.name, tuple(d.dim_value for d in tt.shape.dim))
    return shapes


# --------------------------------------------------------------------------
# per-node profile
# --------------------------------------------------------------------------


def _profile_nodes(orig_model, dense_model, feeds, names, provider, optimize, threads, runs, orig_graph, dense_graph):
    orig_flops, orig_alias = orig_graph
    dense_flops, dense_alias = dense_graph
    orig_times, orig_ops = _profile(orig_model, feeds, names, provider, optimize, threads, runs, orig_alias)
    dense_times, dense_ops = _profile(dense_model, feeds, None, provider, optimize, threads, runs, dense_alias)
    rows = []
    for node in list(dict.fromkeys([*dense_times, *orig_times])):
        rows.append(
            NodeTime(
                node, dense_ops.get(node) or orig_ops.get(node, "?"), orig_times.get(node), dense_times.get(node),
                orig_flops.get(node), dense_flops.get(node),
            )
        )
    return rows


_FUSABLE = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Add", "Sum", "BatchNormalization", "Mul", "Div",
    "HardSwish", "Identity",
}


def _aliases(proto: onnx.ModelProto, flops: dict[str, int]) -> dict[str, str]:
    """Tensor or node name -> the name of the FLOP-counted node whose output it is, through fusable
    element-wise nodes (ORT names a fused node after its output, e.g. ``<Relu output>_nchwc``)."""
    alias: dict[str, str] = {}
    for i, node in enumerate(proto.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if name in flops:
            alias[name] = name
            for o in node.output:
                alias[o] = name
        elif node.op_type in _FUSABLE:
            sources = [alias[x] for x in node.input if x in alias]
            if sources:
                alias[name] = sources[-1]
                for o in node.output:
                    alias[o] = sources[-1]
    return alias


def _profile(model, feeds, names, provider, optimize, threads, runs, alias) -> tuple[dict[str, float], dict[str, str]]:
    """ms per pass of each node, the fastest of ``runs`` passes after one warm-up (ORT's profiler;
    the fastest is the least disturbed by other work on a shared machine).

    Profiled nodes are named as in the ONNX graph when ``alias`` resolves them (ORT renames
    nodes it fuses or converts to NCHWc after their output tensor); nodes ORT adds (layout
    reorders) keep ORT's name.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="onnx-dense-profile-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "profile")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        try:
            session = ort.InferenceSession(source, so, providers=[PROVIDERS[provider]])
            feed = {i.name: feeds[i.name] for i in session.get_inputs()}
            for _ in range(runs + 1):
                session.run(names, feed)
            path = session.end_profiling()
        except Exception as exc:
            raise DenseError(f"onnxruntime profiling failed: {str(exc).strip().splitlines()[0][:300]}") from None
        with open(path) as f:
            events = json.load(f)
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: dict[str, list[float]] = {}
    ops: dict[str, list[str]] = {}
    for r, (start, end) in enumerate(model_runs[1:]):
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not start <= e["ts"] <= end:
                continue
            node = e["name"][: -len("_kernel_time")]
            for candidate in (node, node.removesuffix("_nchwc")):
                if candidate in alias:
                    node = alias[candidate]
                    break
            op = e.get("args", {}).get("op_name", "?")
            if op not in ops.setdefault(node, []):
                ops[node].append(op)
            times = per_run.setdefault(node, [0.0] * (len(model_runs) - 1))
            times[r] += e["dur"] / 1000
    return {k: float(np.min(v)) for k, v in per_run.items()}, {k: "+".join(v) for k, v in ops.items()}


# --------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------


def machine_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
            mem = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    load = None
    if hasattr(os, "getloadavg"):
        load = [round(v, 2) for v in os.getloadavg()]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "numpy": np.__version__, "load_average": load,
    }


def _finite(value):
    """JSON has no inf/nan: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
