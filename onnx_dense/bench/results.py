"""What ``onnx-dense bench`` reports: measurements, checks, per-node times, targets."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from onnx_dense.bench.machine import _finite

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



