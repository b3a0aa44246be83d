"""Pass by pass, beside the end-to-end tests: a hand-built graph, the analysis, one pass.

Each test normalises a tiny model, runs the analysis step (``pipeline.analyse``), then one
rewrite pass, and asserts what it reports (``modified``), the structure it leaves, and, for
refusals, the reason and that the graph was not touched.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnx_dense.errors import DenseError
from onnx_dense.grid import PLAN
from onnx_dense.passes import _ir
from onnx_dense.passes.align_joins import AlignJoins
from onnx_dense.passes.analyse import AnalyseGrid
from onnx_dense.passes.densify_heads import DensifyGlobalPools
from onnx_dense.passes.densify_pads import DensifyPadsAndSlices
from onnx_dense.passes.densify_windows import DensifyWindows
from onnx_dense.passes.fragments import SplitIntoPhases
from onnx_dense.passes.plans import (
    ANALYSIS, PHASES, GlobalPlan, JoinPlan, PhasePlan, ScalePlan, SpatialPlan, Strategy, UnreachableStride,
)
from onnx_dense.pipeline import RewriteOptions, analyse, normalise, resolve_output_stride
from tests._graphs import build

CONV_POOL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 16, 16] x, float[4, 2, 3, 3] w, float[4, 4, 3, 3] w2) => (float y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (p, w2)
}
"""


def _prepared(text: str, stride, strategy=Strategy.DILATE, **kwargs) -> tuple[ir.Model, Strategy]:
    model = ir.serde.deserialize_model(build(text))
    options = RewriteOptions(output_stride=stride, strategy=strategy, **kwargs)
    normalise(options)(model)
    chosen = analyse(model, resolve_output_stride(model, options), options)
    return model, chosen


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _node(model: ir.Model, op: str, index: int = 0) -> ir.Node:
    return [n for n in model.graph if n.op_type == op][index]


def test_analysis_leaves_plans_and_changes_nothing():
    model = ir.serde.deserialize_model(build(CONV_POOL))
    normalise(RewriteOptions(output_stride=1))(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    result = AnalyseGrid((1,))(model)
    assert not result.modified
    assert ir.serde.serialize_model(model).SerializeToString() == before
    pool = _node(model, "MaxPool")
    plan = pool.meta[PLAN]
    assert isinstance(plan, SpatialPlan) and plan.kept == (1, 1) and plan.est_in == (1, 1)
    last = _node(model, "Conv", 1).meta[PLAN]
    assert last.est_in == (2, 2) and last.dilations == (2, 2) and last.pads_begin == (2, 2)
    assert model.meta[ANALYSIS].target == (1,)


def test_densify_windows_applies_the_spatial_plans():
    model, chosen = _prepared(CONV_POOL, 1)
    assert chosen == Strategy.DILATE
    result = DensifyWindows()(model)
    assert result.modified
    pool, last = _node(model, "MaxPool"), _node(model, "Conv", 1)
    assert list(pool.attributes.get_ints("strides")) == [1, 1]
    assert list(last.attributes.get_ints("dilations")) == [2, 2]
    assert list(last.attributes.get_ints("pads")) == [2, 2, 2, 2]


def test_densify_windows_at_the_original_stride_changes_nothing():
    model, _ = _prepared(CONV_POOL, 2)
    assert not DensifyWindows()(model).modified


def test_unreachable_stride_is_a_structured_refusal():
    model = ir.serde.deserialize_model(build(CONV_POOL))
    options = RewriteOptions(output_stride=3, strategy="dilate")
    normalise(options)(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(UnreachableStride) as info:
        analyse(model, resolve_output_stride(model, options), options)
    exc = info.value
    assert exc.output == "y" and exc.target == (3, 3) and exc.stride == (2, 2)
    assert exc.reachable == [(1,), (2,)]
    assert str(exc).endswith("reachable output strides: 1, 2")
    assert ir.serde.serialize_model(model).SerializeToString() == before


PAD = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 16, 16] x, float[2, 2, 3, 3] w, float[2, 2, 3, 3] w2) => (float y) {
    c = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)
    pads = Constant <value = int64[8] {0, 0, 1, 2, 0, 0, 1, 2}> ()
    p = Pad <mode = "constant"> (c, pads)
    y = Conv <kernel_shape = [3, 3]> (p, w2)
}
"""


def test_densify_pads_scales_by_est():
    model, _ = _prepared(PAD, 1)
    pad = _node(model, "Pad")
    assert pad.meta[PLAN] == ScalePlan((1, 1, 2, 2))
    assert DensifyPadsAndSlices()(model).modified
    assert _ir.const_array(_node(model, "Pad").inputs[1]).tolist() == [0, 0, 2, 4, 0, 0, 2, 4]


def test_reflect_pad_is_refused_under_dilate_before_any_mutation():
    text = PAD.replace('mode = "constant"', 'mode = "reflect"')
    model = ir.serde.deserialize_model(build(text))
    options = RewriteOptions(output_stride=1, strategy="dilate")
    normalise(options)(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(DenseError, match="'reflect' padding at eST 2 copies dense neighbours"):
        analyse(model, resolve_output_stride(model, options), options)
    assert ir.serde.serialize_model(model).SerializeToString() == before


JOIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 16, 16] x, float[2, 2, 3, 3] w, float[2, 2, 1, 1] w1) => (float y) {
    a = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)
    b = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (x)
    b1 = Conv <kernel_shape = [1, 1]> (b, w1)
    y = Add (a, b1)
}
"""


def test_align_joins_crops_the_longer_operand():
    model, _ = _prepared(JOIN, 1)
    add = _node(model, "Add")
    assert add.meta[PLAN] == JoinPlan((2, 3))
    DensifyWindows()(model)
    assert AlignJoins()(model).modified
    assert sum(op == "Slice" for op in _ops(model)) >= 1


GAP = """
<ir_version: 8, opset_import: ["" : 19]>
g (float[1, 2, 16, 16] x, float[4, 2, 3, 3] w) => (float y) {
    c = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)
    y = GlobalAveragePool (c)
}
"""


def test_densify_global_pools_becomes_a_dilated_window():
    """Opset 19: AveragePool has dilations (below, a depthwise Conv)."""
    model, _ = _prepared(GAP, 1)
    plan = _node(model, "GlobalAveragePool").meta[PLAN]
    assert isinstance(plan, GlobalPlan) and plan.kernel == (8, 8) and plan.est == (2, 2)
    DensifyWindows()(model)
    assert DensifyGlobalPools()(model).modified
    assert "GlobalAveragePool" not in _ops(model)
    pool = _node(model, "AveragePool")
    assert list(pool.attributes.get_ints("kernel_shape")) == [8, 8]
    assert list(pool.attributes.get_ints("dilations")) == [2, 2]


SE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 16, 16] x, float[2, 2, 3, 3] w) => (float y) {
    c = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)
    s = GlobalAveragePool (c)
    g = Sigmoid (s)
    m = Mul (c, g)
    y = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (m, w)
}
"""


def test_global_context_refused_under_dilate_planned_under_fragments():
    with pytest.raises(DenseError, match="global context from .* is broadcast back onto the feature map at eST 2"):
        _prepared(SE, 1)
    model, chosen = _prepared(SE, 1, strategy="fragments")
    assert chosen == Strategy.FRAGMENTS
    plan: PhasePlan = model.meta[PHASES]
    assert [n.op_type for n, _ in plan.splits] == ["Conv", "Conv"]
    assert [lvl.factor for _, lvl in plan.splits] == [(2, 2), (2, 2)]
    assert [v.name for v, _ in plan.outputs] == ["y"]
    assert plan.global_outputs == {"y"}
    n_before = len(model.graph)
    assert SplitIntoPhases()(model).modified
    assert len(model.graph) > n_before and "Concat" in _ops(model)


def test_auto_chooses_fragments_where_dilate_refuses():
    _, chosen = _prepared(SE, 1, strategy="auto")
    assert chosen == Strategy.FRAGMENTS
    _, chosen = _prepared(CONV_POOL, 1, strategy="auto")
    assert chosen == Strategy.DILATE


BATCH_CONCAT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 16, 16] x, float[2, 2, 3, 3] w) => (float y) {
    c = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)
    y = Concat <axis = 0> (c, c)
}
"""


def test_fragments_refusal_happens_in_the_analysis_step():
    """The phase plan's refusals come before any pass touches the graph."""
    model = ir.serde.deserialize_model(build(BATCH_CONCAT))
    options = RewriteOptions(output_stride=1, strategy="fragments")
    normalise(options)(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(DenseError, match="acts on the batch axis, which holds the phases"):
        analyse(model, resolve_output_stride(model, options), options)
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_strategy_is_one_type_with_one_default():
    assert RewriteOptions().strategy == Strategy.AUTO == "auto"
    assert f"{Strategy.FRAGMENTS}" == str(Strategy.FRAGMENTS) == "fragments"
    with pytest.raises(DenseError, match="--strategy 'x': expected one of auto, dilate, fragments"):
        Strategy.parse("x")


@pytest.mark.parametrize("given, canonical", [(8, (8,)), ((8,), (8,)), ([8, 4], (8, 4)), (np.int64(2).item(), (2,))])
def test_output_stride_has_one_canonical_form(given, canonical):
    assert RewriteOptions(output_stride=given).output_stride == canonical


def test_every_op_has_exactly_one_rule():
    from onnx_dense.passes.analyse import RULE_CLASSES

    ops = [op for cls in RULE_CLASSES for op in cls.OPS]
    assert len(ops) == len(set(ops)), sorted(op for op in set(ops) if ops.count(op) > 1)
    for cls in RULE_CLASSES:
        for method in cls.OPS.values():
            assert callable(getattr(cls, method)), (cls.__name__, method)
