"""Shift-and-stitch: the original run once per phase on shifted crops, interleaved (see bench/__init__.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.runtime.session import OrtRunner
from onnx_dense.bench.results import Check

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


