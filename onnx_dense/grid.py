"""What the analysis knows about a tensor: where its positions sit on the input image.

A :class:`Grid` is attached to every image-derived value (``value.meta[GRID]``); values
with no spatial meaning (weights, shape arithmetic) carry none. All numbers are per
spatial axis, in spatial order (height before width):

* ``stride``  S: input pixels between neighbouring positions in the *original* model.
* ``est``     e: the equivalent stride, the product of the strides the rewrite removed
  upstream. The dense tensor sampled every e positions is the original tensor.
* ``dense_stride`` S / e: input pixels between neighbouring *dense* positions.
* ``size``    the original model's extent at the static input size; ``dense_size`` the
  dense model's at the same input size.
* ``rf_size`` and ``rf_start``: receptive field of position 0, in input pixels; position i
  of the dense tensor sees ``rf_start + i * dense_stride`` onwards.
* ``info``    the information stride: input pixels between the predictions this tensor
  carries. An upsampled map has a finer grid than its information (a segmentation head's
  output: grid stride 1, predictions every 8 px); None where it equals ``stride``.

Pure data and arithmetic: nothing here touches a graph.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

GRID = "onnx_dense.grid"  # Value.meta key holding a Grid
PLAN = "onnx_dense.plan"  # Node.meta key holding what the rewrite must do to the node


@dataclasses.dataclass(frozen=True)
class Grid:
    """Spatial bookkeeping for one tensor (see module docstring)."""

    axes: tuple[int, ...] | None  # tensor axes that are spatial; None: layout not known yet
    stride: tuple[int, ...]
    est: tuple[int, ...]
    size: tuple[int, ...]
    dense_size: tuple[int, ...]
    rf_size: tuple[int, ...]
    rf_start: tuple[int, ...]
    source: str  # the graph input this grid is measured on
    source_axes: tuple[int, ...] | None = None  # spatial axes of that input
    # Spatial axes were folded into features by Flatten/Reshape and wait for a Gemm/MatMul.
    flattened: bool = False
    # The original tensor has no spatial axes (a classifier head); the dense one has them
    # right after the batch axis.
    inserted: bool = False
    # Produced by a global pool: (node name) of the global ops whose result this carries.
    global_from: tuple[str, ...] = ()
    # Before any spatial op: trivial grid whose layout is inferred later; perm maps this
    # tensor's axes to the source input's axes.
    perm: tuple[int, ...] | None = None
    # For flattened grids: the static shape of the tensor before flattening.
    unflat_shape: tuple[int, ...] | None = None
    # Before any spatial op: per axis of the source input (its order, not this tensor's), the
    # input pixel that position 0 shows: -p after a Pad of p (Keras' ZeroPadding2D before the
    # first Conv). Becomes the receptive field's start once the layout is known.
    origin: tuple[int, ...] | None = None
    # Information stride (module docstring); None: the grid stride. ``upsampled_from``: the
    # node whose upsampling made the grid finer than the information.
    info: tuple[int, ...] | None = None
    upsampled_from: str | None = None
    # GroupNorm as exporters write it: Reshape (N, C, *spatial) -> (N, G, C/G * positions),
    # a per-group normalisation, Reshape back. Between the two: the dims before the fold.
    grouped: tuple[int, ...] | None = None

    @property
    def info_stride(self) -> tuple[int, ...]:
        return self.info if self.info is not None else self.stride

    @property
    def rank(self) -> int:
        return len(self.stride)

    @property
    def dense_stride(self) -> tuple[int, ...]:
        return tuple(s // e for s, e in zip(self.stride, self.est))

    @property
    def is_trivial(self) -> bool:
        """Positions are input pixels one to one: nothing upstream strides or grows the field."""
        return all(s == 1 for s in self.stride) and all(r == 1 for r in self.rf_size)

    @property
    def is_dense(self) -> bool:
        return any(e > 1 for e in self.est)

    def replace(self, **changes) -> "Grid":
        return dataclasses.replace(self, **changes)


def trivial_grid(source: str, rank: int) -> Grid:
    """The grid of a graph input before any spatial op has said which axes are spatial."""
    return Grid(
        axes=None,
        stride=(),
        est=(),
        size=(),
        dense_size=(),
        rf_size=(),
        rf_start=(),
        source=source,
        perm=tuple(range(rank)),
    )


def split_stride(stride: int, dense_stride: int, target: int, est: int) -> int:
    """The part of ``stride`` the dense model keeps, given the target output stride.

    Strides are kept while the dense grid is coarser-able toward ``target``; once the dense
    grid reaches it (or a stride does not fit), the rest is removed and becomes eST.
    """
    if est > 1 or target % dense_stride:
        return 1
    return math.gcd(stride, target // dense_stride)


def merge_rf(grids: Sequence[Grid]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Receptive field of a node reading several grids: the union of theirs."""
    starts = tuple(min(g.rf_start[i] for g in grids) for i in range(grids[0].rank))
    ends = tuple(max(g.rf_start[i] + g.rf_size[i] for g in grids) for i in range(grids[0].rank))
    return tuple(e - s for s, e in zip(starts, ends)), starts


def fmt(values: Sequence[int]) -> str:
    """(8, 8) -> '8', (8, 4) -> '8x4': how numbers per axis appear in messages and tables."""
    values = tuple(values)
    if not values:
        return "-"
    if all(v == values[0] for v in values):
        return str(values[0])
    return "x".join(str(v) for v in values)
