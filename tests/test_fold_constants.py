"""Normalisation of exporter shape arithmetic (passes/fold_constants.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnx_dense
from onnx_dense import api
from onnx_dense.errors import DenseError

HEADER = '<ir_version: 9, opset_import: ["" : 20]>'


def _model(body: str, weights: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + body)
    rng = np.random.default_rng(0)
    for name, shape in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


# Pads computed at run time from constants, as the TorchScript exporter writes them.
COMPUTED_PADS = """
net (float[1,2,16,16] x) => (float[1,4,7,7] y) <float[4,2,3,3] w> {
    c = Conv <strides = [2,2]> (x, w)
    z = Constant <value = int64[4] {0, 0, 0, 0}> ()
    one = Constant <value = int64[4] {0, 0, 1, 1}> ()
    pads2 = Concat <axis = 0> (z, one)
    pads = Cast <to = 7> (pads2)
    zero = Constant <value = float {0.0}> ()
    p = Pad <mode = "constant"> (c, pads, zero)
    y = MaxPool <kernel_shape = [2,2], strides = [1,1]> (p)
}
"""


def test_computed_pads_are_folded_and_scaled():
    original = _model(COMPUTED_PADS, {"w": (4, 2, 3, 3)})
    dense = ir.serde.serialize_model(api.rewrite_model(original, output_stride=1))
    ops = [n.op_type for n in dense.graph.node]
    assert "Concat" not in ops and "Cast" not in ops
    pad = next(n for n in dense.graph.node if n.op_type == "Pad")
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in dense.graph.node if n.op_type == "Constant"}
    assert consts[pad.input[1]].tolist() == [0, 0, 0, 0, 0, 0, 2, 2]  # end pads 1 * eST 2
    assert onnx_dense.verify(original, dense)


def test_weights_are_never_folded():
    text = """
net (float[1,2,8,8] x) => (float[1,4,8,8] y) <float[4,2,3,3] w> {
    shape = Constant <value = int64[4] {4, 2, 3, 3}> ()
    w2 = Reshape (w, shape)
    y = Conv <pads = [1,1,1,1]> (x, w2)
}
"""
    dense = ir.serde.serialize_model(api.rewrite_model(_model(text, {"w": (4, 2, 3, 3)}), output_stride=1))
    assert "Reshape" in [n.op_type for n in dense.graph.node]
    assert "w" in {i.name for i in dense.graph.initializer}


# torch's conditional squeeze: If (Shape(x)[AXIS] == 1) then Squeeze else Identity.
CONDITIONAL = """
net (float[1,2,16,16] x) => (float[1,2,4,4] y) <float[2,2,3,3] w> {
    c = Conv <pads = [1,1,1,1], strides = [2,2]> (x, w)
    u = Unsqueeze (c, ax)
    s = Shape (u)
    i = Constant <value = int64 {AXIS}> ()
    d = Gather <axis = 0> (s, i)
    one = Constant <value = int64 {ONE}> ()
    cond = Equal (d, one)
    q = If (cond) <then_branch = g1 () => (float[1,2,8,8] t) {
            k = Constant <value = int64[1] {1}> ()
            t = Squeeze (u, k)
        }, else_branch = g2 () => (float[1,2,8,8] e) {
            k2 = Constant <value = int64[1] {1}> ()
            e = Squeeze (u, k2)
        }>
    y = MaxPool <kernel_shape = [2,2], strides = [2,2]> (q)
}
"""


def _conditional(axis: int, one: int) -> onnx.ModelProto:
    text = CONDITIONAL.replace("AXIS", str(axis)).replace("ONE", str(one))
    model = onnx.parser.parse_model(HEADER + text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "ax"))
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(np.float32), "w")
    )
    return model


def test_if_on_a_non_spatial_dim_is_inlined():
    original = _conditional(axis=1, one=1)
    dense = ir.serde.serialize_model(api.rewrite_model(original, output_stride=2))
    assert "If" not in [n.op_type for n in dense.graph.node]
    assert onnx_dense.verify(original, dense)
    x = np.random.default_rng(2).standard_normal((1, 2, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(dense, x)[:, :, ::2, ::2], _run(original, x), rtol=1e-6, atol=1e-6)


def test_if_on_a_spatial_dim_is_refused_once_dense():
    original = _conditional(axis=3, one=8)  # decided by the traced height
    dense = api.rewrite_model(original, output_stride=2)  # eST 1 there: the branch is what the original takes
    assert onnx_dense.verify(original, ir.serde.serialize_model(dense))
    with pytest.raises(DenseError, match=r"If\).*size of spatial axis 3"):
        api.rewrite_model(_conditional(axis=3, one=8), output_stride=1, strategy="dilate")


# timm's TF-style dynamic SAME padding as the TorchScript exporter writes it at a fixed size:
# scalar float arithmetic (Ceil, Sub, Mul, Clip, Div, Cast), each scalar Unsqueezed to [1] and
# concatenated into the [4] pads of a Pad. A folded scalar must stay rank 0, or the Unsqueeze
# makes [1, 1] and the Concat [4, 1].
TF_SAME_PADS = """
net (float[1,2,16,16] x) => (float[1,4,8,8] y) <float[4,2,3,3] w> {
    n = Constant <value = float {8.0}> ()
    c = Ceil (n)
    one = Constant <value = float {1.0}> ()
    s = Sub (c, one)
    two = Constant <value = float {2.0}> ()
    m = Mul (s, two)
    k = Constant <value = float {3.0}> ()
    a = Add (m, k)
    size = Constant <value = float {16.0}> ()
    t = Sub (a, size)
    zero = Constant <value = float {0.0}> ()
    total = Clip (t, zero)
    half = Div (total, two)
    lo_i = Cast <to = 7> (half)
    lo = Cast <to = 1> (lo_i)
    hi = Sub (total, lo)
    ax = Constant <value = int64[1] {0}> ()
    u0 = Unsqueeze (lo, ax)
    u1 = Unsqueeze (hi, ax)
    zf = Constant <value = float[2] {0.0, 0.0}> ()
    hw = Concat <axis = 0> (zf, u0, u0, zf, u1, u1)
    pads = Cast <to = 7> (hw)
    p = Pad <mode = "constant"> (x, pads, zero)
    y = Conv <strides = [2,2]> (p, w)
}
"""


def test_folded_scalars_keep_rank_0():
    original = _model(TF_SAME_PADS, {"w": (4, 2, 3, 3)})
    dense = ir.serde.serialize_model(api.rewrite_model(original, output_stride=1, strategy="dilate"))
    pad = next(n for n in dense.graph.node if n.op_type == "Pad")
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in dense.graph.node if n.op_type == "Constant"}
    assert consts[pad.input[1]].shape == (8,)
    assert onnx_dense.verify(original, dense, phases=True)


# torch's x.chunk(2, dim=1) as the TorchScript exporter writes it: Slice bounds computed from
# Shape(x)[1] (a channel count, static), then a gate and a strided conv.
CHUNK = """
net (float[1,3,32,32] x) => (float y) <float[8,3,3,3] w1, float[4,4,3,3] w2> {
    c = Conv <strides = [2,2], pads = [1,1,1,1]> (x, w1)
    shape = Shape (c)
    one = Constant <value = int64[1] {1}> ()
    channels = Gather <axis = 0> (shape, one)
    zero = Constant <value = int64[1] {0}> ()
    add1 = Constant <value = int64[1] {1}> ()
    cp1 = Add (channels, add1)
    two = Constant <value = int64[1] {2}> ()
    half = Div (cp1, two)
    m1 = Constant <value = int64[1] {1}> ()
    end1 = Mul (half, m1)
    a = Slice (c, zero, end1, one)
    m2 = Constant <value = int64[1] {2}> ()
    end2 = Mul (half, m2)
    b = Slice (c, end1, end2, one)
    g = Sigmoid (b)
    ab = Mul (a, g)
    y = Conv <strides = [2,2], pads = [1,1,1,1]> (ab, w2)
}
"""


@pytest.mark.parametrize("strategy", ["dilate", "fragments"])
def test_channel_split_bounds_from_shape_are_folded(strategy):
    original = _model(CHUNK, {"w1": (8, 3, 3, 3), "w2": (4, 4, 3, 3)})
    dense = ir.serde.serialize_model(api.rewrite_model(original, output_stride=1, strategy=strategy))
    # (fragments reads the shape of c's dense output itself, to move its phases to the batch)
    read = [n for n in dense.graph.node if n.op_type == "Shape" and "c" in n.input and not n.name.endswith("_phases_shape")]
    assert not read
    assert onnx_dense.verify(original, dense, phases=True)


# A slice of a spatial axis whose end is computed from the spatial size: folding it at the
# static size would bake a size the dense model does not have; refused where dense, named.
SPATIAL_SLICE = """
net (float[1,3,32,32] x) => (float y) <float[8,3,3,3] w1, float[4,8,3,3] w2> {
    c = Conv <strides = [2,2], pads = [1,1,1,1]> (x, w1)
    shape = Shape (c)
    ax = Constant <value = int64[1] {2}> ()
    h = Gather <axis = 0> (shape, ax)
    one = Constant <value = int64[1] {1}> ()
    hm1 = Sub (h, one)
    zero = Constant <value = int64[1] {0}> ()
    s = Slice (c, zero, hm1, ax)
    y = Conv <strides = [2,2], pads = [1,1,1,1]> (s, w2)
}
"""


def test_spatial_slice_bounds_from_a_dense_shape_are_refused_by_name():
    original = _model(SPATIAL_SLICE, {"w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)})
    with pytest.raises(DenseError, match="Slice"):
        api.rewrite_model(original, output_stride=1, strategy="dilate")
