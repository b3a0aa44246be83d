"""Dense segmentation: the final upsampling rebuilt on the dense score map (passes/final_upsampling.py).

Per rule, a tiny graph (ONNX text, ORT with optimisations off): a stride-8 score map T, then
one final upsampling (each Resize coordinate mode, nearest, align_corners, a bilinear
ConvTranspose with pads or with a crop, then per-position ops). Each test proves:

* the formula (onnx_dense/interpolation.py) is the original's op: applied to the original's T
  with the original's factor it gives the original's output;
* the rewrite at R: ``verify`` passes, which checks T on the subgrid and the off-grid phases, and
  the rebuilt output against that formula on the dense T;
* the dense graph has the rebuilt node (a Resize/ConvTranspose by the remaining factor).

End to end (samples/segmentation.py, both torch exporters where cheap): FCN-8s, DeepLabv3,
LR-ASPP, FPN with GroupNorm at two strides each; U-Net and DBNet refused for their learned final
block with one line, exact with ``final_upsampling=False`` (``--no-final-upsampling``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnx_dense
from onnx_dense import metadata
from onnx_dense.interpolation import reference
from onnx_dense.passes.analysis.final_upsampling import bilinear_kernel, final_blocks
from onnx_dense.passes.analyse import AnalyseGrid
from onnx_dense.pipeline import RewriteOptions, normalise
from tests._graphs import build

HEAD = """
<ir_version: 9, opset_import: ["" : {opset}]>
net (float[1,2,32,32] x, float[4,2,3,3] w1, float[4,4,3,3] w2, float[4,4,3,3] w3, float[3,4,1,1] w4{sig}) => ({out}) {{
  c1 = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)
  r1 = Relu (c1)
  c2 = Conv <strides=[2,2], pads=[1,1,1,1]> (r1, w2)
  r2 = Relu (c2)
  c3 = Conv <strides=[2,2], pads=[1,1,1,1]> (r2, w3)
  r3 = Relu (c3)
  score = Conv (r3, w4)
{body}
}}"""

SCALES = "  sc = Constant <value = float[4] {1.0, 1.0, 8.0, 8.0}> ()\n"


def resize(mode: str, coord: str, extra: str = "") -> str:
    return SCALES + f'  [up] y = Resize <mode="{mode}", coordinate_transformation_mode="{coord}"{extra}> (score, , sc)'


def head(body: str, *, out: str = "float y", opset: int = 17, weights: dict | None = None):
    """The stride-8 score map and ``body``; ``weights``: initializers of given values."""
    weights = weights or {}
    sig = "".join(f", float[{','.join(map(str, a.shape))}] {n}" for n, a in weights.items())
    model = build(HEAD.format(opset=opset, sig=sig, out=out, body=body))
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(onnx.numpy_helper.from_array(weights[init.name], init.name))
    return model


def bilinear(channels: int, kernel: int, stride: int, diagonal: bool = True) -> np.ndarray:
    k = np.multiply.outer(bilinear_kernel(kernel, stride), bilinear_kernel(kernel, stride)).astype(np.float32)
    if not diagonal:
        return np.broadcast_to(k, (channels, 1, kernel, kernel)).copy()
    w = np.zeros((channels, channels, kernel, kernel), np.float32)
    w[range(channels), range(channels)] = k
    return w


def thead(**kwargs) -> onnx.ModelProto:
    body, weights = transpose_head(**kwargs)
    return head(body, weights=weights)


def transpose_head(kernel: int = 16, pads: int = 4, crop: int = 0, tail: str = "", group: bool = False, bias=None):
    """score -> ConvTranspose (bilinear, stride 8) [-> crop] [-> tail op] -> y."""
    w = bilinear(3, kernel, 8, diagonal=not group)
    attrs = f"strides=[8,8], pads=[{pads},{pads},{pads},{pads}]" + (", group=3" if group else "")
    args = "score, wt" + (", bt" if bias is not None else "")
    body = f"  [up] u = ConvTranspose <{attrs}> ({args})\n"
    last = "u"
    if crop:
        body += (f"  st = Constant <value = int64[2] {{{crop}, {crop}}}> ()\n  en = Constant <value = int64[2] {{-{crop}, -{crop}}}> ()\n"
                 "  ax = Constant <value = int64[2] {2, 3}> ()\n  v = Slice (u, st, en, ax)\n")
        last = "v"
    body += f"  y = {tail or 'Identity'} ({last})"
    weights = {"wt": w}
    if bias is not None:
        weights["bt"] = np.asarray(bias, np.float32)
    return body, weights


RULES = {
    "half_pixel": lambda: head(resize("linear", "half_pixel")),
    "pytorch_half_pixel": lambda: head(resize("linear", "pytorch_half_pixel")),
    "asymmetric": lambda: head(resize("linear", "asymmetric")),
    "align_corners": lambda: head(
        '  sz = Constant <value = int64[4] {1, 3, 32, 32}> ()\n'
        '  [up] y = Resize <mode="linear", coordinate_transformation_mode="align_corners"> (score, , , sz)'
    ),
    "nearest": lambda: head(resize("nearest", "half_pixel")),
    "cubic": lambda: head(resize("cubic", "half_pixel")),
    "cubic_asymmetric_a05": lambda: head(resize("cubic", "asymmetric", ", cubic_coeff_a=-0.5")),
    "cubic_align_corners": lambda: head(
        '  sz = Constant <value = int64[4] {1, 3, 32, 32}> ()\n'
        '  [up] y = Resize <mode="cubic", coordinate_transformation_mode="align_corners"> (score, , , sz)'
    ),
    "nearest_asymmetric_floor": lambda: head(resize("nearest", "asymmetric", ', nearest_mode="floor"')),
    "nearest_tf_half_pixel": lambda: head(resize("nearest", "tf_half_pixel_for_nn")),
    "nearest_tf_half_pixel_floor": lambda: head(resize("nearest", "tf_half_pixel_for_nn", ', nearest_mode="floor"')),
    "softmax_after": lambda: head(SCALES + '  [up] u = Resize <mode="linear"> (score, , sc)\n  y = Softmax <axis=1> (u)'),
    "argmax_after": lambda: head(
        SCALES + '  [up] u = Resize <mode="linear"> (score, , sc)\n  y = ArgMax <axis=1> (u)', out="int64 y"
    ),
    "argmax_keepdims0": lambda: head(
        SCALES + '  [up] u = Resize <mode="linear"> (score, , sc)\n  y = ArgMax <axis=1, keepdims=0> (u)', out="int64 y"
    ),
    "clip_after": lambda: head(
        SCALES + '  [up] u = Resize <mode="linear"> (score, , sc)\n  lo = Constant <value = float {-0.5}> ()\n'
        '  hi = Constant <value = float {0.5}> ()\n  y = Clip (u, lo, hi)'
    ),
    "argmax_squeeze": lambda: head(
        SCALES + '  [up] u = Resize <mode="linear"> (score, , sc)\n  v = ArgMax <axis=1> (u)\n'
        '  one = Constant <value = int64[1] {1}> ()\n  y = Squeeze (v, one)', out="int64 y"
    ),
    "argmax_unsqueeze": lambda: head(
        SCALES + '  [up] u = Resize <mode="linear"> (score, , sc)\n  v = ArgMax <axis=1, keepdims=0> (u)\n'
        '  one = Constant <value = int64[1] {-3}> ()\n  y = Unsqueeze (v, one)', out="int64 y"
    ),
    "transpose_pads": lambda: thead(),
    "transpose_crop_sigmoid": lambda: thead(pads=0, crop=4, tail="Sigmoid"),
    "transpose_group_bias": lambda: thead(group=True, bias=[0.1, -0.2, 0.3]),
    "transpose_odd_kernel": lambda: thead(kernel=15, pads=3),
}


def ort_run(model: onnx.ModelProto, feeds: dict, outputs: list[str] | None = None) -> dict:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def block_of(model: onnx.ModelProto):
    m = ir.serde.deserialize_model(model)
    normalise(RewriteOptions())(m)
    AnalyseGrid(None)(m)
    return final_blocks(m)["y"]


@pytest.mark.parametrize("case", list(RULES))
def test_formula_is_the_original_op(case):
    """At the original's own factor (eST 1) the documented formula reproduces the original output
    from the original T: the rebuilt upsampling is the same interpolation, not a look-alike."""
    model = RULES[case]()
    block = block_of(model)
    assert block.fixed, block.problem
    x = np.random.default_rng(1).standard_normal((1, 2, 32, 32)).astype(np.float32)
    got = ort_run(with_output(model, "score"), {"x": x}, ["y", "score"])
    want = reference(got["score"], block.description((1, 1)), block.axes, block.out_size)
    if case.startswith("argmax"):
        assert np.array_equal(want, got["y"])
    else:
        assert np.abs(want - got["y"]).max() <= 1e-5 * max(1.0, np.abs(got["y"]).max())


@pytest.mark.parametrize("case", list(RULES))
@pytest.mark.parametrize("stride", [2, 1])
def test_rebuilt_on_the_dense_score_map(case, stride):
    model = RULES[case]()
    dense = onnx_dense.rewrite_model(model, output_stride=stride)
    report = onnx_dense.verify(model, dense, phases=True)
    assert report.passed, report.text()
    checks = {(c.output, c.check.split()[0]) for c in report.comparisons if not c.skipped}
    assert {("y", "size"), ("y", "upsampling"), ("score", "subgrid"), ("score", "phase")} <= checks
    info = metadata.read(dense)
    up = info.outputs["y"].upsampling
    assert up["factor"] == [stride, stride] and up["information_stride"] == [stride, stride]
    assert info.outputs["score"].est == (8 // stride, 8 // stride)
    proto = ir.serde.serialize_model(dense)
    assert [o.name for o in proto.graph.output] == ["y", "score"]
    ops = [n.op_type for n in proto.graph.node]
    assert ("ConvTranspose" if case.startswith("transpose") else "Resize") in ops
    x = np.random.default_rng(2).standard_normal((1, 2, 32, 32)).astype(np.float32)
    assert ort_run(proto, {"x": x})["y"].shape == ort_run(model, {"x": x})["y"].shape


def input_sizes(first: int) -> str:
    """ONNX text making ``sz``, the sizes of an image-sized head, as exporters write
    ``F.interpolate(h, size=x.shape[-2:])`` for an input of any size: the score map's batch and
    channels, then the input's two spatial dims from axis ``first`` (2: NCHW, 1: NHWC), read by
    Shape at run time."""
    return ("  sz_x = Shape (x)\n  sz_score = Shape (score)\n"
            "  sz_0 = Constant <value = int64[1] {0}> ()\n  sz_2 = Constant <value = int64[1] {2}> ()\n"
            f"  sz_from = Constant <value = int64[1] {{{first}}}> ()\n"
            f"  sz_to = Constant <value = int64[1] {{{first + 2}}}> ()\n"
            "  sz_lead = Slice (sz_score, sz_0, sz_2)\n  sz_hw = Slice (sz_x, sz_from, sz_to)\n"
            "  sz = Concat <axis=0> (sz_lead, sz_hw)\n")


def any_size_head(sized: str, mode: str = "linear", coord: str = "half_pixel", extra: str = "") -> onnx.ModelProto:
    """An image-sized head (``sized`` "input") or the same upsampled by a factor ("scales": its
    output s L), with an input of any size."""
    attrs = f'mode="{mode}", coordinate_transformation_mode="{coord}"{extra}'
    body = input_sizes(2) + f"  [up] y = Resize <{attrs}> (score, , , sz)" if sized == "input" else \
        SCALES + f"  [up] y = Resize <{attrs}> (score, , sc)"
    return build(HEAD.replace("float[1,2,32,32] x", "float[1,2,H,W] x").format(opset=17, sig="", out="float y", body=body))


@pytest.mark.parametrize("sized", ["input", "scales"])
@pytest.mark.parametrize("mode,coord,extra", [
    ("linear", "half_pixel", ""), ("linear", "asymmetric", ""), ("nearest", "half_pixel", ""),
    ("nearest", "asymmetric", ', nearest_mode="floor"'), ("linear", "align_corners", ""),
])
@pytest.mark.parametrize("stride,strategy", [(2, "dilate"), (1, "dilate"), (2, "fragments"), (1, "fragments")])
def test_the_output_keeps_the_originals_size_at_any_input_size(sized, mode, coord, extra, stride, strategy):
    """Rewritten at 32x32, run at sizes that are not multiples of the score map's stride 8: an
    output the original sizes from its input is the image's size (not 8 times the score map's,
    8 px more), and one the original upsamples by a factor is the factor times the score map, as
    the original's are. Either way every pixel is the numpy reference's on the dense score map.
    Both strategies: their dense score maps differ in length at such sizes (dilate's ends a
    phase short of fragments' e L)."""
    model = any_size_head(sized, mode, coord, extra)
    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(model, output_stride=stride, input_shapes={"x": (1, 2, 32, 32)},
                                                              strategy=strategy))
    up = metadata.read(dense).outputs["y"].upsampling
    rng = np.random.default_rng(4)
    for size in ((32, 32), (37, 45), (40, 33), (25, 63)):
        x = rng.standard_normal((1, 2, *size)).astype(np.float32)
        want = ort_run(model, {"x": x})["y"]
        got = ort_run(dense, {"x": x})
        assert got["y"].shape == want.shape == ((1, 3, *size) if sized == "input" else want.shape), (size, got["y"].shape)
        ref = reference(got["score"], up, (2, 3), want.shape[2:])
        assert np.abs(ref - got["y"]).max() <= 1e-5 * max(1.0, np.abs(ref).max()), size


@pytest.mark.parametrize("layout", ["nchw", "nhwc_argmax"])
def test_tiles_and_phases_of_an_image_sized_output_equal_the_whole_run(layout):
    """The tail (runtime/final_tail.py) reads the image's size, not the image: tiles and phases
    of an odd-sized image give the whole run's image-sized output, bit for bit (also an NHWC
    head whose tail transposes and takes the ArgMax)."""
    from onnx_dense.runtime import DenseSession, final_tail

    if layout == "nchw":
        model, static, shape, want = any_size_head("input"), (1, 2, 32, 32), (1, 2, 97, 113), (1, 3, 97, 113)
    else:
        out, body = NHWC_TAILS["transpose_argmax"]
        model, static, shape, want = build(NHWC.format(out=out, sizes=input_sizes(1), body=body)), (1, 32, 32, 2), (1, 97, 113, 2), (1, 97, 113)
    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(model, output_stride=2, input_shapes={"x": static},
                                                              strategy="dilate"))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with DenseSession(dense, provider="cpu") as session:
        whole = {k: v.numpy() for k, v in session.run({"x": x}).items()}
    assert whole["y"].shape == want
    parts = final_tail.split(dense, metadata.read(dense))
    assert "x" not in parts.tail_inputs and list(parts.shapes.values()) == ["x"]
    for kwargs, kind in ((dict(tile=48), "tiles"), (dict(schedule="phases"), "phases"),
                         (dict(max_memory="1GB", schedule="tiled-trunk"), "tiled-trunk")):
        with DenseSession(dense, provider="cpu", **kwargs) as session:
            got = session.run({"x": x})
            assert session.last_schedule.kind == kind
        for name, value in whole.items():
            np.testing.assert_array_equal(got[name].numpy(), value, err_msg=f"{name}, {kind}")


@pytest.mark.parametrize("rule", ["half_pixel", "nearest", "cubic"])
@pytest.mark.parametrize("stride,mode,scale,step", [(2, "half_pixel", 2, 1), (4, "half_pixel", 4, 1),
                                                   (1, "asymmetric", 2, 2)])
def test_a_half_pixel_offset_is_resized_by_m_where_m_allows(rule, stride, mode, scale, step):
    """A half-pixel offset with an even m: Resize half_pixel by m, not asymmetric by 2m and every
    other pixel, whose map is four times the output's (1.7 GB of a 2.1 GB run at 4096 pixels,
    benchmarks/README.md). In every mode: half_pixel puts pixel y at the same coordinate, so
    nearest rounds it alike (never at a tie: y would be a half integer). m = 1 (output stride 1
    here) keeps the 2m form; verify checks both against the numpy reference (test above)."""
    model = RULES[rule]()
    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(model, output_stride=stride))
    resize = next(n for n in dense.graph.node if n.op_type == "Resize")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
    assert attrs["coordinate_transformation_mode"].decode() == mode
    made = {o: n for n in dense.graph.node for o in n.output}

    def const(name):
        node = made[name]
        return onnx.numpy_helper.to_array(node.attribute[0].t)

    assert list(const(resize.input[2])[2:]) == [scale, scale]
    crop = next(n for n in dense.graph.node if n.op_type == "Slice" and n.input[0] == resize.output[0])
    assert list(const(crop.input[4])) == [step, step]
    assert onnx_dense.verify(model, dense, phases=True).passed


def test_on_grid_pixels_equal_the_original():
    """Asymmetric linear: output pixel 8i reads T position i exactly, in the original and in the
    dense model (dense position 8i/R is that same prediction): equal with no formula involved."""
    model = RULES["asymmetric"]()
    x = np.random.default_rng(3).standard_normal((1, 2, 32, 32)).astype(np.float32)
    want = ort_run(model, {"x": x})["y"]
    for stride in (4, 2, 1):
        got = ort_run(ir.serde.serialize_model(onnx_dense.rewrite_model(model, output_stride=stride)), {"x": x})["y"]
        assert np.abs(got[..., ::8, ::8] - want[..., ::8, ::8]).max() < 1e-5
        assert np.abs(got - want).max() > 1e-3  # and elsewhere it is finer than the original


def test_learned_final_upsampling_is_refused_with_the_alternative():
    rng = np.random.default_rng(0)
    body, _ = transpose_head(kernel=16, pads=4)
    model = head(body, weights={"wt": rng.standard_normal((3, 3, 16, 16)).astype(np.float32)})
    with pytest.raises(onnx_dense.DenseError) as caught:
        onnx_dense.rewrite_model(model, output_stride=2)
    message = str(caught.value)
    assert "'up' (ConvTranspose)" in message and "learned" in message and "--no-final-upsampling" in message
    assert "\n" not in message
    dense = onnx_dense.rewrite_model(model, output_stride=2, final_upsampling=False)
    proto = ir.serde.serialize_model(dense)
    assert [o.name for o in proto.graph.output] == ["score"]
    report = onnx_dense.verify(model, dense, phases=True)
    assert report.passed, report.text()


@pytest.mark.parametrize("tail, why", [
    ("  [last] y = Conv <pads=[1,1,1,1]> (u, wl)", "'last' (Conv), which has learned weights after the upsampling"),
    ("  [last] y = MaxPool <kernel_shape=[3,3], pads=[1,1,1,1]> (u)",
     "'last' (MaxPool), which is neither an interpolation nor a per-position op after the upsampling"),
])
def test_a_final_block_that_is_not_an_interpolation_says_why(tail, why):
    weights = {"wl": np.ones((3, 3, 3, 3), np.float32)} if "wl" in tail else None
    model = head(SCALES + '  [up] u = Resize <mode="linear"> (score, , sc)\n' + tail, weights=weights)
    with pytest.raises(onnx_dense.DenseError) as caught:
        onnx_dense.rewrite_model(model, output_stride=2)
    assert why in str(caught.value) and "--no-final-upsampling" in str(caught.value)
    onnx_dense.rewrite_model(model, output_stride=2, final_upsampling=False)


def test_several_outputs_each_rebuilt():
    """Two upsamplings of one score map (linear and nearest) and the score map itself as outputs."""
    body = (SCALES + '  [up] y = Resize <mode="linear"> (score, , sc)\n'
            '  [up_nearest] z = Resize <mode="nearest"> (score, , sc)')
    model = head(body, out="float y, float z, float score")
    x = np.random.default_rng(3).standard_normal((1, 2, 32, 32)).astype(np.float32)
    want = ort_run(model, {"x": x})
    for stride in (4, 2):
        dense = onnx_dense.rewrite_model(model, output_stride=stride)
        proto = ir.serde.serialize_model(dense)
        assert [o.name for o in proto.graph.output] == ["y", "z", "score"]
        got = ort_run(proto, {"x": x})
        assert got["y"].shape == want["y"].shape and got["z"].shape == want["z"].shape
        assert np.abs(got["score"][..., :: 8 // stride, :: 8 // stride] - want["score"]).max() < 1e-5
        report = onnx_dense.verify(model, dense, phases=True)  # y and z: the documented upsampling of score
        assert report.passed, report.text()
        assert {c.output for c in report.comparisons if c.check == "upsampling"} == {"y", "z"}, report.text()


def test_at_the_score_maps_stride_the_summary_says_what_the_output_carries(tmp_path):
    """-r 8 on a head upsampling a stride-8 map: the model is the original, and the summary says
    the output carries a prediction every 8 px upsampled to every pixel (not "every 1 px")."""
    from tests._cli import run

    src = tmp_path / "fixed.onnx"
    onnx.save(RULES["half_pixel"](), src)
    code, out, err = run("rewrite", src, tmp_path / "d.onnx", "-r", "8")
    assert code == 0, err
    assert "output 'y': a prediction every 8 input pixels, upsampled x8 by 'up' to every 1 (as the original)" in out, out
    assert "nothing to densify" in out and "every 1 input pixels" not in out, out


@pytest.mark.parametrize("rule", ["half_pixel", "align_corners", "transpose_crop_sigmoid", "argmax_after"])
def test_tiles_and_phases_of_a_rebuilt_upsampling_equal_the_whole_run(rule):
    """The rebuilt upsampling reads the whole score map: the session tiles (or splits into
    phases) the body up to it and runs the upsampling once on the stitched map
    (runtime/final_tail.py); every output equals the whole run's, bit for bit."""
    from onnx_dense.runtime import DenseSession

    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(RULES[rule](), output_stride=2, strategy="dilate"))
    size = (32, 32) if rule == "align_corners" else (96, 112)  # align_corners: the export size only
    x = np.random.default_rng(0).standard_normal((1, 2, *size)).astype(np.float32)
    with DenseSession(dense, provider="cpu") as session:
        whole = {k: v.numpy() for k, v in session.run({"x": x}).items()}
    for kwargs, kind in ((dict(tile=48), "tiles"), (dict(schedule="phases"), "phases"),
                         (dict(max_memory="1GB", schedule="phases+tiles"), "phases+tiles"),
                         (dict(max_memory="1GB", schedule="tiled-trunk"), "tiled-trunk")):
        with DenseSession(dense, provider="cpu", **kwargs) as session:
            got = session.run({"x": x})
            assert session.last_schedule.kind == kind
        assert list(got) == list(whole)
        for name, value in whole.items():
            np.testing.assert_array_equal(got[name].numpy(), value, err_msg=f"{name}, {kind}")
            assert got[name].info == session.info.outputs[name]  # the pixel grid of the whole model's output


def test_dpoa_keeps_the_originals_fixed_bilinear_kernel(tmp_path):
    """The rewrite rebuilds FCN's fixed bilinear ConvTranspose by the remaining factor, so the
    dense weights lack its kernel: export-dpoa takes it from the original (it is never trained),
    and still refuses any other missing weight."""
    pytest.importorskip("torch")
    from onnx_dense.train import export_dpoa

    original = RULES["transpose_crop_sigmoid"]()
    onnx.save(original, tmp_path / "fcn.onnx")
    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(original, output_stride=2))
    weights = {i.name: onnx.numpy_helper.to_array(i) * 2 for i in dense.graph.initializer if i.name.startswith("w")}
    assert "wt" not in weights and {"w1", "w2", "w3", "w4"} <= set(weights)
    export_dpoa(tmp_path / "fcn.onnx", weights, tmp_path / "dpoa.onnx")
    got = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "dpoa.onnx").graph.initializer}
    np.testing.assert_array_equal(got["wt"], onnx.numpy_helper.to_array(
        next(i for i in original.graph.initializer if i.name == "wt")))
    np.testing.assert_array_equal(got["w1"], weights["w1"])
    del weights["w4"]
    with pytest.raises(onnx_dense.DenseError, match="lacks 1 of"):
        export_dpoa(tmp_path / "fcn.onnx", weights, tmp_path / "dpoa2.onnx")


def test_inspect_takes_no_final_upsampling_as_rewrite_does(tmp_path):
    """A learned final block: inspect -r refuses as rewrite does, and shows the cut rewrite
    --no-final-upsampling would make (the score map as the output, at the stride asked for)."""
    from tests._cli import assert_clean_error, run

    rng = np.random.default_rng(0)
    body, _ = transpose_head(kernel=16, pads=4)
    model = head(body, weights={"wt": rng.standard_normal((3, 3, 16, 16)).astype(np.float32)})
    with pytest.raises(onnx_dense.DenseError, match="--no-final-upsampling"):
        onnx_dense.inspect_model(ir.serde.deserialize_model(model), output_stride=2)
    result = onnx_dense.inspect_model(ir.serde.deserialize_model(model), output_stride=2, final_upsampling=False)
    assert [(o["name"], o["est"]) for o in result.outputs] == [("score", [4, 4])]
    src = tmp_path / "learned.onnx"
    onnx.save(model, src)
    code, out, err = run("inspect", src, "-r", "2")
    assert_clean_error(code, out, err, "'up' (ConvTranspose)", "--no-final-upsampling")
    code, out, err = run("inspect", src, "-r", "2", "--no-final-upsampling")
    assert code == 0, err
    assert "score" in out


def test_no_final_upsampling_on_a_fixed_one_outputs_the_score_map():
    model = RULES["half_pixel"]()
    dense = onnx_dense.rewrite_model(model, output_stride=4, final_upsampling=False)
    info = metadata.read(dense)
    assert list(info.outputs) == ["score"] and info.outputs["score"].stride == (4, 4)
    assert onnx_dense.verify(model, dense, phases=True).passed


def test_no_final_upsampling_without_one_is_refused():
    model = head("  y = Identity (score)")
    with pytest.raises(onnx_dense.DenseError, match="no-final-upsampling: no output"):
        onnx_dense.rewrite_model(model, output_stride=4, final_upsampling=False)


def test_information_stride_makes_finer_strides_reachable(tmp_path):
    model = RULES["transpose_crop_sigmoid"]()
    assert onnx_dense.api.output_strides(model) == [(1,), (2,), (4,), (8,)]
    result = onnx_dense.inspect_model(ir.serde.deserialize_model(model))
    out = next(o for o in result.outputs if o["name"] == "y")
    assert out["stride"] == [1, 1] and out["information_stride"] == [8, 8]
    assert out["upsampled_from"] == "score"


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    torch = pytest.importorskip("torch")
    del torch
    from samples import segmentation

    folder = tmp_path_factory.mktemp("seg")
    cache = {}

    def get(name: str, exporter: str = "torchscript") -> str:
        key = (name, exporter)
        if key not in cache:
            dynamic = name == "dbnet" and exporter == "torchscript"
            cache[key] = str(segmentation.export(segmentation.build(name), folder / f"{name}_{exporter}.onnx", exporter,
                                                 dynamic=dynamic))
        return cache[key]

    return get


def verified(path: str, stride: int, **kwargs) -> onnx_dense.api.ir.Model:
    dense = onnx_dense.rewrite_model(onnx.load(path), output_stride=stride, **kwargs)
    report = onnx_dense.verify(path, dense, phases=True)
    assert report.passed, report.text()
    return dense


@pytest.mark.parametrize("name,exporter,strides", [
    ("fcn8s", "torchscript", (4,)),
    ("fcn8s", "dynamo", (2,)),
    ("deeplabv3", "torchscript", (4, 2)),
    ("lraspp", "dynamo", (4, 2)),
    ("fpn", "torchscript", (2, 1)),
])
def test_heads_rebuilt_exactly(samples, name, exporter, strides):
    path = samples(name, exporter)
    for stride in strides:
        dense = verified(path, stride)
        info = metadata.read(dense)
        rebuilt = [o for o in info.outputs.values() if o.upsampling]
        assert len(rebuilt) == 1 and rebuilt[0].size == (64, 64)
        assert rebuilt[0].upsampling["information_stride"] == [stride, stride]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_deeplab_sizes_baked_at_export_rederived(samples, exporter):
    """Both exporters bake DeepLab's image-pooling and final Resize sizes (64x64 here): with
    rederive_sizes the dense model runs at other sizes and verify's any-size check runs (it is
    skipped without, the original being bound to 64x64 too)."""
    path = samples("deeplabv3", exporter)
    plain = onnx_dense.verify(path, onnx_dense.rewrite_model(onnx.load(path), output_stride=2), phases=True)
    assert [c.skipped for c in plain.comparisons if c.check == "any size"] == [True], plain.text()
    dense = verified(path, 2, rederive_sizes=True)
    report = onnx_dense.verify(path, dense)
    assert [c.passed and not c.skipped for c in report.comparisons if c.check == "any size"] == [True], report.text()
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    got = ort_run(ir.serde.serialize_model(dense), {"input": x})
    assert got["output"].shape == (1, 5, 96, 96)


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter", [
    ("fcn8s", "torchscript"), ("fcn8s", "dynamo"), ("deeplabv3", "dynamo"), ("lraspp", "torchscript"), ("fpn", "dynamo"),
])
def test_heads_rebuilt_exactly_at_every_stride(samples, name, exporter):
    for stride in ((4, 2, 1) if name in ("fcn8s", "deeplabv3") else (4, 2) if name == "lraspp" else (2, 1)):
        verified(samples(name, exporter), stride)


@pytest.mark.parametrize("name,shapes", [("unet", None), ("dbnet", {"x": (1, 3, 64, 64)})])
def test_learned_final_blocks_refused_and_cut(samples, name, shapes):
    path = samples(name)
    with pytest.raises(onnx_dense.DenseError) as caught:
        onnx_dense.rewrite_model(onnx.load(path), output_stride=1, input_shapes=shapes)
    message = str(caught.value)
    assert "--no-final-upsampling" in message and "learned" in message and message.startswith("node '")
    for stride in (2, 1):
        dense = onnx_dense.rewrite_model(onnx.load(path), output_stride=stride, input_shapes=shapes,
                                         final_upsampling=False)
        report = onnx_dense.verify(path, dense, phases=True)
        assert report.passed, report.text()
        (out,) = metadata.read(dense).outputs.values()
        assert out.stride == (stride, stride) and out.upsampling is None


def test_run_writes_full_resolution_label_maps(samples, tmp_path):
    """``onnx-dense run`` on a rewritten FPN: the label map has the image's size (the FPN runs at
    any multiple of 32), and T's map (a prediction every 2 px) comes with it."""
    from PIL import Image

    from tests._cli import run

    dense = tmp_path / "fpn_dense.onnx"
    onnx_dense.rewrite(samples("fpn"), dense, output_stride=2)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(image)
    code, stdout, stderr = run("run", str(dense), str(image), "--out", str(tmp_path / "maps"))
    assert code == 0, stderr
    maps = np.load(tmp_path / "maps" / "img.output.npy")
    assert maps.shape == (1, 5, 64, 96)
    labels = np.asarray(Image.open(tmp_path / "maps" / "img.output.labels.png"))
    assert labels.shape == (64, 96) and set(np.unique(labels)) <= set(range(5))


def test_run_under_a_budget_writes_the_final_upsampling_band_by_band_into_its_file(samples, tmp_path, monkeypatch):
    """``onnx-dense run --max-memory`` on DeepLabV3 under a budget its final upsampling does not
    fit whole: the upsampling runs in bands straight into the output's .npy file (mapped, its
    pages given back band by band), which is moved into place, no temporary left; the maps and
    pictures are the unbudgeted run's, byte for byte."""
    import json

    from PIL import Image

    from onnx_dense.runtime import batch, windowed
    from tests._cli import run

    # the figures as the unbudgeted run draws them (under 1 MB they would be drawn band by band:
    # tests/test_phases.py::test_a_picture_that_would_not_fit_the_budget_is_drawn_in_bands)
    monkeypatch.setattr(batch, "stream_pictures", lambda session, image: False)
    dense = tmp_path / "deeplab_dense.onnx"
    onnx_dense.rewrite(samples("deeplabv3"), dense, output_stride=2, rederive_sizes=True)  # any input size
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(image)
    code, _, stderr = run("run", dense, image, "--out", tmp_path / "whole")
    assert code == 0, stderr
    on_disk = []
    allocate = windowed.DiskOutputs.allocate
    monkeypatch.setattr(windowed.DiskOutputs, "allocate",
                        lambda self, name, *a: on_disk.append(name) or allocate(self, name, *a))
    code, _, stderr = run("run", dense, image, "--out", tmp_path / "budget", "--max-memory", "1MB")
    assert code == 0, stderr
    assert on_disk == ["output"]  # the rebuilt output; T comes from the body's run
    schedule = json.loads((tmp_path / "budget" / "img.json").read_text())["schedule"]
    assert schedule["final_upsampling_bands"] == 3, schedule  # 48 rows of the score map, 16 a band
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "budget").iterdir())  # no temporary left
    for name in files:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "budget" / name), np.load(tmp_path / "whole" / name))
        elif name.endswith(".png"):
            assert (tmp_path / "budget" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_cli_flag_and_refusal(tmp_path):
    from tests._cli import assert_clean_error, run

    fixed = tmp_path / "fixed.onnx"
    onnx.save(RULES["half_pixel"](), fixed)
    code, out, err = run("rewrite", fixed, tmp_path / "d.onnx", "-r", "2")
    assert code == 0, err
    assert "the final upsampling rebuilt on the dense score map 'score'" in out
    code, out, err = run("rewrite", fixed, tmp_path / "t.onnx", "-r", "2", "--no-final-upsampling")
    assert code == 0, err
    assert "output 'score': eST 4" in out and "output 'y'" not in out
    code, out, err = run("inspect", fixed)
    assert "grid stride 1, predictions every 8 px, upsampled x8 from 'score' by 'up'" in out
    assert "reachable output strides: 1, 2, 4, 8" in out
    body, _ = transpose_head()
    learned = tmp_path / "learned.onnx"
    onnx.save(head(body, weights={"wt": np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)}),
              learned)
    code, out, err = run("rewrite", learned, tmp_path / "l.onnx", "-r", "4")
    assert_clean_error(code, out, err, "'up' (ConvTranspose)", "--no-final-upsampling")
    assert not (tmp_path / "l.onnx").exists()


def test_verify_checks_an_upsampled_outputs_size_where_the_original_runs(monkeypatch):
    """``verify``'s any-size check runs the original too, one pixel off the strides: an output
    the original sizes from its input that the dense model sizes from its score map (the
    rewrite before it read ``sized_by``) fails there, naming the output and both sizes."""
    from onnx_dense.passes.analysis import final_upsampling

    model = any_size_head("input")
    shapes = {"x": (1, 2, 32, 32)}
    (check,) = [c for c in onnx_dense.verify(model, onnx_dense.rewrite_model(model, output_stride=2, input_shapes=shapes))
                .comparisons if c.check == "any size"]
    assert check.passed and "sized as the original's at 1x2x40x40 and 1x2x41x41" in check.note, check.note
    monkeypatch.setattr(final_upsampling, "_sized_by_input", lambda *args: None)
    (check,) = [c for c in onnx_dense.verify(model, onnx_dense.rewrite_model(model, output_stride=2, input_shapes=shapes))
                .comparisons if c.check == "any size"]
    assert not check.passed and "at input [1, 2, 41, 41]: output 'y' is [1, 3, 48, 48], the original's [1, 3, 41, 41]" \
        in check.note, check.note


def test_rewrite_says_which_outputs_take_the_inputs_size(tmp_path):
    from tests._cli import run

    for sized, said in (("input", True), ("scales", False)):
        src = tmp_path / f"{sized}.onnx"
        onnx.save(any_size_head(sized), src)
        code, out, err = run("rewrite", src, tmp_path / f"{sized}_dense.onnx", "-r", "2", "--input-shape", "x:1,2,32,32")
        assert code == 0, err
        assert "upsampled x2 (resize, linear) to the original's size 32" in out, out
        assert ("(the input's, at any input size)" in out) is said, out


# TensorFlow's layout: an NHWC input, transposed for the convolutions, upsampled, and transposed
# back (or upsampled in NHWC after a transpose); the label map is NHWC or, after ArgMax, NHW.
NHWC = """
<ir_version: 9, opset_import: ["" : 17]>
net (float[1,H,W,2] x, float[4,2,3,3] w1, float[4,4,3,3] w2, float[4,4,3,3] w3, float[3,4,1,1] w4) => ({out} y) {{
  t = Transpose <perm=[0,3,1,2]> (x)
  c1 = Conv <strides=[2,2], pads=[1,1,1,1]> (t, w1)
  c2 = Conv <strides=[2,2], pads=[1,1,1,1]> (c1, w2)
  c3 = Conv <strides=[2,2], pads=[1,1,1,1]> (c2, w3)
  score = Conv (c3, w4)
{sizes}{body}
}}"""
NHWC_TAILS = {
    "transpose": ("float", '  [up] u = Resize <mode="linear"> (score, , , sz)\n  y = Transpose <perm=[0,2,3,1]> (u)'),
    "softmax_transpose": ("float", '  [up] u = Resize <mode="linear"> (score, , , sz)\n  v = Softmax <axis=1> (u)\n'
                                   '  y = Transpose <perm=[0,2,3,1]> (v)'),
    "transpose_argmax": ("int64", '  [up] u = Resize <mode="linear"> (score, , , sz)\n  v = Transpose <perm=[0,2,3,1]> (u)\n'
                                  '  y = ArgMax <axis=3, keepdims=0> (v)'),
    "resize_in_nhwc": ("float", '  st = Transpose <perm=[0,2,3,1]> (score)\n'
                                '  sc = Constant <value = float[4] {1.0, 8.0, 8.0, 1.0}> ()\n'
                                '  [up] y = Resize <mode="linear"> (st, , sc)'),
}


@pytest.mark.parametrize("tail", list(NHWC_TAILS))
@pytest.mark.parametrize("stride", [2, 1])
def test_an_nhwc_head_transposed_back_after_the_upsampling(tail, stride):
    """A Transpose after the upsampling moves the spatial axes and mixes nothing: it is part of
    the block (Softmax and ArgMax then name the channel axis where it went). verify passes,
    phases included, and the output has the original's size at an odd size too."""
    out, body = NHWC_TAILS[tail]
    model = build(NHWC.format(out=out, sizes=input_sizes(1), body=body))
    dense = onnx_dense.rewrite_model(model, output_stride=stride, input_shapes={"x": (1, 32, 32, 2)})
    report = onnx_dense.verify(model, dense, phases=True)
    assert report.passed, report.text()
    assert ("y", "upsampling") in {(c.output, c.check.split()[0]) for c in report.comparisons if not c.skipped}
    x = np.random.default_rng(5).standard_normal((1, 37, 45, 2)).astype(np.float32)
    assert ort_run(ir.serde.serialize_model(dense), {"x": x})["y"].shape == ort_run(model, {"x": x})["y"].shape


@pytest.mark.parametrize("case", ["half_pixel", "align_corners", "nearest", "argmax_squeeze", "transpose_crop_sigmoid",
                                  "sized_by_input"])
def test_the_trainers_torch_interpreter_runs_the_rebuilt_upsampling(case):
    """``onnx-dense train`` fine-tunes the dense graph in torch (train/graph_module.py): every node
    the rebuilt block adds (its sizes computed from Shape, Gather, Div, Concat) is one it runs, and
    its outputs are onnxruntime's, at the static size and at one off the strides."""
    torch = pytest.importorskip("torch")
    from onnx_dense.train.graph_module import OnnxGraphModule

    if case == "sized_by_input":
        dense = onnx_dense.rewrite_model(any_size_head("input"), output_stride=2, input_shapes={"x": (1, 2, 32, 32)})
        sizes = [(32, 32), (37, 45)]
    else:
        dense = onnx_dense.rewrite_model(RULES[case](), output_stride=2)
        sizes = [(32, 32)]
    proto = ir.serde.serialize_model(dense)
    module = OnnxGraphModule(proto).eval()
    names = [o.name for o in proto.graph.output]
    for size in sizes:
        x = np.random.default_rng(6).standard_normal((1, 2, *size)).astype(np.float32)
        want = ort_run(proto, {"x": x})
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        got = got if isinstance(got, (list, tuple)) else [got]
        for name, value in zip(names, got):
            assert value.shape == want[name].shape, (case, name, size)
            err = np.abs(value.numpy().astype(np.float64) - want[name]).max()
            assert err <= 1e-5 * max(1.0, np.abs(want[name]).max()), (case, name, size, err)


def _split_tail(dense: onnx.ModelProto, x: np.ndarray):
    """The whole run's rebuilt outputs and the tail's pieces: (parts, bands or why not, feeds, whole, run)."""
    from onnx_dense.runtime import final_tail

    info = metadata.read(dense)
    parts = final_tail.split(dense, info)
    maps = ort_run(parts.body, {"x": x})
    feeds = {n: maps[n] if n in maps else np.array(x.shape, np.int64) for n in parts.tail_inputs}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    tail = ort.InferenceSession(parts.tail.SerializeToString(), so, providers=["CPUExecutionProvider"])
    whole = dict(zip(parts.rebuilt, tail.run(parts.rebuilt, feeds)))
    return parts, final_tail.bands_of(info, parts), feeds, whole, tail.run


BAND_HEADS = {
    **{rule: RULES[rule] for rule in RULES},
    "two_upsamplings": lambda: head(SCALES + '  [up] y = Resize <mode="linear"> (score, , sc)\n'
                                    '  [up_nearest] z = Resize <mode="nearest"> (score, , sc)', out="float y, float z"),
    "sized_by_input": lambda: any_size_head("input"),
    "sized_by_input_nearest": lambda: any_size_head("input", "nearest", "asymmetric", ', nearest_mode="floor"'),
    **{f"nhwc_{tail}": (lambda t=tail: build(NHWC.format(out=NHWC_TAILS[t][0], sizes=input_sizes(1), body=NHWC_TAILS[t][1])))
       for tail in NHWC_TAILS},
}


@pytest.mark.parametrize("stride", [4, 2, 1])
@pytest.mark.parametrize("case", list(BAND_HEADS))
def test_the_final_upsampling_in_bands_is_the_whole_run(case, stride):
    """Under a budget the rebuilt tail runs on bands of the score map's rows (runtime/final_tail.py):
    from one eST of rows to most of the map, at sizes that split unevenly, each output is the whole
    run's bit for bit (ORT with optimisations off). align_corners, whose rows cannot be split
    exactly, runs on groups of the score map's channels, bit for bit too."""
    from onnx_dense.runtime import final_tail

    nhwc = case.startswith("nhwc_")
    model = BAND_HEADS[case]()
    shapes = {"x": (1, 32, 32, 2) if nhwc else (1, 2, 32, 32)}
    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(model, output_stride=stride, input_shapes=shapes))
    sizes = [(32, 32)] if "align_corners" in case else [(96, 112), (101, 77)]
    rng = np.random.default_rng(7)
    for size in sizes:
        x = rng.standard_normal((1, *size, 2) if nhwc else (1, 2, *size)).astype(np.float32)
        parts, bands, feeds, whole, run = _split_tail(dense, x)
        assert isinstance(bands, final_tail.Bands), bands
        if "align_corners" in case:
            assert bands.by == "channels" and bands.axis == 1, bands
            for group in (1, 2):
                got = final_tail.run_in_channel_groups(run, parts, feeds, bands, group)
                for name, want in whole.items():
                    assert got[name].shape == want.shape and got[name].dtype == want.dtype, (name, group)
                    np.testing.assert_array_equal(got[name], want, err_msg=f"{name}, {group} channels a group")
            return
        length = feeds[bands.score].shape[bands.axis]
        for rows in sorted({bands.est, 2 * bands.est, 5 * bands.est, final_tail.band_rows(length - 1, bands.est)}):
            got = final_tail.run_in_bands(run, parts, feeds, bands, rows)
            assert got is not None, (size, rows)
            for name, want in whole.items():
                assert got[name].shape == want.shape and got[name].dtype == want.dtype, (name, size, rows)
                np.testing.assert_array_equal(got[name], want, err_msg=f"{name}, {size}, {rows} rows a band")


def test_a_linear_resize_by_a_factor_not_a_power_of_two_runs_on_groups_of_channels():
    """By 3 (strides 3, 2, 2; R = 3) a linear Resize's shifted coordinates round otherwise: forced
    into bands of rows its output differs from the whole run's, so it runs on groups of the
    score map's channels, bit for bit; a nearest Resize rounds them the same and runs in bands
    of rows, bit for bit."""
    from onnx_dense.runtime import final_tail

    head3 = HEAD.replace("c1 = Conv <strides=[2,2]", "c1 = Conv <strides=[3,3]")
    scales = SCALES.replace("8.0, 8.0", "12.0, 12.0")
    x = np.random.default_rng(8).standard_normal((1, 2, 600, 90)).astype(np.float32)
    for mode, exact in (("linear", False), ("nearest", True)):
        model = build(head3.format(opset=17, sig="", out="float y",
                                   body=scales + f'  [up] y = Resize <mode="{mode}", coordinate_transformation_mode="asymmetric"> (score, , sc)'))
        dense = ir.serde.serialize_model(onnx_dense.rewrite_model(model, output_stride=3))
        parts, bands, feeds, whole, run = _split_tail(dense, x)
        if not exact:
            assert bands.by == "channels", bands
            got = final_tail.run_in_channel_groups(run, parts, feeds, bands, 1)
            np.testing.assert_array_equal(got["y"], whole["y"])
            assert final_tail._rows_refused(metadata.read(dense), parts, {"y": metadata.read(dense).outputs["y"].upsampling}) \
                == "its linear Resize scales the rows by 3, not a power of two"
            up = metadata.read(dense).outputs["y"].upsampling
            bands = final_tail.Bands(up["score"], up["score_axes"][0], up["score_est"][0],
                                     {"y": (2, up["factor"][0], up["offset"][0])})
        got = final_tail.run_in_bands(run, parts, feeds, bands, 4 * bands.est)
        assert np.array_equal(got["y"], whole["y"]) == exact, mode


@pytest.mark.parametrize("rule", ["align_corners", "cubic_align_corners"])
def test_a_budget_an_align_corners_upsampling_does_not_fit_runs_it_on_groups_of_channels(rule):
    """align_corners scales its coordinates with the whole length, so its rows cannot be
    split exactly; each channel can: under a budget the whole tail exceeds, it runs one group
    of the score map's channels at a time, says so, and every output is the whole run's."""
    chosen = _whole_and_under_1mb_agree(rule, np.random.default_rng(10).standard_normal((1, 2, 32, 32)))
    assert chosen.tail_bands == 3 and chosen.to_dict()["final_upsampling_by"] == "channels"  # 3 classes
    assert "(the final upsampling's, in 3 groups of channels)" in chosen.describe(), chosen.describe()


def _whole_and_under_1mb_agree(rule: str, x: np.ndarray):
    """RULES[rule]'s head at output stride 2 (dilate) run on ``x`` whole and under a budget of
    1 MB: every output the same, bit for bit; the budgeted run's schedule."""
    from onnx_dense.runtime import DenseSession

    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(RULES[rule](), output_stride=2, strategy="dilate"))
    x = x.astype(np.float32)
    with DenseSession(dense, provider="cpu") as session:
        whole = {k: v.numpy() for k, v in session.run({"x": x}).items()}
    with DenseSession(dense, provider="cpu", max_memory="1MB") as session:
        got = session.run({"x": x})
        chosen = session.last_schedule
    for name, value in whole.items():
        np.testing.assert_array_equal(got[name].numpy(), value, err_msg=name)
    return chosen


@pytest.mark.parametrize("rule", ["half_pixel", "transpose_crop_sigmoid", "argmax_after"])
def test_a_budget_the_final_upsampling_does_not_fit_runs_it_in_bands(rule):
    """A session whose budget the whole final upsampling exceeds runs it in bands of the score
    map's rows: its line and its record say how many, and every output is the whole run's."""
    chosen = _whole_and_under_1mb_agree(rule, np.random.default_rng(9).standard_normal((1, 2, 96, 112)))
    assert chosen.tail_bands == 3 and chosen.to_dict()["final_upsampling_bands"] == 3  # 48 rows, 16 a band
    assert "(the final upsampling's, in 3 bands), over the 1.00 MB allowed" in chosen.describe(), chosen.describe()


@pytest.mark.parametrize("rule, separable", [("align_corners", True), ("half_pixel", True), ("clip_after", True),
                                             ("softmax_after", False), ("argmax_after", False)])
def test_a_tail_runs_on_groups_of_channels_only_where_each_channel_is_computed_alone(rule, separable):
    """final_tail.channel_axis: a Softmax or an ArgMax over the channels mixes them, so such a
    tail cannot run on groups of them (it runs in bands of rows, or whole)."""
    from onnx_dense.runtime import final_tail

    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(RULES[rule](), output_stride=2, strategy="dilate"))
    parts = final_tail.split(dense, metadata.read(dense))
    assert (final_tail.channel_axis(parts.tail, "score", (2, 3)) == 1) == separable
