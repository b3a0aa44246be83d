"""Output strides no output can end on are refused, with the ones that can (issue 16).

An output stride above every output's own stride (or any stride above 1 on a model with no
spatial op) would leave the model unchanged yet labelled with the stride asked for: refused
like any other unreachable stride. Models whose stride differs per axis list their reachable
strides per axis (``3x2``); a value alone (``6``) means the same on every axis. Every listed
value is accepted by ``-r`` as written.
"""

from __future__ import annotations

import itertools
import os

import onnx
import pytest

from onnx_dense import api
from onnx_dense.passes.plans import UnreachableStride
from tests._cli import assert_clean_error, run
from tests._graphs import build

# Conv (stride 2), MaxPool (2), Conv (2): output stride 8.
STRIDE_8 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 32, 32] x, float[4, 2, 3, 3] w1, float[4, 4, 3, 3] w2) => (float y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (p, w2)
}
"""

# 1x1 stride-1 Convs and pointwise ops: nothing strides, output stride 1.
NO_SPATIAL_OP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 8, 8] x, float[4, 2, 1, 1] w1, float[3, 4, 1, 1] w2) => (float y) {
    c = Conv <kernel_shape = [1, 1]> (x, w1)
    r = Relu (c)
    y = Conv <kernel_shape = [1, 1]> (r, w2)
}
"""

# Pointwise only: no op says which axes are spatial.
POINTWISE_ONLY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 8, 8] x) => (float y) {
    r = Relu (x)
    y = Sigmoid (r)
}
"""

# Strides (3, 2) then (4, 9): 12 along the height, 18 along the width.
STRIDE_12x18 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 48, 72] x, float[4, 2, 3, 2] w1, float[4, 4, 4, 9] w2) => (float y) {
    c = Conv <kernel_shape = [3, 2], strides = [3, 2]> (x, w1)
    r = Relu (c)
    y = Conv <kernel_shape = [4, 9], strides = [4, 9]> (r, w2)
}
"""

# Strides (3, 4) then (6, 9): 18 x 36.
STRIDE_18x36 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 72, 144] x, float[4, 2, 3, 4] w1, float[4, 4, 6, 9] w2) => (float y) {
    c = Conv <kernel_shape = [3, 4], strides = [3, 4]> (x, w1)
    r = Relu (c)
    y = Conv <kernel_shape = [6, 9], strides = [6, 9]> (r, w2)
}
"""


def _per_axis(h: list[int], w: list[int]) -> list[tuple[int, ...]]:
    """Every (h, w) pair, one value where both are equal: the form the refusal lists."""
    return [(a,) if a == b else (a, b) for a, b in itertools.product(h, w)]


# Kept parts of each stride are gcd(s, R / D) (grid.split_stride): along strides 3 then 4
# the dense grid can end at 1, 3, 6 (3, then 2 of the 4) or 12, never at 2 or 4.
REACHABLE_12x18 = _per_axis([1, 3, 6, 12], [1, 2, 6, 18])
REACHABLE_18x36 = _per_axis([1, 3, 6, 9, 18], [1, 2, 4, 12, 36])


@pytest.fixture
def model_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "m.onnx"
        onnx.save(build(text), str(path))
        return str(path)

    return write


def _refused(path: str, stride, strategy: str = "auto") -> UnreachableStride:
    with pytest.raises(UnreachableStride) as info:
        api.rewrite(path, path + ".out.onnx", output_stride=stride, strategy=strategy)
    assert not os.path.exists(path + ".out.onnx")
    return info.value


# ----------------------------------------------------------------------------- API


@pytest.mark.parametrize("stride", [16, 64, (8, 16)])
@pytest.mark.parametrize("strategy", ["dilate", "fragments", "auto"])
def test_stride_above_the_models_is_refused(model_file, stride, strategy):
    exc = _refused(model_file(STRIDE_8), stride, strategy)
    assert exc.output == "y" and exc.stride == (8, 8)
    assert exc.reachable == [(1,), (2,), (4,), (8,)]


def test_no_spatial_op_reaches_only_1(model_file):
    path = model_file(NO_SPATIAL_OP)
    exc = _refused(path, 2)
    assert exc.reachable == [(1,)]
    assert api.output_strides(path) == [(1,)]
    api.rewrite(path, path + ".dense.onnx", output_stride=1)  # stride 1 stays a no-op that works


def test_pointwise_only_reaches_only_1(model_file):
    path = model_file(POINTWISE_ONLY)
    exc = _refused(path, 2)
    assert exc.output == "y" and exc.reachable == [(1,)]
    api.rewrite(path, path + ".dense.onnx", output_stride=1)


@pytest.mark.parametrize(
    "text, reachable", [(STRIDE_12x18, REACHABLE_12x18), (STRIDE_18x36, REACHABLE_18x36)], ids=["12x18", "18x36"]
)
def test_per_axis_strides_are_listed_per_axis(model_file, text, reachable):
    path = model_file(text)
    assert api.output_strides(path, strategy="dilate") == reachable
    assert api.output_strides(path) == reachable  # auto: those of fragments, the same here


def test_stride_reachable_on_one_axis_only_is_refused(model_file):
    # 36 is the width's stride, but the height ends at 18: no output ends on 36x36.
    exc = _refused(model_file(STRIDE_18x36), 36)
    assert exc.stride == (18, 36) and (18, 36) in exc.reachable and (36,) not in exc.reachable
    exc = _refused(model_file(STRIDE_12x18), (4, 6))
    assert exc.target == (4, 6) and exc.reachable == REACHABLE_12x18


@pytest.mark.parametrize("stride, est", [((3, 2), (4, 9)), ((6, 6), (2, 3)), ((12, 18), (1, 1))])
def test_per_axis_stride_rewrites_and_matches(model_file, tmp_path, stride, est):
    path = model_file(STRIDE_12x18)
    dst = tmp_path / "d.onnx"
    model = api.rewrite(path, dst, output_stride=stride, strategy="dilate")
    from onnx_dense import metadata

    out = metadata.read(model).outputs["y"]
    assert out.est == est and out.stride == stride
    report = api.verify(path, str(dst))
    assert report, report.text()


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "text, args, needles",
    [
        (STRIDE_8, ["-r", "16"], ["output stride 16 is not reachable", "reachable output strides: 1, 2, 4, 8"]),
        (STRIDE_8, ["-r", "64"], ["output stride 64 is not reachable", "reachable output strides: 1, 2, 4, 8"]),
        (STRIDE_8, ["-r", "8x16"], ["output stride 8x16 is not reachable", "reachable output strides: 1, 2, 4, 8"]),
        (NO_SPATIAL_OP, ["-r", "2"], ["output stride 2 is not reachable", "reachable output strides: 1"]),
        (POINTWISE_ONLY, ["-r", "2"], ["output stride 2 is not reachable", "reachable output strides: 1"]),
        (STRIDE_12x18, ["-r", "4x6"], ["output stride 4x6 is not reachable",
                                       "reachable output strides: 1, 1x2, 1x6, 1x18, 3x1, 3x2, 3x6, 3x18, 6x1, "
                                       "6x2, 6, 6x18, 12x1, 12x2, 12x6, 12x18"]),
        (STRIDE_12x18, ["-r", "2"], ["output stride 2 is not reachable", ", 3x2,", ", 12x18"]),
        (STRIDE_18x36, ["-r", "36"], ["output stride 36 is not reachable", ", 18x36", ", 9x4,"]),
    ],
)
@pytest.mark.parametrize("command", ["rewrite", "inspect"])
def test_cli_refuses_in_one_line(model_file, tmp_path, text, args, needles, command):
    src = model_file(text)
    before = open(src, "rb").read()
    dst = tmp_path / "out.onnx"
    paths = [src, dst] if command == "rewrite" else [src]
    code, out, err = run(command, *paths, *args)
    assert_clean_error(code, out, err, *needles)
    assert not dst.exists()
    assert open(src, "rb").read() == before
    if command == "rewrite":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp file left either


def test_cli_lists_per_axis_strides_without_r(model_file):
    code, out, err = run("inspect", model_file(STRIDE_12x18))
    assert code == 0, err
    assert "reachable output strides: 1, 1x2, 1x6, 1x18, 3x1, 3x2," in out


def test_cli_accepts_a_listed_per_axis_stride(model_file, tmp_path):
    dst = tmp_path / "d.onnx"
    code, out, err = run("rewrite", model_file(STRIDE_12x18), dst, "-r", "3x2", "--strategy", "dilate")
    assert code == 0, err
    assert "eST 4x9, a prediction every 3x2 input pixels (original: every 12x18)" in out


def test_cli_at_the_models_own_stride_says_nothing_changed(model_file, tmp_path):
    src = model_file(STRIDE_8)
    dst = tmp_path / "d.onnx"
    code, out, err = run("rewrite", src, dst, "-r", "8")
    assert code == 0, err
    assert "eST 1" in out
    assert "nothing to densify" in out
    original, dense = onnx.load(src), onnx.load(str(dst))
    assert [n.op_type for n in original.graph.node] == [n.op_type for n in dense.graph.node]
    assert [list(n.attribute) for n in original.graph.node] == [list(n.attribute) for n in dense.graph.node]
    # A stride below it densifies, and says nothing of the kind.
    code, out, err = run("rewrite", src, tmp_path / "e.onnx", "-r", "4")
    assert code == 0, err
    assert "nothing to densify" not in out and "eST 2" in out


def test_auto_lists_the_strides_fragments_reaches():
    """An upsampling network (output stride 2, stride-4 bottleneck) asked for 4: auto's refusal
    lists what auto can reach (fragments: 1, 2), not dilate's empty list, and says nothing of
    dilate's own refusal of the Resize, which no stride above the model's would get past."""
    from tests._graphs import rewrite
    from tests.test_fragments import UPNET, UPNET_SIG, graph

    m = graph(UPNET_SIG, UPNET)
    with pytest.raises(UnreachableStride) as caught:
        rewrite(m, 4, strategy="auto")
    message = str(caught.value)
    assert "reachable output strides: 1, 2" in message and "dilate refused" not in message, message
    assert rewrite(m, 2, strategy="auto") is not None
