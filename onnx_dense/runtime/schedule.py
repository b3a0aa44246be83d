"""Which way to run a dense model on one image, given a memory budget.

Schedules, from fastest to leanest mostly (all give the untiled output):

* ``whole``: the dense model on the whole image, one onnxruntime run.
* ``phases``: stage by stage, phase by phase (:mod:`onnx_dense.runtime.phases`), split at
  the first ``depth`` eST levels: each split divides the activations after it by the
  number of phases and does no extra work.
* ``tiled-trunk``: phases, with the trunk (the original network before the first split,
  whose maps are the largest) on tiles: they overlap by the trunk's receptive field only,
  and later stages run phase by phase on the whole maps.
* ``phases+tiles``: the same on tiles of the image (:mod:`onnx_dense.runtime.tiling`): the
  tiles overlap by the receptive field, a tax paid only when the image is too large even
  phase by phase.
* ``tiles``: tiles of the whole dense model (models that cannot be split into phases).

The estimate. ONNX shape inference at the image size gives every value's bytes; a walk over
the nodes in order, allocating outputs and freeing each value after its last reader, gives
the largest set of live values (onnxruntime plans its memory the same way, reusing buffers
of dead values; an elementwise node's output takes the buffer of an input that dies there,
as onnxruntime's fusions and in-place kernels do). A stage run by phases sees its values
divided by the number of phases at its level; the values carried across a split, the phase
copies of a stage's inputs and the output buffers are numpy arrays, counted exactly. The
image (and any other feed) is in the process's RSS when the schedule is chosen, so it is
counted once, there; a tile's copy of it is counted. Add what making the sessions costs
(:func:`session_bytes`). The budget is for the whole process, so the choice is the schedule
expected fastest (:func:`relative_time`: the overlap tiles recompute against the maps deeper
splits move) whose estimate fits, onnxruntime's values counted :data:`MARGIN` times (none fits: the
fastest within 5% of the leanest's estimate above the RSS before the run, since tiles much
smaller save little). Budgeted
sessions run without onnxruntime's memory arena (it grows by doubling and keeps what it held),
and without its memory pattern where the chosen schedule would not fit with the values counted
:data:`PATTERN_MARGIN` times (the pattern's planned block took up to 1.5x a first run's memory).

Measured (2026-12-03, ORT 1.32 CPU, 2 threads; ``benchmarks/schedules.py``'s two models, the
FCN sample at output stride 1 and a ResNet-18 layout at output stride 8, whole, 1, 2 and 4
eST levels, phases on tiles, tiles; 512 to 4096 pixels, 26 runs): the peak (``VmHWM``) was
0.67-0.97 of the estimate (whole runs 0.67-0.95); the largest share of ``MARGIN`` a run
needed was 1.35 (the FCN by 16 phases at 2048), 1.3 (the ResNet by phases on tiles at 4096).
The estimate before (the image counted up to four times, no in-place outputs, arena on) was
1.4-2.6x the measured peak on the ResNet at 2048-4096 and chose phases on tiles where the
whole run fits.
The tiled trunk (same day, the ResNet under 300 MB, 700 MB and 2 GB at 2048, 4096 and 8000):
0.94-0.98 of the estimate.
onnxruntime's blocked layout (NCHWc) is modelled since 2026-12-07 evening
(:func:`_blocked_layout`): conv outputs padded to the channel block, and the copies of maps
read in the other layout. Without it an 8-wide
ResNet peaked 1.03-1.08x its estimate, a ConvNeXt-like block 1.25-1.27x (not measured again).
Not modelled: kernels' scratch beyond ``MARGIN`` (a Conv that expands its whole input for a
GEMM), other providers (CUDA: device memory is not RSS). onnxruntime's memory
pattern is not modelled either: it is turned off where it would not fit (:data:`PATTERN_MARGIN`).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import re
from typing import Sequence

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError

MARGIN = 1.5  # onnxruntime's values x MARGIN must fit: allocator slack, kernels' scratch (im2col)
# onnxruntime's memory pattern: after the first run of an input shape, a session allocates that
# shape's values as one planned block, which took 1.2-1.5x the first run's memory (ResNet-50
# at 2048 by phases: 656 MiB a phase against 465; whole runs of public trunks 1.3-1.5x; needs
# up to 2.0 of the values, measured 2026-12-07). A budgeted run keeps the pattern (faster:
# without it every value is a fresh block, 1.1-1.4x the time) only if the schedule's estimate
# with the values counted PATTERN_MARGIN times fits too.
PATTERN_MARGIN = 2.1
SESSION_BYTES = 24 * 2**20  # onnxruntime's sessions and run-time buffers beside the weights and values
# A run's buffers beside its values, its sessions made: 8-13 MiB on small models (measured
# 2026-11); a final upsampling in small bands holds little more (0.6 MiB over an estimate
# without it, DeepLabV3 sample at 1024 in 8 bands, 2026-12-07)
RUN_BYTES = 8 * 2**20


def session_bytes(weights: int, stages: bool = False) -> int:
    """What the sessions and a run add to the process besides the values: measured on CPU (2
    threads), making a whole model's session 9-10 MiB + the weights, and a run of small models
    8-13 MiB above its values: counted as twice the weights + :data:`SESSION_BYTES`. Stage
    sessions (``stages``) are built from the model loaded with its weights and each stage's
    serialised model, whose pages the process keeps: 2.6-3.9x the weights on public trunks
    (ResNet-18-D 142 MiB for 43 MiB of weights, VGG-11 115 for 35, DenseNet-121 70 for 27,
    ConvNeXt-atto 50 for 13), counted as three times the weights + :data:`SESSION_BYTES`."""
    return (3 if stages else 2) * weights + SESSION_BYTES


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}
KINDS = ("auto", "whole", "phases", "tiled-trunk", "phases+tiles", "tiles")


def parse_memory(text) -> int | None:
    """``'2GB'``, ``'1.5G'``, ``'800MiB'``, ``512000000`` -> bytes (binary units: 1 GB = 2^30 B)."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise DenseError(f"--max-memory '{text}': expected a size such as 2GB, 1.5G or 800MB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise DenseError(f"--max-memory '{text}': must be more than 0")
    return value


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What a run did (or will do): ``kind``, the split depth and tile size, and the estimate."""

    kind: str
    depth: int = 0  # phases: eST levels split
    tile: tuple[int, ...] | None = None
    estimate: int | None = None  # bytes of peak RSS expected
    budget: int | None = None
    runs: int = 1  # onnxruntime runs of the deepest stage per tile
    tiles: int = 1
    over: str = "the leanest"  # which schedule this is when none fits the budget
    instead: str | None = None  # why this ran instead of the schedule chosen
    pattern: bool = True  # onnxruntime's memory pattern on (see PATTERN_MARGIN)
    tail: bool = False  # the estimate is the rebuilt final upsampling's
    tail_bands: int = 0  # the rebuilt final upsampling ran on that many bands of the score map's rows (0: whole)
    tail_by: str = "rows"  # or "channels": the bands were groups of the score map's channels
    cost: float | None = dataclasses.field(default=None, compare=False)  # expected time / the whole run's

    def describe(self) -> str:
        parts = [self.kind]
        if self.tile is None:
            tiles = None
        elif self.tiles == 1:  # the tile asked for can exceed the image; the one tile is the image
            tiles = "1 tile (the whole image)"
        else:
            tiles = f"{self.tiles} tiles of {'x'.join(map(str, self.tile))}"
        if self.kind == "tiled-trunk" and tiles:
            parts.append(f"trunk in {tiles}")
            tiles = None
        if "phases" in self.kind or self.kind == "tiled-trunk":
            parts.append(f"split at {self.depth} eST level{'s' if self.depth != 1 else ''}, {self.runs} phases")
        if tiles:
            parts.append(tiles)
        line = ", ".join(parts)
        if self.estimate is not None:
            line += f"; estimated peak {fmt_bytes(self.estimate)}"
            if self.tail:
                line += (f" (the final upsampling's, in {self.tail_split})" if self.tail_bands
                         else " (the final upsampling's, on the whole score map)")
            if self.budget is not None and self.estimate > self.budget:
                line += f", over the {fmt_bytes(self.budget)} allowed: no schedule fits, this is {self.over}"
            elif self.budget is not None:
                line += f" of {fmt_bytes(self.budget)} allowed"
        if not self.pattern:
            within = self.budget is not None and self.estimate is not None and self.estimate <= self.budget
            line += "; onnxruntime's memory pattern off" + (" to stay within the budget" if within else "")
        if self.tail_bands and not self.tail:
            line += f"; the final upsampling in {self.tail_split}"
        if self.instead:
            line += f" ({self.instead})"
        return line

    @property
    def tail_split(self) -> str:
        if self.tail_by == "channels":
            return f"{self.tail_bands} groups of channels"
        return f"{self.tail_bands} bands"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "depth": self.depth, "tile": list(self.tile) if self.tile else None,
            "estimate_bytes": self.estimate, "budget_bytes": self.budget, "phases": self.runs, "tiles": self.tiles,
            "memory_pattern": self.pattern, **({"instead": self.instead} if self.instead else {}),
            **({"estimate_of": "final upsampling"} if self.tail else {}),
            **({"final_upsampling_bands": self.tail_bands} if self.tail_bands else {}),
            **({"final_upsampling_by": self.tail_by} if self.tail_bands else {}),
        }


# --------------------------------------------------------------------------------------------
# activation sizes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Profile:
    """Bytes of every value of the dense graph at one input size, and the node order."""

    size: tuple[int, ...]
    nbytes: dict[str, int]
    nodes: list[tuple[list[str], list[str], str]]  # (inputs, outputs, op_type) per node, in graph order
    outputs: list[str]
    graph_inputs: list[str]
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # at ``size`` only
    channels: dict[str, int] = dataclasses.field(default_factory=dict)  # axis 1 of 4-D float values, any size

    def scaled(self, size: Sequence[int]) -> "Profile":
        """The same values at another input size (bytes scale with the number of pixels; no shapes)."""
        ratio = math.prod(size) / max(1, math.prod(self.size))
        return Profile(tuple(size), {k: int(v * ratio) for k, v in self.nbytes.items()}, self.nodes, self.outputs,
                       self.graph_inputs, channels=self.channels)


_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8,
    onnx.TensorProto.INT32: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.BFLOAT16: 2,
}


def profile(structure: onnx.ModelProto, info: metadata.DenseInfo, input_name: str, size: Sequence[int]) -> Profile:
    """Shape inference at ``size`` (per spatial axis of ``input_name``): bytes of every value."""
    from onnx_dense.runtime.tiling import _light_copy, infer_static

    entry = info.inputs[input_name]
    light = _light_copy(structure, input_name, dict(zip(entry.spatial_axes, size)))
    try:
        inferred = infer_static(light)
    except Exception as exc:  # a model ORT runs but onnx cannot infer: no estimate
        raise DenseError(f"cannot estimate memory: shape inference failed ({str(exc).splitlines()[0][:200]})") from None
    inits = {t.name for t in structure.graph.initializer}
    nbytes: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    channels: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        nbytes[vi.name] = int(np.prod(dims, dtype=np.float64)) * _ITEMSIZE.get(tt.elem_type, 4)
        if all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(dims)
        if len(dims) == 4 and tt.elem_type == onnx.TensorProto.FLOAT and tt.shape.dim[1].HasField("dim_value"):
            channels[vi.name] = dims[1]
    nodes = [([i for i in n.input if i and i not in inits], [o for o in n.output if o], n.op_type)
             for n in structure.graph.node]
    graph_inputs = [i.name for i in structure.graph.input if i.name not in inits]
    return Profile(tuple(size), nbytes, nodes, [o.name for o in structure.graph.output], graph_inputs, shapes,
                   channels)


# Elementwise ops: onnxruntime fuses them into the Conv before them (Conv + activation, Conv +
# Add + activation on CPU) or runs them in place (kernels declared MayInplace): an input of the
# output's size whose last reader is such a node gives its buffer to the output. Phases run them
# in the stage that makes their inputs (phases.POINTWISE is this list).
ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "ThresholdedRelu", "BatchNormalization", "Identity", "Dropout",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
})


def _nchwc_block() -> int:
    """The channel block of onnxruntime's blocked layout (NCHWc) on this CPU, as MLAS picks it:
    16 with AVX-512, 8 with AVX or AVX2, none on older x86; 16 where it cannot tell (the larger
    block pads narrow layers more, so the estimate errs high)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return 16
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return 16
    if not flags:
        return 16
    return 16 if "avx512f" in flags else 8 if "avx" in flags or "avx2" in flags else 0


NCHWC_BLOCK = _nchwc_block()
# Ops onnxruntime runs on blocked tensors when every map they read is blocked and their channels
# are a multiple of the block (activations fused into the conv before them: whatever its
# channels); others read a plain copy. Measured: an 8-wide ResNet's Add and the FCN sample's
# MaxPool on 8 channels ran plain after a copy back.
FUSED_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Clip"})
NCHWC_OPS = FUSED_ACTIVATIONS | {
    "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat", "Add", "Sum", "Mul",
    "BatchNormalization", "Identity", "Dropout",
}


@dataclasses.dataclass
class _Blocked:
    """onnxruntime's blocked layout over a run of nodes (:func:`_blocked_layout`)."""

    held: dict[str, int]  # value -> bytes it holds (blocked, padded; plus its plain copy where both are read)
    padded: dict[str, int]  # value -> bytes of its blocked form, for the values made blocked
    transient: dict[int, int]  # node index -> a blocked output's bytes, alive until its plain copy is made
    copies: dict[str, tuple[int, int, int]]  # plain value -> (first, last conv reading it, bytes of its blocked copy)


def _blocked_layout(prof: Profile, nodes: Sequence[tuple], keep: set[str], skip: set[str]) -> _Blocked:
    """What onnxruntime's blocked layout (NCHWc) changes in a run of ``nodes``.

    Measured (2026-12-07, ORT 1.32, AVX-512, block of 16 channels; two convs 3 -> C -> C with
    a Relu after each, at 1024 and 2048, arena and memory pattern off): every float conv writes
    its output blocked, its channels padded to the block (24 -> 32). A conv reads its input
    blocked when it has at least a block of channels (a plain one is copied in, alive from its
    first conv reader to its last), else plain. Activations run blocked on blocked maps (fused
    into the conv), other elementwise ops and pools only where the channels fill whole blocks.
    A blocked map read in the plain layout (by a narrow conv, an op that is not blocked, or as
    a stage's or graph's output) is copied back once the node's dying inputs are gone, both
    alive at once. Peaks, in maps of one channel: C = 8, 24 where the graph holds 16;
    C = 12, 28 (24); C = 24, 64 (48); C = 40, 96 (80); 16 then 24, 56 (40); C = 16 or 32, what
    the graph holds. The estimate walks these sizes instead of the graph's; without them the
    tests' 8-wide ResNet at 2048 peaked 1.03-1.08x its estimate.
    """
    block = NCHWC_BLOCK
    result = _Blocked({}, {}, {}, {})
    if not block or not prof.channels:
        return result
    channels, nbytes = prof.channels, prof.nbytes

    def pad(v: str) -> int:
        c = channels[v]
        return int(nbytes.get(v, 0) * (-(-c // block) * block) / c)

    producer: dict[str, int] = {}
    plain_reads: set[str] = set()  # values some node reads in the plain layout
    blocked_reads: set[str] = set()  # values some node reads blocked
    for i, node in enumerate(nodes):
        op = node[2] if len(node) > 2 else ""
        ins, outs = node[0], node[1]
        maps = [v for v in ins if v in channels]
        if op == "Conv" and ins and outs and ins[0] in channels and outs[0] in channels:
            x, o = ins[0], outs[0]
            if channels[x] >= block:
                blocked_reads.add(x)
                if x not in result.padded:  # a plain map copied into the blocked layout
                    first = result.copies.get(x, (i, i, 0))[0]
                    result.copies[x] = (first, i, pad(x))
            else:
                plain_reads.add(x)
            result.padded[o] = pad(o)
            producer[o] = i
            continue
        runs_blocked = (op in NCHWC_OPS and outs and outs[0] in channels and maps
                        and all(v in result.padded for v in maps)
                        and (op in FUSED_ACTIVATIONS or all(channels[v] % block == 0 for v in maps)))
        (blocked_reads if runs_blocked else plain_reads).update(maps)
        if runs_blocked:
            result.padded[outs[0]] = pad(outs[0])
            producer[outs[0]] = i
    for v, size in result.padded.items():
        plain = (v in keep or v in skip or v in prof.outputs or v in plain_reads)
        if not plain:
            result.held[v] = size
        elif v in blocked_reads:  # read both ways: both forms held
            result.held[v] = size + nbytes.get(v, 0)
        else:  # copied back as it is made
            result.held[v] = nbytes.get(v, 0)
            result.transient[producer[v]] = result.transient.get(producer[v], 0) + size
    return result


def live_peak(prof: Profile, nodes: Sequence[tuple], *, divide: float = 1.0,
              keep: set[str] = frozenset(), skip: set[str] = frozenset()) -> int:
    """Largest sum of live values while ``nodes`` ((inputs, outputs[, op_type]) each) run in order.

    A value lives from the node that makes it (values from outside ``nodes``: from the start)
    to its last reader; values in ``keep`` to the end; values in ``skip`` are not counted
    (held, and counted, by the caller). An :data:`ELEMENTWISE` node's output takes the buffer
    of an input of its size that dies there (not one in ``keep`` or ``skip``). The copies
    onnxruntime's blocked layout makes are counted too (:func:`_blocked_layout`).
    """
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node[0]:
            last[name] = i
    made = {o for node in nodes for o in node[1]}
    layout = _blocked_layout(prof, nodes, set(keep), set(skip))
    live: dict = {}
    for name in last:  # values from outside the stage are there from the start
        if name not in made and name not in skip:
            live[name] = prof.nbytes.get(name, 0)
    peak = sum(live.values())
    for i, node in enumerate(nodes):
        ins, outs = node[0], node[1]
        for name, (first, _, size) in layout.copies.items():
            if first == i:
                live[(name, "blocked")] = size
        dying = [n for n in ins if last.get(n) == i and n not in keep and n in live]
        for o in outs:
            if o in skip:
                continue
            size = layout.held.get(o, prof.nbytes.get(o, 0))
            if len(node) > 2 and node[2] in ELEMENTWISE:
                written = layout.padded.get(o, size)
                donor = next((n for n in dying if live.get(n) == written), None)
                if donor is not None:  # in place: the input's buffer becomes the output
                    live.pop(donor)
                    dying.remove(donor)
            live[o] = size
        total = sum(live.values())
        blocked = layout.transient.get(i, 0)
        if blocked:  # the blocked output is written beside the inputs; its plain copy once they are gone
            made_now = sum(live.get(o, 0) for o in outs)
            gone = sum(live.get(n, 0) for n in dying)
            peak = max(peak, total - made_now + blocked, total - gone + blocked)
        else:
            peak = max(peak, total)
        for name in dying:
            live.pop(name, None)
        for name, (_, end, _) in layout.copies.items():
            if end == i:
                live.pop((name, "blocked"), None)
        for o in outs:
            if o not in last and o not in keep:
                live.pop(o, None)
    return int(peak / divide)


def whole_peak(prof: Profile, *, resident: bool = True, margin: float = MARGIN) -> int:
    """The dense model in one onnxruntime run: bytes above what the process holds before it.

    onnxruntime's values (its outputs kept to the end) times ``margin``, plus the outputs'
    numpy copies. The inputs are counted only if not ``resident`` (a tile's copy of the image;
    the caller's own arrays are in its RSS already).
    """
    inputs = sum(prof.nbytes.get(n, 0) for n in prof.graph_inputs)
    outputs = sum(prof.nbytes.get(n, 0) for n in prof.outputs)
    ort = live_peak(prof, prof.nodes, keep=set(prof.outputs), skip=set(prof.graph_inputs))
    return int(ort * margin) + outputs + (0 if resident else inputs)


def phases_peak(prof: Profile, plan_stages, output_names: Sequence[str], *, resident: bool = True,
                margin: float = MARGIN, trunk: Profile | None = None) -> int:
    """Phase by phase (:meth:`PhasePlan.run`): bytes above what the process holds before it.

    ``plan_stages``: (level, nodes' (inputs, outputs, op_type), inputs, outputs[, how]) per
    stage, in order; ``how``: ``bound``, the stage's outputs are written into buffers its runs
    share (:meth:`PhasePlan.estimate_stages`), there from the start of a run; fragments'
    batches (runtime/fragment_batches.py): ``views``, the stage reads its inputs as slices of
    the batch (no copies); ``freed``, inputs (tensors of phases made in numpy) whose phase's
    share goes once the stage has run; ``moved``, {map: tensor of phases} made in numpy from
    this stage's maps once it has run, each map dropped once its tensor is made.
    While one phase of stage ``k`` runs, the process holds: the values stages above carry to
    later ones (their phase's share), the output arrays (each phase's run is written straight
    into its positions, plus the buffer the runs share for their share), the contiguous copies
    of the stage's inputs (stage 0 reads the image itself: counted only if not ``resident``),
    the buffers the runs of a split share for what the stage hands on (bound before the run:
    runtime/buffers.py), and onnxruntime's other values of the stage (times ``margin``).
    ``trunk``: stage 0 runs tile by tile (the profile at the tile's size): it holds its outputs
    stitched whole, one tile's copy of the image, the buffers of that tile's outputs and its
    other values.
    """
    outputs = set(output_names)
    parts = [math.prod(stage[0]) for stage in plan_stages]
    made_at = {o: k for k, stage in enumerate(plan_stages) for o in stage[3]}
    # an output made by phases: one array, and the run's numpy copy of its share as it is placed
    held = sum(prof.nbytes.get(n, 0) * (1 + (1 / parts[made_at[n]] if made_at.get(n, 0) else 0)) for n in outputs)
    if not resident:
        held += sum(prof.nbytes.get(n, 0) for n in prof.graph_inputs)
    peak = 0.0
    carried = 0.0
    for k, (level, nodes, inputs, outs, *rest) in enumerate(plan_stages):
        how = rest[0] if rest else {}
        if k == 0 and trunk is not None:  # the tiles' outputs: buffers they share, there from the start
            stitched = sum(prof.nbytes.get(n, 0) for n in outs if n not in outputs)
            tile_input = sum(trunk.nbytes.get(n, 0) for n in trunk.graph_inputs)
            bound = sum(trunk.nbytes.get(n, 0) for n in outs)
            ort = live_peak(trunk, nodes, skip=set(inputs) | set(outs))
            peak = max(peak, held + stitched + tile_input + bound + ort * margin)
        else:
            bound = set(outs) if how.get("bound") else set()
            ort = live_peak(prof, nodes, divide=parts[k], keep=set(outs), skip=set(inputs) | bound)
            copies = 0.0 if k == 0 or how.get("views") else sum(prof.nbytes.get(n, 0) for n in inputs) / parts[k]
            copies += sum(prof.nbytes.get(n, 0) for n in bound - outputs) / parts[k]  # outputs': in ``held``
            peak = max(peak, held + carried + copies + ort * margin)
        carried += sum(prof.nbytes.get(n, 0) for n in outs if n not in outputs) / parts[k]
        carried -= sum(prof.nbytes.get(n, 0) for n in how.get("freed", ())) / parts[k]
        for source, cut in how.get("moved", {}).items():  # the map and its tensor of phases, then the map goes
            peak = max(peak, held + carried + prof.nbytes.get(cut, 0) / parts[k])
            carried += (prof.nbytes.get(cut, 0) - prof.nbytes.get(source, 0)) / parts[k]
    return int(peak)


# What a byte crossing a stage boundary costs, against a byte of a value made inside a run: each
# phase's inputs are copied out of the map above (a strided gather), onnxruntime turns them into
# its blocked layout and its outputs back, and the results are placed in the map below. Measured
# (2026-12-07, ORT 1.32 CPU, 2 threads, huge pages): the FCN sample at 2048 by 4 phases took
# 5.9-6.9 s, by 256 phases 9.3-9.7 s (3.5 GB more crossing the boundaries, 13.3 GB of values
# made); the ResNet at 8000 by 16 phases 1.5x its whole run (2.5 GB crossing, 15.3 GB made).
BOUNDARY_COST = 2.0
RUN_PIXELS = 16  # a run's fixed cost, in pixels of the side of the map it runs on


def relative_time(prof: Profile, plan_stages=None, *, side: float, pixels: float = 1.0,
                  trunk_pixels: float = 1.0) -> float:
    """The time a schedule is expected to take, against the whole run's: what the choice under a
    budget minimises. Time is taken to follow the bytes of the values the nodes make (measured
    0.45-0.48 s per GB on this machine's two models, ``BOUNDARY_COST``), so that it needs no FLOP
    count. ``plan_stages``: as :func:`phases_peak` takes (None: the whole model); ``pixels``:
    the image pixels the runs compute, against the image's (tiles recompute their overlap);
    ``trunk_pixels``: the same for stage 0 alone (a tiled trunk); ``side``: the smallest map a
    run sees, in image pixels over its level (many runs on small maps each pay
    :data:`RUN_PIXELS`)."""
    made = {o for _, outs, *_ in prof.nodes for o in outs}
    total = max(1, sum(prof.nbytes.get(o, 0) for o in made))
    crossing = trunk = 0
    for k, (level, nodes, inputs, outs, *rest) in enumerate(plan_stages or ()):
        if k == 0:
            trunk = sum(prof.nbytes.get(o, 0) for _, node_outs, *_ in nodes for o in node_outs)
        else:
            crossing += sum(prof.nbytes.get(n, 0) for n in (*inputs, *outs))
    cost = (1 + BOUNDARY_COST * crossing / total) * pixels + (trunk_pixels - 1) * trunk / total
    return cost * (1 + RUN_PIXELS / max(1.0, side))


def tail_parts(prof: Profile, tail_nodes, held: Sequence[str], rebuilt: Sequence[str]) -> tuple[int, int]:
    """The rebuilt final upsampling (:mod:`~onnx_dense.runtime.final_tail`), run after the body
    on the stitched score maps, in bytes above what the process holds before the run: (what it
    holds whatever its bands: the body's outputs ``held``, the numpy copies of its outputs
    ``rebuilt`` and :data:`RUN_BYTES`; onnxruntime's values of one run on the whole score map,
    to be counted times the margin). Its output is the image's size, so it can be the largest
    part of a run; where its Resize is by twice the factor before a Slice that keeps every other
    pixel (passes/final_upsampling.py), that map is four times the output's."""
    ort = live_peak(prof, tail_nodes, keep=set(rebuilt), skip=set(held))
    return sum(prof.nbytes.get(n, 0) for n in (*held, *rebuilt)) + RUN_BYTES, ort


def tiles_peak(tile_prof: Profile, image_prof: Profile, plan_stages=None, output_names: Sequence[str] = (), *,
               margin: float = MARGIN) -> int:
    """Tile by tile (whole or by phases on each tile): the stitched outputs, held whole, plus one
    tile's run on its own copy of the tile (``tile_prof``: the profile at the tile's size)."""
    outputs = sum(image_prof.nbytes.get(n, 0) for n in image_prof.outputs)
    if plan_stages is None:
        one = whole_peak(tile_prof, resident=False, margin=margin)
    else:
        one = phases_peak(tile_prof, plan_stages, output_names, resident=False, margin=margin)
    return outputs + one
