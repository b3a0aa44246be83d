"""One test (or parametrized group) per rewrite rule, on tiny models written as ONNX text.

Every model is built with ``onnx.parser`` (see tests/_graphs.py: graph inputs after the
first are random weights), rewritten with the public API, and checked numerically in
onnxruntime with every graph optimisation off (CPU): the dense output sampled every eST
positions (eST from the dense model's metadata) must equal the original output, and
``onnx_dense.verify`` (with phases) must pass. The structure of the dense graph is
asserted too where the rule is about it, so a rewrite that happens to be exact for the
wrong reason (or removes no stride at all) fails.

Rules are those listed in the module docstrings of onnx_dense/passes/*.py.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

import onnx_dense
from tests._graphs import (
    attrs,
    check_dense,
    const_value,
    feeds_for,
    graph,
    info,
    ints,
    node,
    nodes,
    rewrite,
    run,
)


def window(model: onnx.ModelProto, name: str) -> tuple[list[int], list[int], list[int]]:
    """(strides, dilations, pads) of node ``name``, ONNX defaults filled in."""
    n = node(model, name)
    a = attrs(n)
    rank = len(a["kernel_shape"]) if "kernel_shape" in a else None
    if rank is None:
        weight = next(i for i in model.graph.initializer if i.name == n.input[1])
        rank = len(weight.dims) - 2
    return (
        list(a.get("strides", [1] * rank)),
        list(a.get("dilations", [1] * rank)),
        list(a.get("pads", [0] * (2 * rank))),
    )


def refuse(model: onnx.ModelProto, *fragments: str, **kwargs) -> str:
    """The rewrite must raise a DenseError whose one-line message holds every fragment."""
    with pytest.raises(onnx_dense.DenseError) as caught:
        rewrite(model, **kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# A backbone of total stride 4 used by many tests: 16x16 -> 8x8 -> 4x4.
CHAIN = """
  [c1] h1 = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)
  r1 = Relu (h1)
  [c2] h2 = Conv <strides=[2,2], pads=[1,1,1,1]> (r1, w2)
  r2 = Relu (h2)
"""
CHAIN_SIG = "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2"


@functools.cache
def _chain3() -> bytes:
    model = graph(CHAIN_SIG + ", float[4,4,3,3] w3", CHAIN + "  [c3] y = Conv <pads=[1,1,1,1]> (r2, w3)")
    return model.SerializeToString()


def chain3() -> onnx.ModelProto:
    """CHAIN then a 3x3 conv: c1 (stride 2), c2 (stride 2), c3 (stride 1)."""
    return onnx.load_from_string(_chain3())


# ============================================================================ normalise


def _same_pads(size: int, k: int, s: int, mode: str) -> tuple[int, int]:
    """ONNX auto_pad pads, computed here independently of onnx_dense."""
    if mode == "VALID":
        return 0, 0
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    small, big = total // 2, total - total // 2
    return (small, big) if mode == "SAME_UPPER" else (big, small)


@pytest.mark.parametrize("size", [12, 13])
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
def test_auto_pad_becomes_explicit_pads(op, mode, size):
    """ExplicitAutoPad: SAME_*/VALID -> pads at the static size, then scaled by eST."""
    second = (
        f'[n2] y = Conv <auto_pad="{mode}", strides=[2,2]> (h1, w2)'
        if op == "Conv"
        else f'[n2] y = {op} <auto_pad="{mode}", kernel_shape=[3,3], strides=[2,2]> (h1)'
    )
    m = graph(
        f"float[1,2,{size},{size}] x, float[3,2,3,3] w1" + (", float[3,3,3,3] w2" if op == "Conv" else ""),
        f'[n1] h1 = Conv <auto_pad="{mode}", strides=[2,2]> (x, w1)\n{second}',
    )
    d = rewrite(m, 1)
    # phases=False: verify's phase check runs the auto_pad original on cropped inputs, where
    # SAME pads differ (see test_verify_phases_of_a_same_upper_model)
    check_dense(m, d, est=(4, 4), phases=False)
    assert all("auto_pad" not in attrs(n) for n in d.graph.node)
    b1, e1 = _same_pads(size, 3, 2, mode)
    mid = (size + b1 + e1 - 3) // 2 + 1
    b2, e2 = _same_pads(mid, 3, 2, mode)
    assert window(d, "n1") == ([1, 1], [1, 1], [b1, b1, e1, e1])
    # at eST 2 the scaled pads (<= 2) stay below the kernel (3): n2 keeps its op type
    assert node(d, "n2").op_type == op
    assert window(d, "n2") == ([1, 1], [2, 2], [2 * b2, 2 * b2, 2 * e2, 2 * e2])


CEIL_CASES = [
    ("MaxPool", None),
    ("AveragePool", 0),
    ("AveragePool", 1),
]


@pytest.mark.parametrize("pads", [0, 1])
@pytest.mark.parametrize("op, cip", CEIL_CASES)
def test_ceil_mode_becomes_end_pads(op, cip, pads):
    """ExplicitCeilMode: the partial last window becomes end padding, exactly (both pools)."""
    extra = "" if cip is None else f", count_include_pad={cip}"
    p = [pads] * 4
    body = f"""
  [c1] h1 = Conv <strides=[2,2]> (x, w1)
  s1 = Sub (h1, ten)
  [pool] y = {op} <kernel_shape=[3,3], strides=[2,2], ceil_mode=1, pads={p}{extra}> (s1)
"""
    # 13 -> 6 -> ceil: 3 (pads 0) or 4 (pads 1); floor would give 2 or 3
    m = graph("float[1,2,13,13] x, float[3,2,3,3] w1", "ten = Constant <value = float {10.0}> ()\n" + body)
    ref = run(m, feeds_for(m))["y"]
    assert ref.shape[2:] == ((3, 3) if pads == 0 else (4, 4))
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))
    assert all(attrs(n).get("ceil_mode", 0) == 0 for n in d.graph.node)
    # The pool's window (a pool, or a depthwise Conv) plus any Pad node before it pad by
    # pads*eST at the start and (pads + 1 partial window)*eST at the end, eST 2 here.
    pool = [
        n for n in d.graph.node
        if n.op_type in ("MaxPool", "AveragePool", "Conv") and ints(n, "kernel_shape") == [3, 3]
        and (n.op_type != "Conv" or attrs(n).get("group", 1) == 3)
    ]
    assert len(pool) == 1, [n.name for n in pool]
    assert ints(pool[0], "dilations") == [2, 2] and ints(pool[0], "strides", [1, 1]) == [1, 1]
    begin = np.array(ints(pool[0], "pads", [0] * 4)[:2])
    end = np.array(ints(pool[0], "pads", [0] * 4)[2:])
    for pad in nodes(d, "Pad"):
        amounts = const_value(d, pad.input[1])
        begin, end = begin + amounts[2:4], end + amounts[6:8]
    assert list(begin) == [2 * pads] * 2 and list(end) == [2 * pads + 2] * 2
    if op == "AveragePool" and cip == 1 and pads:
        # counted pads moved into a -0.0 Pad node, the ceil extra is not counted
        pad_nodes = nodes(d, "Pad")
        assert pad_nodes, "count_include_pad=1 with pads needs a Pad node"
        value = const_value(d, pad_nodes[0].input[2])
        assert value == 0 and np.signbit(value), value
    if op == "AveragePool" and cip == 1 and not pads:
        pool = [n for n in d.graph.node if n.op_type == "AveragePool"]
        assert all(attrs(n).get("count_include_pad", 0) == 0 for n in pool)


def test_input_shape_override_on_dynamic_input():
    """SetStaticInputShapes: --input-shape gives a dynamic input its size (errors: PIPELINE_ERRORS)."""
    m = graph(
        "float[N,2,H,W] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[4,4,3,3] w2b",
        CHAIN + "  [c3] y = Conv <pads=[1,1,1,1]> (r2, w2b)",
    )
    d = rewrite(m, 1, input_shapes={"x": (1, 2, 20, 16)})
    meta = info(d)
    assert meta.inputs["x"].size == (20, 16)
    feeds = feeds_for(m, shapes={"x": (1, 2, 20, 16)})
    check_dense(m, d, feeds=feeds, est=(4, 4))


def test_input_shape_keeps_the_originals_dynamic_batch():
    """--input-shape sizes the analysis; an axis the original left dynamic and the rewrite did
    not make spatial (the batch) stays dynamic in the dense model, which then runs any batch."""
    m = graph(
        "float[N,2,H,W] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[4,4,3,3] w2b",
        CHAIN + "  [c3] y = Conv <pads=[1,1,1,1]> (r2, w2b)",
    )
    d = rewrite(m, 1, input_shapes={"x": (1, 2, 20, 16)})
    assert d.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert not d.graph.output[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    x = np.random.default_rng(3).standard_normal((3, 2, 20, 16)).astype(np.float32)
    batch = run(d, {"x": x})["y"]
    for i in range(3):
        np.testing.assert_array_equal(batch[i:i + 1], run(d, {"x": x[i:i + 1]})["y"])


def test_outputs_cut_before_unsupported_head():
    """CutAtOutputs: the named tensors become the outputs, in order; the rest goes."""
    m = graph(
        CHAIN_SIG,
        CHAIN
        + '  sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n'
        + '  [up] y = Resize <mode="nearest"> (r2, , sc)',
    )
    refuse(m, "'up' (Resize)", output_stride=1)
    d = rewrite(m, 1, outputs=["r2", "r1"])
    assert [o.name for o in d.graph.output] == ["r2", "r1"]
    assert not nodes(d, "Resize")
    check_dense(m, d, est={"r2": (4, 4), "r1": (2, 2)})


def _dynamic_chain() -> onnx.ModelProto:
    return graph(
        "float[N,2,H,W] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[4,4,3,3] w2b",
        CHAIN + "  [c3] y = Conv <pads=[1,1,1,1]> (r2, w2b)",
    )


def _lppool_pads_reach_kernel() -> onnx.ModelProto:
    return graph(
        "float[1,2,16,16] x, float[3,2,4,4] w1",
        "[c1] h = Conv <strides=[4,4]> (x, w1)\n[lp] y = LpPool <kernel_shape=[3,3], pads=[1,1,1,1]> (h)",
        opset=18,
    )


# Errors raised inside the normalise/rewrite pass pipelines (not by the analysis).
PIPELINE_ERRORS = {
    "dynamic_input": (_dynamic_chain, {}, ["'x'", "dynamic", "--input-shape x:"]),
    "input_shape_unknown_name": (_dynamic_chain, {"input_shapes": {"y": (1, 2, 16, 16)}}, ["'y'", "not an input"]),
    "input_shape_wrong_rank": (_dynamic_chain, {"input_shapes": {"x": (2, 16, 16)}}, ["rank 3", "rank 4"]),
    "outputs_names_input": (chain3, {"outputs": ["x"]}, ["'x'", "input or weight"]),
    "outputs_unknown": (chain3, {"outputs": ["nope"]}, ["'nope'", "no tensor"]),
    "lppool_pads_reach_kernel": (_lppool_pads_reach_kernel, {}, ["'lp' (LpPool)", "pads reach"]),
}


@pytest.mark.parametrize("case", list(PIPELINE_ERRORS))
def test_pipeline_errors_are_dense_errors(case):
    """A DenseError raised inside an onnx-ir pass comes out as itself, not as onnx-ir's PassError."""
    make, kwargs, fragments = PIPELINE_ERRORS[case]
    refuse(make(), *fragments, output_stride=1, **kwargs)


# ============================================================================ windows


@pytest.mark.parametrize(
    "stride, est, expected",
    [
        # (strides, dilations, pads) of c1, c2, c3
        (4, (1, 1), [([2, 2], [1, 1], [1] * 4), ([2, 2], [1, 1], [1] * 4), ([1, 1], [1, 1], [1] * 4)]),
        (2, (2, 2), [([2, 2], [1, 1], [1] * 4), ([1, 1], [1, 1], [1] * 4), ([1, 1], [2, 2], [2] * 4)]),
        (1, (4, 4), [([1, 1], [1, 1], [1] * 4), ([1, 1], [2, 2], [2] * 4), ([1, 1], [4, 4], [4] * 4)]),
    ],
)
def test_strided_conv_becomes_dilated(stride, est, expected):
    """DensifyWindows: stride -> 1, every later window dilation*eST and pads*eST."""
    d = rewrite(chain3(), stride)
    check_dense(chain3(), d, est=est)
    assert [window(d, n) for n in ("c1", "c2", "c3")] == expected
    out = info(d).outputs["y"]
    assert out.stride == (min(stride, 4),) * 2 and out.original_stride == (4, 4)
    assert out.rf_size == (15, 15) and out.rf_start == (-7, -7)


def test_dense_model_runs_at_any_size():
    """finalise: spatial dims of inputs and outputs become symbolic; the model runs larger."""
    d = rewrite(chain3(), 1)
    for vi in (d.graph.input[0], d.graph.output[0]):
        dims = vi.type.tensor_type.shape.dim
        assert [dims[i].HasField("dim_param") for i in range(4)] == [False, False, True, True], vi
    y = run(d, feeds_for(d, shapes={"x": (1, 2, 23, 19)}))["y"]
    assert y.shape == (1, 4, 23, 19)


def test_from_node_is_the_papers_pool4_rule():
    """--from NODE: the dense grid stops at that node's input (same as the matching stride)."""
    d = rewrite(chain3(), from_node="c2")
    check_dense(chain3(), d, est=(2, 2))
    assert window(d, "c2")[0] == [1, 1] and window(d, "c1")[0] == [2, 2]
    refuse(chain3(), "'c3'", "no stride", from_node="c3")
    refuse(chain3(), "'zz'", from_node="zz")


@pytest.mark.parametrize("stride, kept, est", [(2, [2, 2], (2, 2)), (1, [1, 1], (4, 4))])
def test_stride_split_when_output_stride_partly_fits(stride, kept, est):
    """analyse: s' = gcd(s, R/D): a stride-4 conv at R=2 keeps stride 2 and removes 2."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,4,4] w1, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[4,4]> (x, w1)\n[c2] y = Conv <pads=[1,1,1,1]> (h, w2)",
    )
    d = rewrite(m, stride)
    check_dense(m, d, est=est)
    e = est[0]
    assert window(d, "c1") == (kept, [1, 1], [0] * 4)
    assert window(d, "c2") == ([1, 1], [e, e], [e] * 4)


@pytest.mark.parametrize(
    "stride, est, c1_strides, pool_strides",
    [
        (1, (4, 2), [1, 1], [1, 1]),
        ((2, 1), (2, 2), [2, 1], [1, 1]),
        ((1, 2), (4, 1), [1, 1], [1, 2]),
    ],
)
def test_anisotropic_strides_and_per_axis_output_stride(stride, est, c1_strides, pool_strides):
    """Strides 2x1 then 2x2: eST and the kept strides are per axis."""
    m = graph(
        "float[1,2,16,12] x, float[3,2,3,3] w1, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[2,1], pads=[1,1,1,1]> (x, w1)\n"
        "[mp] p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (h)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (p, w2)",
    )
    d = rewrite(m, stride)
    check_dense(m, d, est=est)
    assert window(d, "c1")[0] == c1_strides
    assert window(d, "mp")[0] == pool_strides
    assert window(d, "c2") == ([1, 1], list(est), [est[0], est[1]] * 2)


def test_conv_1d():
    m = graph(
        "float[1,2,20] x, float[3,2,3] w1, float[4,3,3] w2",
        "[c1] h = Conv <strides=[2], pads=[1,1]> (x, w1)\n"
        "[mp] p = MaxPool <kernel_shape=[3], strides=[2], pads=[1,1]> (h)\n"
        "[c2] y = Conv <pads=[1,1]> (p, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4,))
    assert window(d, "mp") == ([1], [2], [2, 2])
    assert window(d, "c2") == ([1], [4], [4, 4])


def test_conv_3d():
    m = graph(
        "float[1,2,8,8,8] x, float[3,2,3,3,3] w1, float[2,3,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2,2], pads=[1,1,1,1,1,1]> (x, w1)\n"
        "[ap] p = AveragePool <kernel_shape=[2,2,2], strides=[2,2,2]> (h)\n"
        "[c2] y = Conv <pads=[1,1,1,1,1,1]> (p, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4, 4))
    assert window(d, "c1")[0] == [1, 1, 1]
    assert window(d, "ap")[:2] == ([1, 1, 1], [2, 2, 2])
    assert window(d, "c2") == ([1, 1, 1], [4, 4, 4], [4] * 6)


def test_grouped_and_depthwise_conv():
    m = graph(
        "float[1,4,16,16] x, float[4,2,3,3] w1, float[4,1,3,3] w2, float[6,2,3,3] w3",
        "[g1] h = Conv <group=2, strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[dw] p = Conv <group=4, strides=[2,2], pads=[1,1,1,1]> (h, w2)\n"
        "[g2] y = Conv <group=2, pads=[1,1,1,1]> (p, w3)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))
    assert window(d, "dw") == ([1, 1], [2, 2], [2] * 4) and attrs(node(d, "dw"))["group"] == 4
    assert window(d, "g2") == ([1, 1], [4, 4], [4] * 4) and attrs(node(d, "g2"))["group"] == 2


def test_existing_dilations_are_multiplied():
    m = graph(
        "float[1,2,20,20] x, float[3,2,3,3] w1, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[c2] y = Conv <dilations=[2,3], pads=[2,3,2,3]> (h, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert window(d, "c2") == ([1, 1], [4, 6], [4, 6, 4, 6])


def test_conv_transpose_stride_1_is_dilated():
    """ConvTranspose (stride 1) in the dense region: dilations and pads scaled like Conv."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[3,4,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[ct] y = ConvTranspose <pads=[1,1,1,1]> (h, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert window(d, "ct") == ([1, 1], [2, 2], [2] * 4)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
@pytest.mark.parametrize("kernel, pads", [([3, 1, 1], [0, 0, 0]), ([3, 3, 3], [0, 1, 1])])
def test_window_over_channel_and_image_axes(kernel, pads, op, opset):
    """torch's LocalResponseNorm: a 3-D pool over (channel, H, W) of the unsqueezed map.

    The channel axis keeps its window; H and W are dilated by eST. The Pad on the channel
    axis is not scaled.
    """
    m = graph(
        "float[1,2,16,16] x, float[4,2,3,3] w1, float[3,4,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "sq = Mul (h, h)\n"
        "ax = Constant <value = int64[1] {1}> ()\n"
        "u = Unsqueeze (sq, ax)\n"
        "pp = Constant <value = int64[10] {0, 0, 1, 0, 0, 0, 0, 1, 0, 0}> ()\n"
        "[pd] up = Pad (u, pp)\n"
        f"[lrn] a = {op} <kernel_shape={kernel}, pads={pads + pads}> (up)\n"
        "s = Squeeze (a, ax)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (s, w2)",
        opset=opset,
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert list(const_value(d, node(d, "pd").input[1])) == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]
    window_nodes = [n for n in d.graph.node if n.op_type in (op, "Conv") and n.input[0] == "up"]
    assert len(window_nodes) == 1 and ints(window_nodes[0], "kernel_shape") == kernel
    if op == "AveragePool" and opset < 19:
        assert window_nodes[0].op_type == "Conv"
    expect_pads = [p * e for p, e in zip(pads, (1, 2, 2))]
    assert ints(window_nodes[0], "dilations") == [1, 2, 2]
    assert ints(window_nodes[0], "pads") == expect_pads * 2


@pytest.mark.parametrize("first_stride, moved", [(2, False), (4, True)])
def test_maxpool_pads_reaching_kernel_move_to_pad_node(first_stride, moved):
    """MaxPool k3 p1 at eST 4 (pads 4 >= 3): an explicit Pad with the lowest float."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,4,4] w1",
        "ten = Constant <value = float {10.0}> ()\n"
        f"[c1] h = Conv <strides=[{first_stride},{first_stride}]> (x, w1)\n"
        "n = Sub (h, ten)\n"  # all negative: a zero border would win every border max
        "[mp] y = MaxPool <kernel_shape=[3,3], pads=[1,1,1,1]> (n)",
    )
    d = rewrite(m, 1)
    e = first_stride
    check_dense(m, d, est=(e, e))
    strides, dil, pads = window(d, "mp")
    assert strides == [1, 1] and dil == [e, e]
    pad_nodes = nodes(d, "Pad")
    if moved:
        assert pads == [0] * 4
        assert len(pad_nodes) == 1
        assert list(const_value(d, pad_nodes[0].input[1])) == [0, 0, e, e, 0, 0, e, e]
        assert const_value(d, pad_nodes[0].input[2]) == np.finfo(np.float32).min
    else:
        assert pads == [e] * 4 and not pad_nodes


@pytest.mark.parametrize("first_stride", [2, 4])
@pytest.mark.parametrize("pads", [0, 1])
@pytest.mark.parametrize("cip", [0, 1])
@pytest.mark.parametrize("opset", [13, 17, 20])
def test_average_pool(opset, cip, pads, first_stride):
    """AveragePool: dilated at opset >= 19 with legal pads, else a depthwise Conv (+ count map)."""
    p = [pads] * 4
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2",
        f"[c1] h = Conv <strides=[{first_stride},{first_stride}], pads=[1,1,1,1]> (x, w1)\n"
        f"[ap] a = AveragePool <kernel_shape=[3,3], pads={p}, count_include_pad={cip}> (h)\n"
        "ar = Relu (a)\n"  # pools back to back: test_average_pools_back_to_back_below_opset_19
        "[ap2] b = AveragePool <kernel_shape=[2,2], strides=[2,2]> (ar)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (b, w2)",
        opset=opset,
    )
    d = rewrite(m, 1)
    e = first_stride
    check_dense(m, d, est=(2 * e, 2 * e))
    assert window(d, "c2")[1] == [2 * e, 2 * e]
    legal = pads * e < 3
    if opset >= 19 and legal:
        assert node(d, "ap").op_type == "AveragePool"
        assert window(d, "ap") == ([1, 1], [e, e], [pads * e] * 4)
        assert window(d, "ap2")[:2] == ([1, 1], [e, e])
        return
    if opset >= 19:
        assert node(d, "ap2").op_type == "AveragePool"
    else:
        assert not nodes(d, "AveragePool"), "no AveragePool may carry dilations below opset 19"
    depthwise = [n for n in nodes(d, "Conv") if attrs(n).get("group", 1) == 3]
    ap_conv = [n for n in depthwise if ints(n, "kernel_shape") == [3, 3]]
    assert len(ap_conv) == 1
    assert ints(ap_conv[0], "dilations") == [e, e] and ints(ap_conv[0], "pads") == [pads * e] * 4
    weight = const_value(d, ap_conv[0].input[1])
    needs_count = cip == 0 and pads > 0
    assert bool(nodes(d, "Div")) == needs_count
    assert np.allclose(weight, 1.0 if needs_count else 1.0 / 9)


@pytest.mark.parametrize("opset", [18, 20])
def test_lp_pool_dilated_from_opset_18(opset):
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[lp] y = LpPool <kernel_shape=[3,3], pads=[1,1,1,1], p=2> (h)",
        opset=opset,
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert window(d, "lp") == ([1, 1], [2, 2], [2] * 4)


# ============================================================================ Pad and Slice


@pytest.mark.parametrize("with_axes", [False, True])
def test_pad_node_on_spatial_axes_is_scaled(with_axes):
    """DensifyPadsAndSlices: constant Pad amounts on spatial axes times eST."""
    if with_axes:
        pads = "pads = Constant <value = int64[4] {1, 2, 2, 1}> ()\naxes = Constant <value = int64[2] {2, 3}> ()\n"
        call = "[pd] q = Pad <mode=\"constant\"> (h, pads, v, axes)"
    else:
        pads = "pads = Constant <value = int64[8] {0, 0, 1, 2, 0, 0, 2, 1}> ()\n"
        call = "[pd] q = Pad <mode=\"constant\"> (h, pads, v)"
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        + pads
        + "v = Constant <value = float {0.5}> ()\n"
        + call
        + "\n[c2] y = Conv <strides=[2,2]> (q, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))
    got = list(const_value(d, node(d, "pd").input[1]))
    assert got == ([2, 4, 4, 2] if with_axes else [0, 0, 2, 4, 0, 0, 4, 2])
    assert window(d, "c2")[:2] == ([1, 1], [2, 2])


@pytest.mark.parametrize(
    "starts, ends, dense_starts, dense_ends",
    [
        ([1, 2], [5, 8], [2, 4], [10, np.iinfo(np.int64).max]),
        ([-5, 0], [-1, 3], [6, 0], [14, 6]),  # h is 8x8: [-5:-1] is [3:7]
    ],
)
def test_slice_on_spatial_axes_is_scaled(starts, ends, dense_starts, dense_ends):
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        f"st = Constant <value = int64[2] {{{starts[0]}, {starts[1]}}}> ()\n"
        f"en = Constant <value = int64[2] {{{ends[0]}, {ends[1]}}}> ()\n"
        "ax = Constant <value = int64[2] {2, 3}> ()\n"
        "[sl] s = Slice (h, st, en, ax)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (s, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    sl = node(d, "sl")
    assert list(const_value(d, sl.input[1])) == dense_starts
    assert list(const_value(d, sl.input[2])) == dense_ends


# ============================================================================ heads


@pytest.mark.parametrize("stride, est", [(4, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("trans_b, alpha, beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_flatten_gemm_head_becomes_dilated_conv(stride, est, trans_b, alpha, beta):
    """Flatten of a 4x4 map + Gemm -> Conv with a 4x4 kernel dilated by eST (weights kept)."""
    w = "float[5,64]" if trans_b else "float[64,5]"
    m = graph(
        f"{CHAIN_SIG}, {w} fc_w, float[5] fc_b",
        CHAIN
        + "  f = Flatten (r2)\n"
        + f"  [fc] y = Gemm <transB={trans_b}, alpha={alpha}, beta={beta}> (f, fc_w, fc_b)",
    )
    d = rewrite(m, stride)
    out = check_dense(m, d, est=(est, est))["y"]
    assert info(d).outputs["y"].inserted
    assert out.shape[:2] == (1, 5) and out.ndim == 4
    assert not nodes(d, "Flatten") and not nodes(d, "Gemm")
    head = [n for n in nodes(d, "Conv") if ints(n, "kernel_shape") == [4, 4]]
    assert len(head) == 1 and ints(head[0], "dilations") == [est, est]
    assert "fc_w" in {i.name for i in d.graph.initializer}


@pytest.mark.parametrize("stride", [1, 2])
def test_vgg_classifier_head(stride):
    """Flatten + FC + ReLU + FC + Softmax: the first FC a dilated Conv, the second a MatMul."""
    m = graph(
        f"{CHAIN_SIG}, float[8,64] f1, float[8] b1, float[5,8] f2, float[5] b2",
        CHAIN
        + "  f = Flatten (r2)\n  [fc1] z = Gemm <transB=1> (f, f1, b1)\n  zr = Relu (z)\n"
        + "  [fc2] z2 = Gemm <transB=1> (zr, f2, b2)\n  [sm] y = Softmax (z2)",
    )
    d = rewrite(m, stride)
    e = 4 // stride
    out = check_dense(m, d, est=(e, e))["y"]
    assert out.shape[:2] == (1, 5)
    assert not nodes(d, "Gemm") and len(nodes(d, "MatMul")) == 1
    head = [n for n in nodes(d, "Conv") if ints(n, "kernel_shape") == [4, 4]]
    assert len(head) == 1 and ints(head[0], "dilations") == [e, e]
    assert attrs(node(d, "sm"))["axis"] == 3


@pytest.mark.parametrize("shape", [[1, -1], [-1, 64], [0, -1]])
def test_reshape_matmul_head_becomes_dilated_conv(shape):
    m = graph(
        f"{CHAIN_SIG}, float[64,5] fc_w, float[5] fc_b",
        CHAIN
        + f"  sh = Constant <value = int64[2] {{{shape[0]}, {shape[1]}}}> ()\n"
        + "  f = Reshape (r2, sh)\n"
        + "  [fc] mm = MatMul (f, fc_w)\n"
        + "  y = Add (mm, fc_b)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))
    assert not nodes(d, "MatMul")
    head = [n for n in nodes(d, "Conv") if ints(n, "kernel_shape") == [4, 4]]
    assert len(head) == 1 and ints(head[0], "dilations") == [4, 4]


def _reduce(op: str, opset: int, keepdims: int, axes=(2, 3)) -> str:
    if opset >= 18:
        return (
            f"  rax = Constant <value = int64[{len(axes)}] {{{', '.join(map(str, axes))}}}> ()\n"
            f"  [gp] g = {op} <keepdims={keepdims}> (r2, rax)\n"
        )
    return f"  [gp] g = {op} <axes=[{', '.join(map(str, axes))}], keepdims={keepdims}> (r2)\n"


FLATTEN_FC = "  f = Flatten (g)\n  [fc] y = Gemm <transB=1> (f, fc_w, fc_b)"
FC = "  [fc] y = Gemm <transB=1> (g, fc_w, fc_b)"
# name: (pool kind, body reading r2 at opset o)
GLOBAL_HEADS = {
    "gap_flatten_gemm": ("avg", lambda o: "  [gp] g = GlobalAveragePool (r2)\n" + FLATTEN_FC),
    "gmp_flatten_gemm": ("max", lambda o: "  [gp] g = GlobalMaxPool (r2)\n" + FLATTEN_FC),
    "gap_output": ("avg", lambda o: "  [gp] y = GlobalAveragePool (r2)"),
    "reducemean_keepdims1": ("avg", lambda o: _reduce("ReduceMean", o, 1) + FLATTEN_FC),
    "reducemean_keepdims0": ("avg", lambda o: _reduce("ReduceMean", o, 0) + FC),
    "reducemax_keepdims0": ("max", lambda o: _reduce("ReduceMax", o, 0) + FC),
    "nhwc_reducemean": (
        "avg",
        lambda o: "  [tr] t = Transpose <perm=[0,2,3,1]> (r2)\n"
        + _reduce("ReduceMean", o, 0, (1, 2)).replace("(r2", "(t")
        + FC,
    ),
}


@pytest.mark.parametrize("opset", [13, 20])
@pytest.mark.parametrize("head", list(GLOBAL_HEADS))
def test_global_pool_head_becomes_dilated_window(head, opset):
    """Global pooling in a head -> window of the original 4x4 map, dilated by eST."""
    kind, body = GLOBAL_HEADS[head]
    m = graph(f"{CHAIN_SIG}, float[5,4] fc_w, float[5] fc_b", CHAIN + body(opset), opset=opset)
    d = rewrite(m, 1)
    out = check_dense(m, d, est=(4, 4))["y"]
    assert out.ndim == 4
    left = {n.op_type for n in d.graph.node} & {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}
    assert not left, left
    if kind == "max":
        windows = nodes(d, "MaxPool")
    elif opset >= 19:
        windows = nodes(d, "AveragePool")
    else:
        assert not nodes(d, "AveragePool")
        windows = [n for n in nodes(d, "Conv") if attrs(n).get("group", 1) == 4]
    assert len(windows) == 1
    assert ints(windows[0], "kernel_shape") == [4, 4] and ints(windows[0], "dilations") == [4, 4]


def test_global_pool_head_at_est_1_is_exact_too():
    m = graph(f"{CHAIN_SIG}, float[5,4] fc_w, float[5] fc_b", CHAIN + GLOBAL_HEADS["gap_flatten_gemm"][1](20))
    d = rewrite(m, 4)
    check_dense(m, d, est=(1, 1))


@pytest.mark.parametrize(
    "fold, softmax",
    [
        ("  f = Flatten (p)\n", "Softmax <axis=1>"),
        ("  f = Flatten (p)\n", "LogSoftmax"),
        ("  sq = Constant <value = int64[2] {2, 3}> ()\n  f = Squeeze (p, sq)\n", "Softmax"),
    ],
)
def test_one_by_one_map_flattened_uses_inserted_layout(fold, softmax):
    """A map that is 1x1 in the original: positions go after the batch axis, Gemm -> MatMul."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[6,3,8,8] w2, float[5,6] fc_w, float[5] fc_b",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[c2] p = Conv (h, w2)\n"  # 8x8 kernel on an 8x8 map: 1x1
        + fold
        + "  [fc] z = Gemm <transB=1> (f, fc_w, fc_b)\n"
        + f"  [sm] y = {softmax} (z)",
    )
    d = rewrite(m, 1)
    out = check_dense(m, d, est=(2, 2))["y"]
    meta = info(d).outputs["y"]
    assert meta.inserted and meta.spatial_axes == (2, 3)
    assert out.shape[:2] == (1, 5) and out.shape[2] > 1
    assert not nodes(d, "Gemm") and nodes(d, "MatMul")
    assert attrs(node(d, "sm"))["axis"] == 3
    assert window(d, "c2")[1] == [2, 2]


def test_channel_softmax_passes_through():
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[sm] s = Softmax <axis=1> (h)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (s, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert attrs(node(d, "sm"))["axis"] == 1


# ============================================================================ pass-throughs


POINTWISE = {
    "BatchNormalization": "[op] q = BatchNormalization (h, bn_s, bn_b, bn_mean, bn_var)",
    "LRN": "[op] q = LRN <size=3, alpha=0.1, beta=0.75, bias=1.0> (h)",
    "Relu": "[op] q = Relu (h)",
    "Clip": "lo = Constant <value = float {-0.5}> ()\n"
    "hi = Constant <value = float {0.7}> ()\n"
    "[op] q = Clip (h, lo, hi)",
    "HardSwish": "[op] q = HardSwish (h)",
    "PRelu": "[op] q = PRelu (h, slope)",
}


@pytest.mark.parametrize("op", list(POINTWISE))
def test_pointwise_ops_pass_through(op):
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[3] bn_s, float[3] bn_b, "
        "float[3] bn_mean, float[3] bn_var, float[3,1,1] slope",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        + POINTWISE[op]
        + "\n[c2] y = Conv <pads=[1,1,1,1]> (q, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert node(d, "op").op_type == op
    assert window(d, "c2") == ([1, 1], [2, 2], [2] * 4)


def test_concat_and_split_on_channels():
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[2,3,3,3] wa, float[2,3,1,1] wb, float[3,2,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[ca] a = Conv <pads=[1,1,1,1]> (h, wa)\n"
        "[cb] b = Conv (h, wb)\n"
        "[cat] c = Concat <axis=1> (a, b)\n"
        "[sp] s1, s2 = Split <axis=1, num_outputs=2> (c)\n"
        "[add] s = Add (s1, s2)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (s, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert window(d, "ca") == ([1, 1], [2, 2], [2] * 4)
    assert window(d, "c2") == ([1, 1], [2, 2], [2] * 4)


def test_add_of_two_strided_branches():
    """A ResNet downsampling block: both branches lose their stride and agree on eST."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w0, float[4,3,3,3] wa1, float[4,4,3,3] wa2, float[4,3,1,1] wb, "
        "float[4,4,3,3] w2",
        "[c0] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w0)\n"
        "[ca1] a1 = Conv <strides=[2,2], pads=[1,1,1,1]> (h, wa1)\n"
        "ra = Relu (a1)\n"
        "[ca2] a = Conv <pads=[1,1,1,1]> (ra, wa2)\n"
        "[cb] b = Conv <strides=[2,2]> (h, wb)\n"
        "[add] s = Add (a, b)\n"
        "r = Relu (s)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (r, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))
    assert window(d, "cb") == ([1, 1], [2, 2], [0] * 4)
    assert window(d, "ca2") == ([1, 1], [4, 4], [4] * 4)


def test_channel_shuffle_reshapes_follow_the_dense_size():
    """DensifyReshapes: baked spatial sizes in Reshape targets come from Shape(x) at run time."""
    m = graph(
        "float[1,2,16,16] x, float[4,2,3,3] w1, float[4,4,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "s5 = Constant <value = int64[5] {1, 2, 2, 8, 8}> ()\n"
        "s4 = Constant <value = int64[4] {1, 4, 8, 8}> ()\n"
        "[rs1] a = Reshape (h, s5)\n"
        "t = Transpose <perm=[0,2,1,3,4]> (a)\n"
        "[rs2] b = Reshape (t, s4)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (b, w2)",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))
    assert nodes(d, "Shape")


def test_upsampling_left_alone_at_est_1():
    """Upsampling is allowed where eST = 1 (R=4 removes no stride) and refused at eST 2."""
    m = graph(
        CHAIN_SIG + ", float[4,4,3,3] w3",
        CHAIN
        + '  sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n  [up] u = Resize <mode="nearest"> (r2, , sc)\n'
        + "  [c3] y = Conv <pads=[1,1,1,1]> (u, w3)",
    )
    d = rewrite(m, 4)
    check_dense(m, d, est=(1, 1))
    refuse(m, "'up' (Resize)", "eST 2", output_stride=2)


# ============================================================================ refusals


def _at_est2(body: str, sig: str = "", opset: int = 20, domains: str = "", outputs: str = "float y"):
    """``body`` reads h, the output of a stride-2 conv: at output stride 1 it runs at eST 2."""
    return graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1" + sig,
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n" + body,
        opset=opset,
        domains=domains,
        outputs=outputs,
    )


REFUSALS = {
    # A Resize with a learned layer after it (a final one alone is rebuilt: tests/test_segmentation.py).
    "resize": (
        lambda: _at_est2(
            'sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n[up] u = Resize (h, , sc)\n[c2] y = Conv (u, w2)',
            ", float[3,3,1,1] w2",
        ),
        ["'up' (Resize)", "eST 2"],
    ),
    "squeeze_excitation": (
        lambda: _at_est2(
            "[gap] g = GlobalAveragePool (h)\ns = Sigmoid (g)\n[se_mul] m = Mul (h, s)\n[c2] y = Conv (m, w2)",
            ", float[3,3,1,1] w2",
        ),
        ["'se_mul' (Mul)", "'gap'", "global context"],
    ),
    "instance_norm": (
        lambda: _at_est2("[inorm] y = InstanceNormalization (h, sc, bi)", ", float[3] sc, float[3] bi"),
        ["'inorm' (InstanceNormalization)", "eST 2"],
    ),
    "custom_op": (
        lambda: _at_est2("[cust] y = com.example.Warp (h)", domains=', "com.example" : 1', outputs="float[1,3,8,8] y"),
        ["'cust' (Warp)", "com.example.Warp"],
    ),
    "reflect_pad": (
        lambda: _at_est2(
            'pp = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()\n[rpad] y = Pad <mode="reflect"> (h, pp)'
        ),
        ["'rpad' (Pad)", "reflect"],
    ),
    "spatial_softmax": (
        lambda: _at_est2("[ssm] y = Softmax <axis=-1> (h)"),
        ["'ssm' (Softmax)", "spatial axis"],
    ),
    "lppool_opset17": (
        lambda: _at_est2("[lp] y = LpPool <kernel_shape=[3,3], pads=[1,1,1,1]> (h)", opset=17),
        ["'lp' (LpPool)", "opset"],
    ),
    "strided_conv_transpose": (
        lambda: _at_est2("[up] y = ConvTranspose <strides=[2,2]> (h, w2)", ", float[3,3,2,2] w2"),
        ["'up' (ConvTranspose)", "eST 2"],
    ),
    "space_to_depth": (
        lambda: _at_est2("[s2d] y = SpaceToDepth <blocksize=2> (h)"),
        ["'s2d' (SpaceToDepth)"],
    ),
    "maxpool_indices": (
        lambda: _at_est2(
            "[mpi] y, idx = MaxPool <kernel_shape=[2,2]> (h)\nz = Cast <to=1> (idx)", outputs="float y, float z"
        ),
        ["'mpi' (MaxPool)", "indices"],
    ),
    "positional_map": (
        lambda: _at_est2("[pos] y = Add (h, pe)", ", float[1,3,8,8] pe"),
        ["'pos' (Add)", "'pe'", "varies over spatial axis"],
    ),
    "flattened_map_output": (
        lambda: _at_est2("[fl] y = Flatten (h)"),
        ["'fl' (Flatten)", "flattened"],
    ),
    "flattened_map_to_softmax": (
        lambda: _at_est2("f = Flatten (h)\n[fsm] y = Softmax (f)"),
        ["'fsm' (Softmax)", "Flatten"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_at_est_above_1_naming_the_node(case):
    make, fragments = REFUSALS[case]
    refuse(make(), *fragments, output_stride=1)


def test_se_block_left_alone_at_est_1():
    m = _at_est2(
        "[gap] g = GlobalAveragePool (h)\ns = Sigmoid (g)\n[se_mul] m = Mul (h, s)\n[c2] y = Conv (m, w2)",
        ", float[3,3,1,1] w2",
    )
    d = rewrite(m, 2)
    check_dense(m, d, est=(1, 1))
    assert nodes(d, "GlobalAveragePool")


def test_unreachable_output_stride_lists_reachable_ones():
    refuse(chain3(), "not reachable", "reachable output strides: 1, 2, 4", output_stride=3)
    refuse(chain3(), "reachable for this model: 1, 2, 4")  # no output stride at all
    refuse(chain3(), "positive", output_stride=0)


@pytest.mark.parametrize("opset", [9, 24])
def test_opset_out_of_range(opset):
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n[mp] y = MaxPool <kernel_shape=[2,2]> (h)",
        opset=opset,
    )
    refuse(m, f"opset {opset}", "11 to 23", output_stride=1)


# ============================================================================ verify


def test_verify_fails_on_a_changed_dilation():
    """A dense model with one dilation changed (shape kept) must make verify falsy."""
    d = rewrite(chain3(), 1)
    assert onnx_dense.verify(chain3(), d)
    c3 = node(d, "c3")
    for a in c3.attribute:
        if a.name == "dilations":
            a.ints[:] = [4, 3]
        if a.name == "pads":
            a.ints[:] = [4, 3, 4, 3]
    report = onnx_dense.verify(chain3(), d)
    assert not report
    failed = [c for c in report.comparisons if not c.passed]
    assert [c.check for c in failed] == ["subgrid"] and failed[0].output == "y"


# ============================================================================ regressions
# Each was a correct model that the rewrite (or verify) mishandled; the test came first.


def test_verify_phases_of_a_same_upper_model():
    m = graph(
        "float[1,2,12,12] x, float[3,2,3,3] w1, float[3,3,3,3] w2",
        '[n1] h1 = Conv <auto_pad="SAME_UPPER", strides=[2,2]> (x, w1)\n'
        '[n2] y = Conv <auto_pad="SAME_UPPER", strides=[2,2]> (h1, w2)',
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4), phases=False)  # exact: the rewrite is right
    report = onnx_dense.verify(m, d, phases=True)
    assert report, report.text()


@pytest.mark.parametrize("opset", [13, 17])
def test_average_pools_back_to_back_below_opset_19(opset):
    m = graph(
        "float[1,2,16,16] x",
        "[a1] a = AveragePool <kernel_shape=[2,2], strides=[2,2]> (x)\n"
        "[a2] y = AveragePool <kernel_shape=[2,2], strides=[2,2]> (a)",
        opset=opset,
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))


def test_global_pool_after_average_pool_below_opset_19():
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[ap] a = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]> (h)\n"
        "[gap] y = GlobalAveragePool (a)",
        opset=17,
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))


HEAD_TAILS = {
    "slice": "st = Constant <value = int64[1] {0}> ()\nen = Constant <value = int64[1] {3}> ()\n"
    "ax = Constant <value = int64[1] {1}> ()\n[sl] y = Slice (z, st, en, ax)",
    "reducemax": "ax = Constant <value = int64[1] {1}> ()\n[rm] y = ReduceMax <keepdims=1> (z, ax)",
}


@pytest.mark.parametrize("tail", list(HEAD_TAILS))
def test_slice_or_reduce_after_head_gemm(tail):
    m = graph(
        f"{CHAIN_SIG}, float[8,64] fc_w, float[8] fc_b",
        CHAIN + "  f = Flatten (r2)\n  [fc] z = Gemm <transB=1> (f, fc_w, fc_b)\n" + HEAD_TAILS[tail],
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))


def test_argmax_label_map_head():
    m = graph(
        f"{CHAIN_SIG}, float[8,64] fc_w, float[8] fc_b",
        CHAIN
        + "  f = Flatten (r2)\n  [fc] z = Gemm <transB=1> (f, fc_w, fc_b)\n"
        + "  [am] y = ArgMax <axis=1, keepdims=0> (z)",
        outputs="int64 y",
    )
    d = rewrite(m, 1)
    check_dense(m, d, est=(4, 4))


def test_maxpool_indices_as_graph_output_refused():
    m = _at_est2("[mpi] y, idx = MaxPool <kernel_shape=[2,2]> (h)", outputs="float y, int64 idx")
    refuse(m, "'mpi' (MaxPool)", "indices", output_stride=1)
