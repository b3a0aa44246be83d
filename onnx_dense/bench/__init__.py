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

Modules: results.py (what is reported, targets), driver.py (``bench``, ``load_pair``),
stitch.py (shift-and-stitch), flops.py (FLOP counting), twin.py (the undilated twin),
profiling.py (per-node times), machine.py (machine info).
"""

from onnx_dense.bench.driver import Pair, bench, load_pair
from onnx_dense.bench.flops import count_flops
from onnx_dense.bench.machine import machine_info
from onnx_dense.bench.results import (
    DEFAULT_ATOL, DEFAULT_RTOL, EFFICIENCY_TARGET, STITCH_TARGET, BenchResult, Check, Measurement, NodeTime,
)
from onnx_dense.bench.twin import undilated_twin

__all__ = [
    "DEFAULT_ATOL", "DEFAULT_RTOL", "EFFICIENCY_TARGET", "STITCH_TARGET", "BenchResult", "Check", "Measurement",
    "NodeTime", "Pair", "bench", "count_flops", "load_pair", "machine_info", "undilated_twin",
]
