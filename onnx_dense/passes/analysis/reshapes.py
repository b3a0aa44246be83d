"""Reshapes: a Reshape that keeps the spatial block intact gets its target rebuilt at run time
(ReshapePlan, passes/densify_reshapes.py); one that folds every non-batch axis is a Flatten
(passes/analysis/heads.py); anything mixing spatial axes with others is refused.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from onnx_dense.errors import DenseError, UnsupportedNodeError, node_label
from onnx_dense.grid import PLAN, fmt
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules
from onnx_dense.passes.plans import ReshapePlan, VectorPlan


class ReshapeRules(Rules):
    OPS = {"Reshape": "reshape"}

    def reshape(self, node: ir.Node, grids):
        g = grids[0]
        if grids[1] is not None:
            raise UnsupportedNodeError(node, "reshapes to an image-dependent shape", "fix the model")
        if g.axes is None:
            return [g.replace(perm=None)]
        in_dims = _ir.static_dims(node.inputs[0])
        out_dims = _ir.static_dims(node.outputs[0])
        if in_dims is None or out_dims is None or any(d is None for d in in_dims[1:] + out_dims[1:]):
            raise DenseError(
                f"node {node_label(node)}: cannot tell what this Reshape does (shapes unknown after inference); "
                "give the input size with --input-shape"
            )
        same_batch = in_dims[0] == out_dims[0] or (in_dims[0] is None and out_dims[0] is None)
        if g.inserted:
            if len(in_dims) == 2 and len(out_dims) == 2 and same_batch:
                node.meta[PLAN] = VectorPlan("identity", g.rank)
                return [g]
            unfolded = self.unfold(node, g, in_dims, out_dims) if same_batch else None
            if unfolded is not None:
                return [unfolded]
            raise UnsupportedNodeError(node, "reshapes a head vector")
        if g.grouped is not None:  # the Reshape back of a GroupNorm
            if tuple(out_dims[1:]) == tuple(g.grouped[1:]) and same_batch:
                return [g.replace(grouped=None)]
            raise UnsupportedNodeError(node, "reshapes a map folded into groups to another shape than it had")
        grouped = self.group_fold(node, g, in_dims, out_dims, same_batch)
        if grouped is not None:
            return [grouped]
        rank = len(in_dims)
        if len(out_dims) == 2 and same_batch and out_dims[1] == math.prod(in_dims[1:]):
            return [self.fold(node, g, rank)]
        plan = _spatial_preserving_reshape(in_dims, out_dims, g.axes)
        if plan is not None:
            node.meta[PLAN] = plan[0]
            return [g.replace(axes=plan[1])]
        raise UnsupportedNodeError(
            node,
            f"Reshape from {_dims(in_dims)} to {_dims(out_dims)} mixes spatial axes with others, which has no "
            "dense equivalent",
        )

    def group_fold(self, node: ir.Node, g, in_dims, out_dims, same_batch: bool):
        """GroupNorm's Reshape (N, C, *spatial) -> (N, G, C/G * positions), read only by a per-group
        normalisation and a Reshape back: whole-image normalisation of each group, exact per phase
        (strategy fragments: each phase is the original on its grid), refused at eST > 1 under dilate."""
        rank = len(in_dims)
        n = g.rank
        if (
            not same_batch or len(out_dims) != 3 or tuple(g.axes) != tuple(range(rank - n, rank)) or rank - n != 2
            or out_dims[1] is None or in_dims[1] % out_dims[1]
            or out_dims[2] != in_dims[1] // out_dims[1] * math.prod(in_dims[2:])
            or not _group_fold_users_ok(node.outputs[0])
        ):
            return None
        if g.is_dense and not self.fragments:
            raise UnsupportedNodeError(
                node, f"folds the map into {out_dims[1]} groups to normalise each over the whole image (GroupNorm) at "
                f"eST {fmt(g.est)}; a dense tensor mixes phases",
                "rewrite with --strategy fragments (exact per phase), or choose an output stride that keeps it at eST 1",
            )
        return g.replace(grouped=tuple(in_dims))


def _group_fold_users_ok(value: ir.Value) -> bool:
    """The folded tensor is only normalised per group (InstanceNormalization) and reshaped back."""
    for user, _ in value.uses():
        if user.op_type == "Reshape":
            continue
        if user.op_type not in ("InstanceNormalization", "MeanVarianceNormalization"):
            return False
        if not all(_group_fold_users_ok(out) for out in user.outputs):
            return False
    return True


def _spatial_preserving_reshape(in_dims, out_dims, axes) -> tuple[ReshapePlan, tuple[int, ...]] | None:
    """A plan when the Reshape only regroups the axes before and after the spatial block."""
    lo, hi = min(axes), max(axes) + 1
    if tuple(axes) != tuple(range(lo, hi)):
        return None
    nb = hi - lo
    block = tuple(in_dims[lo:hi])
    after = in_dims[hi:]
    if any(d is None for d in after):
        return None
    for start in range(len(out_dims) - nb + 1):
        if tuple(out_dims[start : start + nb]) != block:
            continue
        prefix, suffix = tuple(out_dims[:start]), tuple(out_dims[start + nb :])
        if any(d is None for d in suffix) or math.prod(suffix) != math.prod(after):
            continue
        before = in_dims[:lo]
        if lo > 0 and prefix and prefix[0] == before[0] and None not in prefix[1:] + before[1:]:
            if math.prod(prefix[1:]) == math.prod(before[1:]):
                return ReshapePlan((lo, hi), prefix[1:], suffix, True), tuple(range(start, start + nb))
        if None in prefix or None in before or math.prod(prefix) != math.prod(before):
            continue
        return ReshapePlan((lo, hi), prefix, suffix, False), tuple(range(start, start + nb))
    return None


def _dims(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)
