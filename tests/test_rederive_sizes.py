"""--rederive-sizes: a Resize size baked in at export, taken from the tensor it must match.

An image-pooling branch (global average, 1x1 conv, Resize back to the feature map) exported
at a fixed size: dynamo writes the sizes as an initializer, the TorchScript exporter as
Concat(Shape(p)[0:2], [h, w]). Such an original runs only at its export size. With the option
the sizes come from Shape of the Concat partner, and the dense model runs at any size; the
oracle at another size is the same graph written for that size.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnx_dense
from tests._graphs import graph, rewrite, run

SIG = "float[1,3,{n},{n}] x, float[8,3,3,3] w1, float[4,8,1,1] w2, float[3,12,1,1] w3"
BODY = """
    c = Conv <strides = [2,2], pads = [1,1,1,1]> (x, w1)
    f = Relu (c)
    g = GlobalAveragePool (f)
    p = Conv (g, w2)
    {sizes}
    [up] u = Resize <mode = "nearest"> (p, , , sizes)
    j = Concat <axis = 1> (f, u)
    y = Conv (j, w3)
"""
SIZES = {
    "dynamo": "sizes = Constant <value = int64[4] {{1, 4, {h}, {h}}}> ()",
    "torchscript": """s = Shape (p)
    lo = Constant <value = int64[1] {{0}}> ()
    hi = Constant <value = int64[1] {{2}}> ()
    nc = Slice (s, lo, hi)
    hw = Constant <value = int64[2] {{{h}, {h}}}> ()
    sizes = Concat <axis = 0> (nc, hw)""",
}


def model(kind: str, n: int, h: int | None = None):
    return graph(SIG.format(n=n), BODY.format(sizes=SIZES[kind].format(h=h or n // 2)), seed=4)


def _dense(kind, **kw):
    return ir.serde.deserialize_model(rewrite(model(kind, 32), 1, strategy="fragments", **kw))


def _runs_at_another_size(at, source: str, x: np.ndarray) -> None:
    """``at(n)``: the network exported at n x n. Rewritten at 32 with the option, its Resize
    'up' takes its size from ``source``; the dense model verifies, and at ``x``'s size (40)
    its subgrid is the network exported at that size."""
    dense_ir = onnx_dense.rewrite_model(at(32), output_stride=1, strategy="fragments", rederive_sizes=True)
    notes = dense_ir.meta.get("onnx_dense.size_notes", [])
    assert any("'up'" in n and f"re-derived from the size of '{source}'" in n for n in notes), notes
    dense = ir.serde.serialize_model(dense_ir)
    assert onnx_dense.verify(at(32), dense)
    np.testing.assert_allclose(run(dense, {"x": x})["y"][:, :, ::2, ::2], run(at(40), {"x": x})["y"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dynamo", "torchscript"])
def test_rederived_size_runs_at_any_size(kind):
    x = np.random.default_rng(5).standard_normal((1, 3, 40, 40)).astype(np.float32)
    _runs_at_another_size(lambda n: model(kind, n), "f", x)


@pytest.mark.parametrize("kind", ["dynamo", "torchscript"])
def test_without_the_option_the_summary_says_the_size_is_baked(kind):
    dense = onnx_dense.rewrite_model(model(kind, 32), output_stride=1, strategy="fragments")
    notes = dense.meta.get("onnx_dense.size_notes", [])
    assert any("'up'" in n and "16x16" in n and "--rederive-sizes" in n for n in notes), notes


def test_a_size_no_tensor_has_is_reported_not_guessed():
    # 24x24: no tensor of the graph has it
    original = graph(
        SIG.format(n=32),
        BODY.format(sizes=SIZES["dynamo"].format(h=24)).replace("j = Concat <axis = 1> (f, u)\n    y = Conv (j, w3)",
                                                                "y = Relu (u)"),
        seed=4,
    )
    dense = onnx_dense.rewrite_model(original, output_stride=1, strategy="fragments", rederive_sizes=True)
    notes = dense.meta.get("onnx_dense.size_notes", [])
    assert any("'up'" in n and "24x24" in n and "no tensor" in n for n in notes), notes


def test_cli_prints_the_note(tmp_path, capsys):
    import onnx

    from onnx_dense.cli import main

    src = tmp_path / "seg.onnx"
    onnx.save(model("torchscript", 32), src)
    assert main(["rewrite", str(src), str(tmp_path / "d.onnx"), "-r", "1", "--rederive-sizes"]) == 0
    out = capsys.readouterr().out
    assert "re-derived" in out and "'up'" in out


# LR-ASPP's head (torchvision): the gated high-level map resized to the stride-8 skip's size,
# then a 1x1 classifier, then added to the skip's own 1x1 classifier, computed after the Resize.
# Several tensors have the skip's size (16x16), so only the join past the classifier names it.
LRASPP_SIG = ("float[1,3,{n},{n}] x, float[8,3,3,3] w1, float[8,8,3,3] w2, float[8,8,3,3] w3, float[3,8,1,1] wh, "
              "float[3,8,1,1] wl")
LRASPP_BODY = """
    a = Conv <strides = [2,2], pads = [1,1,1,1]> (x, w1)
    b = Conv <pads = [1,1,1,1]> (a, w2)
    low = Relu (b)
    c = Conv <strides = [2,2], pads = [1,1,1,1]> (low, w3)
    high = Relu (c)
    g = GlobalAveragePool (high)
    s = Sigmoid (g)
    m = Mul (high, s)
    sizes = Constant <value = int64[4] {{1, 8, {h}, {h}}}> ()
    [up] u = Resize <mode = "linear"> (m, , , sizes)
    hc = Conv (u, wh)
    lc = Conv (low, wl)
    y = Add (lc, hc)
"""


def test_the_join_is_found_past_per_position_ops():
    def lraspp(n):
        return graph(LRASPP_SIG.format(n=n), LRASPP_BODY.format(h=n // 2), seed=6)

    _runs_at_another_size(lraspp, "lc", np.random.default_rng(7).standard_normal((1, 3, 40, 40)).astype(np.float32))


def test_a_partner_computed_from_the_resized_map_is_not_a_source():
    """Concat(u, Relu(u)): Relu(u) has the size but depends on the Resize (a cycle): not used."""
    body = BODY.replace("j = Concat <axis = 1> (f, u)", "r = Relu (u)\n    j = Concat <axis = 1> (r, u)").replace(
        "float[3,12,1,1] w3", "float[3,8,1,1] w3")
    original = graph(SIG.format(n=32).replace("float[3,12,1,1] w3", "float[3,8,1,1] w3"),
                     body.format(sizes=SIZES["dynamo"].format(h=16)), seed=4)
    dense = onnx_dense.rewrite_model(original, output_stride=1, strategy="fragments", rederive_sizes=True)
    notes = dense.meta.get("onnx_dense.size_notes", [])
    assert not any("from the size of 'r'" in n for n in notes), notes


# tf2onnx's layout: convolutions in NCHW between Transposes, the join (Concat on the channels)
# in the model's NHWC; the size is found on the far side of the Transpose, on its axes there.
TF_SIG = "float[1,{n},{n},3] x, float[8,3,3,3] w1, float[4,8,1,1] w2, float[3,12,1,1] w3"
TF_BODY = """
    t = Transpose <perm = [0,3,1,2]> (x)
    c = Conv <strides = [2,2], pads = [1,1,1,1]> (t, w1)
    f = Relu (c)
    fl = Transpose <perm = [0,2,3,1]> (f)
    g = GlobalAveragePool (f)
    p = Conv (g, w2)
    s = Shape (p)
    lo = Constant <value = int64[1] {{0}}> ()
    hi = Constant <value = int64[1] {{2}}> ()
    nc = Slice (s, lo, hi)
    hw = Constant <value = int64[2] {{{h}, {h}}}> ()
    sizes = Concat <axis = 0> (nc, hw)
    [up] u = Resize <mode = "nearest"> (p, , , sizes)
    ul = Transpose <perm = [0,2,3,1]> (u)
    j = Concat <axis = 3> (fl, ul)
    jt = Transpose <perm = [0,3,1,2]> (j)
    y = Conv (jt, w3)
"""


def test_the_join_is_found_past_a_transpose():
    def tf_model(n):
        return graph(TF_SIG.format(n=n), TF_BODY.format(h=n // 2), seed=8)

    _runs_at_another_size(tf_model, "fl", np.random.default_rng(9).standard_normal((1, 40, 40, 3)).astype(np.float32))


def test_a_run_at_another_size_says_the_size_is_baked(tmp_path):
    """Without the option the dense model fails inside onnxruntime at any other size; the error
    says why and what to do, not only onnxruntime's words about a Concat."""
    from onnx_dense.runtime.dense_session import DenseSession

    path = tmp_path / "dense.onnx"
    path.write_bytes(rewrite(model("dynamo", 32), 1, strategy="fragments").SerializeToString())
    session = DenseSession(path, provider="cpu")
    session.run(np.zeros((1, 3, 32, 32), np.float32))  # the export size runs
    with pytest.raises(onnx_dense.DenseError) as info:
        session.run(np.zeros((1, 3, 40, 40), np.float32))
    message = str(info.value)
    assert "runs only at 32x32" in message and "Resize 'up'" in message and "--rederive-sizes" in message, message


def test_an_opset_11_export_has_its_resize_shape_from_the_static_size():
    """ONNX's data propagation follows Slice only from opset 13: in a TorchScript export at
    opset 11, Resize's sizes Concat(Shape(p)[0:2], [h, w]) left its output shape unknown and the
    rewrite refused the model ("not known statically; give the input size", the input's size
    being static). The shape is now computed at the static size, as at opset 13."""
    body = BODY.replace("(p, , , sizes)", "(p, e, e, sizes)")
    sizes = SIZES["torchscript"] + "\n    e = Constant <value = float[0] {{}}> ()"
    def at(n):
        return graph(SIG.format(n=n), body.format(sizes=sizes.format(h=n // 2)), seed=4, opset=11)

    for strategy in ("fragments", "auto"):
        dense = ir.serde.serialize_model(onnx_dense.rewrite_model(at(32), output_stride=1, strategy=strategy))
        assert onnx_dense.verify(at(32), dense)
