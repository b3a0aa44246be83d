"""Which way to run a dense model on one image, given a memory budget.

Schedules, from fastest to leanest (all give the untiled output):

* ``whole``: the dense model on the whole image, one onnxruntime run.
* ``phases``: stage by stage, phase by phase (:mod:`onnx_dense.runtime.phases`), split at
  the first ``depth`` eST levels: each split divides the activations after it by the
  number of phases and does no extra work.
* ``phases+tiles``: the same on tiles of the image (:mod:`onnx_dense.runtime.tiling`): the
  tiles overlap by the receptive field, a tax paid only when the image is too large even
  phase by phase.
* ``tiles``: tiles of the whole dense model (models that cannot be split into phases).

The estimate. ONNX shape inference at the image size gives every value's bytes; a walk over
the nodes in order, allocating outputs and freeing each value after its last reader, gives
the largest set of live values (onnxruntime plans its memory the same way, reusing buffers
of dead values). A stage run by phases sees its values divided by the number of phases at
its level; the values carried across a split and the stitched outputs stay alive. Add the
image, the outputs and what the process already holds (weights, sessions: its RSS now).
The budget is for the whole process, so the choice is the fastest schedule whose estimate,
times a margin for allocator slack (:data:`MARGIN`), fits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError

MARGIN = 1.5  # estimate x MARGIN must fit: allocator slack, kernels' scratch (im2col), Python copies
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}
KINDS = ("auto", "whole", "phases", "phases+tiles", "tiles")


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

    def describe(self) -> str:
        parts = [self.kind]
        if "phases" in self.kind:
            parts.append(f"split at {self.depth} eST level{'s' if self.depth != 1 else ''}, {self.runs} phases")
        if self.tile is not None:
            parts.append(f"{self.tiles} tiles of {'x'.join(map(str, self.tile))}")
        line = ", ".join(parts)
        if self.estimate is not None:
            line += f"; estimated peak {fmt_bytes(self.estimate)}"
            if self.budget is not None:
                line += f" of {fmt_bytes(self.budget)} allowed"
        return line

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "depth": self.depth, "tile": list(self.tile) if self.tile else None,
            "estimate_bytes": self.estimate, "budget_bytes": self.budget, "phases": self.runs, "tiles": self.tiles,
        }


# --------------------------------------------------------------------------------------------
# activation sizes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Profile:
    """Bytes of every value of the dense graph at one input size, and the node order."""

    size: tuple[int, ...]
    nbytes: dict[str, int]
    nodes: list[tuple[list[str], list[str]]]  # (inputs, outputs) per node, in graph order
    outputs: list[str]
    graph_inputs: list[str]

    def scaled(self, size: Sequence[int]) -> "Profile":
        """The same values at another input size (bytes scale with the number of pixels)."""
        ratio = math.prod(size) / max(1, math.prod(self.size))
        return Profile(tuple(size), {k: int(v * ratio) for k, v in self.nbytes.items()}, self.nodes, self.outputs,
                       self.graph_inputs)


_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8,
    onnx.TensorProto.INT32: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.BFLOAT16: 2,
}


def profile(structure: onnx.ModelProto, info: metadata.DenseInfo, input_name: str, size: Sequence[int]) -> Profile:
    """Shape inference at ``size`` (per spatial axis of ``input_name``): bytes of every value."""
    from onnx_dense.runtime.tiling import _light_copy

    entry = info.inputs[input_name]
    light = _light_copy(structure, input_name, dict(zip(entry.spatial_axes, size)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # a model ORT runs but onnx cannot infer: no estimate
        raise DenseError(f"cannot estimate memory: shape inference failed ({str(exc).splitlines()[0][:200]})") from None
    inits = {t.name for t in structure.graph.initializer}
    nbytes: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        nbytes[vi.name] = int(np.prod(dims, dtype=np.float64)) * _ITEMSIZE.get(tt.elem_type, 4)
    nodes = [([i for i in n.input if i and i not in inits], [o for o in n.output if o]) for n in structure.graph.node]
    graph_inputs = [i.name for i in structure.graph.input if i.name not in inits]
    return Profile(tuple(size), nbytes, nodes, [o.name for o in structure.graph.output], graph_inputs)


def live_peak(prof: Profile, nodes: Sequence[tuple[list[str], list[str]]], *, divide: float = 1.0,
              keep: set[str] = frozenset()) -> int:
    """Largest sum of live values while ``nodes`` run in order (inputs live until their last reader)."""
    last: dict[str, int] = {}
    for i, (ins, _) in enumerate(nodes):
        for name in ins:
            last[name] = i
    made = {o for _, outs in nodes for o in outs}
    live: dict[str, int] = {}
    for name in last:  # values from outside the stage are there from the start
        if name not in made:
            live[name] = prof.nbytes.get(name, 0)
    peak = sum(live.values())
    for i, (ins, outs) in enumerate(nodes):
        for o in outs:
            live[o] = prof.nbytes.get(o, 0)
        peak = max(peak, sum(live.values()))
        for name in ins:
            if last.get(name) == i and name not in keep:
                live.pop(name, None)
        for o in outs:
            if o not in last and o not in keep:
                live.pop(o, None)
    return int(peak / divide)


def whole_peak(prof: Profile) -> int:
    """The dense model on the whole image: its live values, plus its input and outputs."""
    io = sum(prof.nbytes.get(n, 0) for n in [*prof.graph_inputs, *prof.outputs])
    return live_peak(prof, prof.nodes, keep=set(prof.outputs)) + io


def phases_peak(prof: Profile, plan_stages, output_names: Sequence[str]) -> int:
    """Phase by phase: per stage, its live values over its phases, plus what is held above it.

    ``plan_stages``: (level, node names' (inputs, outputs), inputs, outputs) per stage, in order.
    """
    outputs_bytes = sum(prof.nbytes.get(n, 0) for n in output_names)
    held = sum(prof.nbytes.get(n, 0) for n in prof.graph_inputs) + outputs_bytes
    peak = 0
    carried = 0
    for k, (level, nodes, inputs, outs) in enumerate(plan_stages):
        parts = math.prod(level)
        stage = live_peak(prof, nodes, divide=parts)
        # a phase's inputs are copies of slices of what the stage above carries
        copies = sum(prof.nbytes.get(n, 0) for n in inputs) / parts
        peak = max(peak, held + carried + stage + copies)
        carried += sum(prof.nbytes.get(n, 0) for n in outs if n not in output_names) / parts
    return int(peak)
