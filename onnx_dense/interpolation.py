"""The rebuilt final upsampling of a dense segmentation model, as numbers (no graph).

A segmentation head's final block reads its score map T at output pixel y at T coordinate
x = (y - offset) / s (passes/analysis/final_upsampling.py). The dense model's T has e = s / m
times more positions (m: output pixels per dense position), and its rebuilt block reads the dense
score map at x_d = (y - offset) / m: the same place on the image, predictions m pixels apart
instead of s. Linear (a Resize: clamped at the ends; a bilinear ConvTranspose: zero beyond
them, plus its bias), cubic (Keys' kernel with the Resize's coefficient, neighbours clamped)
or nearest (the original's rounding); align_corners maps the first and
last dense positions that the original's first and last positions are, onto the first and
last output pixels.

``axis_plan`` gives the ONNX form's per-axis numbers (pad, upsample, crop;
passes/final_upsampling.py builds it); ``reference`` recomputes the output in numpy
(``verify`` checks the dense model against it).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """Pad the dense score map by ``pad_begin``/``pad_end`` (edge for a Resize, zeros for a
    ConvTranspose), upsample by ``factor`` (Resize asymmetric or half_pixel, or ConvTranspose of
    ``kernel`` taps), then keep every ``step``-th position from ``start``. ``pad_end`` covers
    the static size's output; the crop's length, the output's at the run's size, is computed in
    the graph (passes/final_upsampling.py)."""

    pad_begin: int
    pad_end: int
    factor: int
    kernel: int
    start: int
    step: int


def half_pixel_fits(m: int, offset: float) -> bool:
    """A Resize half_pixel by ``m`` reads padded position ``(Y + 0.5) / m - 0.5``: it puts output
    pixel y at ``(y - offset) / m`` from an integer start where ``offset - (m - 1) / 2`` is an
    integer (a half-pixel offset and an even m), with no map upsampled by 2m."""
    return offset - (m - 1) / 2 == int(offset - (m - 1) / 2)


def axis_plan(kind: str, m: int, offset: float, length: int, out: int, odd: bool = False, step: int = 1,
              half_pixel: bool = False) -> AxisPlan:
    """Per-axis numbers of the rebuilt block: dense score map of ``length`` positions, output
    of ``out`` pixels; ``step`` 2 where the offset is a half pixel (a Resize upsamples 2m then),
    or ``half_pixel`` (a Resize half_pixel by m, where :func:`half_pixel_fits`)."""
    if kind == "transpose":
        kernel = 2 * m - 1 if odd else 2 * m
        centre = (kernel - 1) / 2
        p0 = max(0, math.ceil((offset - centre) / m))
        start = p0 * m + centre - offset
        if start != int(start):
            raise ValueError("the offset is not on the kernel's grid")
        start = int(start)
        p1 = 0
        while (length + p0 + p1 - 1) * m + kernel - (start + out) < 0:
            p1 += 1
        return AxisPlan(p0, p1, m, kernel, start, 1)
    if half_pixel:
        if not half_pixel_fits(m, offset):
            raise ValueError("the offset is not a half_pixel Resize's")
        p0 = max(0, math.ceil(offset / m))
        p1 = max(1, math.ceil((out - 1 - offset) / m - length + 1))
        start = int(p0 * m - offset + (m - 1) / 2)
        while (length + p0 + p1) * m < start + out:
            p1 += 1
        return AxisPlan(p0, p1, m, 0, start, 1)
    q = step
    if (q * offset) != int(q * offset):
        raise ValueError("the offset is not a multiple of half a pixel")
    p0 = max(0, math.ceil(offset / m))
    p1 = max(1, math.ceil((out - 1 - offset) / m - length + 1))
    start = int(q * (p0 * m - offset))
    while (length + p0 + p1) * q * m < start + q * (out - 1) + 1:
        p1 += 1
    return AxisPlan(p0, p1, q * m, 0, start, q)


def axis_matrix(desc: dict, k: int, length: int, out: int) -> np.ndarray:
    """(out, length): output pixel y as a combination of the dense score map's positions."""
    m = desc["factor"][k]
    offset = desc["offset"][k]
    y = np.arange(out, dtype=np.float64)
    j = np.arange(length, dtype=np.float64)
    if desc["kind"] == "transpose":
        return np.maximum(0.0, 1 - np.abs(y[:, None] - offset - j[None, :] * m) / m)
    if desc["align_corners"]:
        e = desc["score_est"][k]
        used = e * (-(-length // e) - 1) + 1  # the original's first..last: L = ceil(length / e) positions
        x = y * (used - 1) / (out - 1) if out > 1 else np.zeros_like(y)
    else:
        x = (y - offset) / m
    matrix = np.zeros((out, length))
    rows = np.arange(out)
    if desc["mode"] == "nearest":
        rounding = {
            "round_prefer_floor": lambda v: np.ceil(v - 0.5), "round_prefer_ceil": lambda v: np.floor(v + 0.5),
            "floor": np.floor, "ceil": np.ceil,
        }[desc["nearest_mode"]]
        idx = np.clip(rounding(x), 0, length - 1).astype(int)
        matrix[rows, idx] = 1.0
        return matrix
    if desc["mode"] == "cubic":  # four neighbours, their indices clamped to the map
        # (align_corners: to the original's last position, as the rebuilt block crops there)
        last = (used if desc["align_corners"] else length) - 1
        a = desc.get("cubic_a", -0.75)
        i = np.floor(x).astype(int)
        t = x - i
        for d, w in zip((-1, 0, 1, 2), _cubic_weights(t, a)):
            np.add.at(matrix, (rows, np.clip(i + d, 0, last)), w)
        return matrix
    x = np.clip(x, 0, length - 1)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, length - 1)
    w = x - i0
    np.add.at(matrix, (rows, i0), 1 - w)
    np.add.at(matrix, (rows, i1), w)
    return matrix


def _cubic_weights(t: np.ndarray, a: float) -> tuple[np.ndarray, ...]:
    """Keys' cubic convolution weights of the neighbours at -1, 0, 1, 2 for fraction ``t``."""
    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def reference(score: np.ndarray, desc: dict, axes: tuple[int, ...], out_size: tuple[int, ...]) -> np.ndarray:
    """The rebuilt block's output from the dense score map ``score`` (float64), tail included."""
    x = score.astype(np.float64)
    for k, a in enumerate(axes):
        matrix = axis_matrix(desc, k, x.shape[a], out_size[k])
        x = np.moveaxis(np.tensordot(matrix, np.moveaxis(x, a, 0), axes=(1, 0)), 0, a)
    if desc.get("bias"):
        shape = [1] * x.ndim
        shape[1] = -1
        x = x + np.asarray(desc["bias"]).reshape(shape)
    for op in desc["tail"]:
        x = _tail(op["op"], op["attrs"], x)
    return x


def near_ties(score: np.ndarray, desc: dict, axes: tuple[int, ...], out_size: tuple[int, ...], tolerance: float) -> np.ndarray | None:
    """Where the block's ArgMax chooses among scores within ``tolerance`` of the largest (a
    label float32 and float64 may pick differently; a Sigmoid before it saturates to exact
    ties): a boolean array of the output's shape. None without an ArgMax."""
    ops = [op["op"] for op in desc["tail"]]
    if "ArgMax" not in ops:
        return None
    k = ops.index("ArgMax")
    x = reference(score, {**desc, "tail": desc["tail"][:k]}, axes, out_size)
    attrs = desc["tail"][k]["attrs"]
    axis = attrs.get("axis", 0)
    top = np.sort(x, axis=axis)
    gap = np.take(top, [-1], axis=axis) - np.take(top, [-2], axis=axis) if x.shape[axis] > 1 else np.full_like(
        np.take(top, [-1], axis=axis), np.inf)
    tied = gap <= tolerance * max(1.0, float(np.abs(x).max()))
    if not attrs.get("keepdims", 1):
        tied = np.squeeze(tied, axis=axis)
    for op in desc["tail"][k + 1:]:
        if op["op"] in ("Transpose", "Squeeze", "Unsqueeze"):
            tied = _tail(op["op"], op["attrs"], tied)
    return tied


def _tail(op: str, attrs: dict, x: np.ndarray) -> np.ndarray:
    if op in ("Identity", "Cast"):
        if op == "Cast":
            import onnx

            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
        return x
    if op == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op == "Squeeze":
        return np.squeeze(x, axis=tuple(attrs["axes"]))
    if op == "Unsqueeze":
        for a in sorted(attrs["axes"]):
            x = np.expand_dims(x, a)
        return x
    if op == "Sigmoid":
        return 1 / (1 + np.exp(-x))
    if op == "Relu":
        return np.maximum(x, 0)
    if op == "Tanh":
        return np.tanh(x)
    if op == "Exp":
        return np.exp(x)
    if op == "Softplus":
        return np.log1p(np.exp(x))
    if op == "HardSigmoid":
        return np.clip(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1)
    if op == "Clip":
        lo, hi = attrs.get("bounds", [None, None])
        return np.clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    axis = attrs.get("axis", 0 if op == "ArgMax" else -1)
    if op in ("Softmax", "LogSoftmax"):
        z = x - x.max(axis=axis, keepdims=True)
        if op == "LogSoftmax":
            return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
        ez = np.exp(z)
        return ez / ez.sum(axis=axis, keepdims=True)
    if op == "ArgMax":
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            r = x.shape[axis] - 1 - np.argmax(np.flip(x, axis=axis), axis=axis)
        else:
            r = np.argmax(x, axis=axis)
        return np.expand_dims(r, axis) if keep else r
    raise ValueError(f"no reference for {op}")
