"""The dense model's description of itself, stored in ``metadata_props['onnx_dense']``.

It records, per output, what verify and the runtime would otherwise have to recompute from
the original model: the eST (sample every eST positions to get the original's output), the
dense grid's stride in input pixels, which axes are spatial, and the receptive field.

Prediction ``i`` of an output along a spatial axis sees input pixels
``rf_start + i * stride`` .. ``+ rf_size - 1``; its centre is ``rf_start + i*stride + (rf_size-1)/2``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

KEY = "onnx_dense"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class DenseOutput:
    name: str
    spatial_axes: tuple[int, ...]  # axes of the dense output that are spatial
    est: tuple[int, ...]
    stride: tuple[int, ...]  # input pixels between neighbouring dense predictions
    original_stride: tuple[int, ...]
    rf_size: tuple[int, ...]
    rf_start: tuple[int, ...]
    inserted: bool  # the original output has no spatial axes (a classifier head)
    input: str
    size: tuple[int, ...]  # original output size at the static input size
    dense_size: tuple[int, ...]
    # What the off-grid phases equal (verify --phases reads it):
    # "exact": the original run on the input shifted by phase * stride, away from the start border;
    # "interior": the same, away from both borders (strategy fragments: exact at the end border
    #   too when every removed stride divides the map, see passes/fragments.py);
    # "global": global context (SE, InstanceNorm) in the dense region: phase p is the original
    #   whose first removed-stride node reads a shifted map; no cropped input reproduces it.
    off_grid: str = "exact"
    # A segmentation output whose final upsampling was rebuilt on a dense score map
    # (passes/final_upsampling.py): what it reads and how (onnx_dense/interpolation.py); verify
    # recomputes it from the score map, which is an output too. None for every other output.
    upsampling: dict | None = None

    def centres(self, axis: int, count: int) -> list[float]:
        """Input-pixel centre of each of ``count`` dense predictions along spatial axis ``axis``."""
        half = (self.rf_size[axis] - 1) / 2
        return [self.rf_start[axis] + i * self.stride[axis] + half for i in range(count)]


@dataclasses.dataclass(frozen=True)
class DenseInput:
    name: str
    spatial_axes: tuple[int, ...]
    size: tuple[int, ...]  # static size the rewrite was computed at


@dataclasses.dataclass(frozen=True)
class DenseInfo:
    output_stride: tuple[int, ...] | None
    strategy: str
    inputs: dict[str, DenseInput]
    outputs: dict[str, DenseOutput]
    source: str | None = None
    per_phase_global: bool = False  # strategy dilate: global context as per-phase means
    tuning: dict[str, Any] | None = None  # --tune: median ms per candidate strategy, provider
    # Per value in the dense region (eST > 1 on some axis): (eST, spatial axes). The phase
    # schedule (runtime/phases.py) splits the graph where eST grows; None for older models.
    values: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None
    # Per dense value whose positions see a fixed window of the input: (dense stride, rf_start,
    # rf_size) in input pixels, as for outputs. The trunk of a phase schedule is tiled by them
    # (runtime/phases.py); None for models written before they were recorded.
    fields: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None
    # Strategy fragments: how a run can take the batch of phases one phase of a level at a time
    # (runtime/fragment_batches.py): {"levels": [{"factor": the level's phases per axis, "cuts":
    # the tensors its moves make}, ...] (first first, as deep as runs can split), "outputs":
    # {name: {"phases": the value before its batch-to-space, "levels": factors per level (first
    # first), "axes": its spatial axes, "inserted": bool}}}, or {"refused": why not}. None for
    # dilate models and fragments models written before.
    batches: dict | None = None
    # Resize sizes baked in at export and left so (passes/rederive_sizes.py): one line each. The
    # model then runs only at the inputs' recorded sizes; a failed run at another says why.
    fixed_sizes: list[str] | None = None

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "output_stride": list(self.output_stride) if self.output_stride else None,
            "strategy": self.strategy,
            "source": self.source,
            "inputs": {k: _plain(dataclasses.asdict(v)) for k, v in self.inputs.items()},
            "outputs": {k: _output_json(v) for k, v in self.outputs.items()},
        }
        if self.per_phase_global:
            data["per_phase_global"] = True
        if self.tuning:
            data["tuning"] = self.tuning
        if self.values is not None:
            data["values"] = {k: [list(e), list(a)] for k, (e, a) in self.values.items()}
        if self.fields is not None:
            data["fields"] = {k: [list(s), list(a), list(r)] for k, (s, a, r) in self.fields.items()}
        if self.batches is not None:
            data["batches"] = self.batches
        if self.fixed_sizes:
            data["fixed_sizes"] = list(self.fixed_sizes)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DenseInfo":
        data = json.loads(text)
        inputs = {k: DenseInput(**_tuples(v)) for k, v in data["inputs"].items()}
        outputs = {k: DenseOutput(**_tuples(v)) for k, v in data["outputs"].items()}
        stride = tuple(data["output_stride"]) if data.get("output_stride") else None
        _validate(data, inputs, outputs, stride)
        values = data.get("values")
        if values is not None:
            values = {k: (tuple(e), tuple(a)) for k, (e, a) in values.items()}
        fields = data.get("fields")
        if fields is not None:
            fields = {k: (tuple(s), tuple(a), tuple(r)) for k, (s, a, r) in fields.items()}
            for k, (s, a, r) in fields.items():
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in (*s, *a, *r)) \
                        or min((*s, *r), default=1) < 1 or not len(s) == len(a) == len(r):
                    raise ValueError(f"fields of value '{k}' are not a stride, start and size per axis")
        batches = data.get("batches")
        if batches is not None:
            _check_batches(batches)
        fixed = data.get("fixed_sizes")
        if fixed is not None and (not isinstance(fixed, list) or not all(isinstance(t, str) for t in fixed)):
            raise ValueError("fixed_sizes is not a list of strings")
        return cls(
            stride, data.get("strategy", "dilate"), inputs, outputs, data.get("source"),
            bool(data.get("per_phase_global", False)), data.get("tuning"), values, fields, batches, fixed or None,
        )


def read(model) -> DenseInfo | None:
    """The DenseInfo of an onnx-ir Model or onnx ModelProto, or None if it is not a dense model."""
    if hasattr(model, "metadata_props") and isinstance(model.metadata_props, dict):
        text = model.metadata_props.get(KEY)
    else:
        text = next((p.value for p in model.metadata_props if p.key == KEY), None)
    if not text:
        return None
    try:
        return DenseInfo.from_json(text)
    except Exception as exc:  # JSONDecodeError, a missing or mistyped field: not what rewrite wrote
        from onnx_dense.errors import DenseError

        where = model.meta.get("onnx_dense.path") if hasattr(model, "meta") else None
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise DenseError(
            f"{where or 'the model'}: its onnx_dense metadata is corrupt ({type(exc).__name__}: {detail}); "
            "write the dense model again with onnx-dense rewrite"
        ) from None


def _validate(data, inputs: dict[str, DenseInput], outputs: dict[str, DenseOutput], stride) -> None:
    """What verify and the runtime index and divide by must make sense; ValueError naming the field otherwise."""

    def ints(values, what: str, low: int | None = None) -> None:
        if not isinstance(values, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{what} is not a list of integers")
        if low is not None and any(v < low for v in values):
            raise ValueError(f"{what} has a value below {low}")

    if data.get("strategy", "dilate") not in ("dilate", "fragments"):
        raise ValueError(f"strategy {data.get('strategy')!r}")
    if stride is not None:
        ints(stride, "output_stride", 1)
    for name, entry in inputs.items():
        ints(entry.spatial_axes, f"input '{name}' spatial_axes", 0)
        ints(entry.size, f"input '{name}' size", 1)
        if len(entry.size) != len(entry.spatial_axes) or len(set(entry.spatial_axes)) != len(entry.spatial_axes):
            raise ValueError(f"input '{name}': spatial_axes and size do not match")
    for name, out in outputs.items():
        n = len(out.spatial_axes)
        ints(out.spatial_axes, f"output '{name}' spatial_axes", 0)
        if len(set(out.spatial_axes)) != n:
            raise ValueError(f"output '{name}' repeats a spatial axis")
        for field in ("est", "stride", "original_stride", "rf_size"):
            ints(getattr(out, field), f"output '{name}' {field}", 1)
        for field in ("est", "stride", "original_stride", "rf_size", "rf_start"):
            if len(getattr(out, field)) != n:
                raise ValueError(f"output '{name}' {field} has {len(getattr(out, field))} values for {n} spatial axes")
        for field in ("rf_start", "size", "dense_size"):
            ints(getattr(out, field), f"output '{name}' {field}")
        if out.input not in inputs:
            raise ValueError(f"output '{name}' comes from input '{out.input}', which the metadata does not describe")
        if out.off_grid not in ("exact", "interior", "global"):
            raise ValueError(f"output '{name}' off_grid {out.off_grid!r}")


def _check_batches(batches) -> None:
    """ValueError naming what in ``batches`` the runtime could not index by."""
    def ints(values, what: str) -> None:
        if not isinstance(values, list) or not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"batches: {what} is not a list of positive integers")

    if not isinstance(batches, dict):
        raise ValueError("batches is not an object")
    if "refused" in batches:
        if not isinstance(batches["refused"], str):
            raise ValueError("batches: refused is not a string")
        return
    levels, outputs = batches.get("levels"), batches.get("outputs")
    if not isinstance(levels, list) or not levels:
        raise ValueError("batches: levels is not a list of levels")
    for k, level in enumerate(levels):
        if not isinstance(level, dict):
            raise ValueError(f"batches: level {k + 1} is not an object")
        cuts = level.get("cuts")
        if not isinstance(cuts, list) or not cuts or not all(isinstance(c, str) for c in cuts):
            raise ValueError(f"batches: level {k + 1} cuts is not a list of value names")
        ints(level.get("factor"), f"level {k + 1} factor")
        if len(level["factor"]) != len(levels[0]["factor"]):
            raise ValueError(f"batches: level {k + 1} factor has another number of axes")
        sources = level.get("sources", {})  # absent in models written before the tiled trunk
        if not isinstance(sources, dict):
            raise ValueError(f"batches: level {k + 1} sources is not an object")
        n = len(level["factor"])
        for name, spec in sources.items():
            if not isinstance(spec, dict):
                raise ValueError(f"batches: level {k + 1} source '{name}' is not an object")
            for field in ("axes", "stride", "rf_size"):  # axes: the batch is axis 0
                ints(spec.get(field), f"level {k + 1} source '{name}' {field}")
            start = spec.get("rf_start")
            if not isinstance(start, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in start):
                raise ValueError(f"batches: level {k + 1} source '{name}' rf_start is not a list of integers")
            if any(len(spec[f]) != n for f in ("axes", "stride", "rf_size", "rf_start")):
                raise ValueError(f"batches: level {k + 1} source '{name}' does not give every spatial axis")
            made = spec.get("cuts")
            if not isinstance(made, list) or not made or not all(isinstance(c, str) and c in cuts for c in made):
                raise ValueError(f"batches: level {k + 1} source '{name}' cuts are not among the level's cuts")
            if not isinstance(spec.get("every"), bool):
                raise ValueError(f"batches: level {k + 1} source '{name}' every is not a boolean")
    if not isinstance(outputs, dict):
        raise ValueError("batches: outputs is not an object")
    for name, spec in outputs.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("phases"), str):
            raise ValueError(f"batches: output '{name}' names no value of phases")
        own = spec.get("levels")
        if not isinstance(own, list) or not own:
            raise ValueError(f"batches: output '{name}' has no levels")
        for level in own:
            ints(level, f"output '{name}' levels")
        axes = spec.get("axes")
        if not isinstance(axes, list) or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in axes) \
                or len(set(axes)) != len(axes) or any(len(level) != len(axes) for level in own):
            raise ValueError(f"batches: output '{name}' axes do not match its levels")
        if any(have != want["factor"] for have, want in zip(own, levels)):
            raise ValueError(f"batches: output '{name}' does not carry the levels split")
        if not isinstance(spec.get("inserted"), bool):
            raise ValueError(f"batches: output '{name}' inserted is not a boolean")


def check_against(info: DenseInfo, model) -> None:
    """The metadata describes this onnx-ir model's inputs and outputs (names, and axes within their rank)."""
    values = {v.name: v for v in list(model.graph.inputs) + list(model.graph.outputs)}
    for kind, entries in (("input", info.inputs), ("output", info.outputs)):
        for name, entry in entries.items():
            value = values.get(name)
            if value is None:
                raise ValueError(f"it describes {kind} '{name}', which the model does not have")
            rank = len(value.shape) if value.shape is not None else None
            if rank is not None and any(a >= rank for a in entry.spatial_axes):
                raise ValueError(f"{kind} '{name}' has rank {rank} but spatial_axes {list(entry.spatial_axes)}")


def _output_json(out: DenseOutput) -> dict[str, Any]:
    """An output's fields; ``upsampling`` only where there is one (older readers never see it)."""
    data = _plain(dataclasses.asdict(out))
    if data.get("upsampling") is None:
        data.pop("upsampling", None)
    return data


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
