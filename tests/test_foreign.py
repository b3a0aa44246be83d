"""Models written by exporters other than PyTorch's: tf2onnx (TensorFlow/Keras) and paddle2onnx.

The graphs are built by :mod:`samples.foreign` in those converters' shapes (NHWC with
Transposes, SAME padding as explicit asymmetric pads or ``auto_pad``, Pad nodes, BatchNorm
folded into Mul/Add, Clip as ReLU6, HardSwish/HardSigmoid, Constant nodes for shapes,
squeeze-and-excitation, a detector neck with upsampling). Each is rewritten at every output
stride ``api.output_strides`` reports and verified in onnxruntime (subgrid, weights, any
size, and the off-grid phases where the original is fully convolutional); what is out of
reach must be a DenseError naming the node. The second half holds one tiny graph per pass
change these models made necessary.
"""

from __future__ import annotations

import functools

import onnx
import pytest

import onnx_dense
from onnx_dense import api, metadata
from onnx_dense.cli import main as cli_main
from samples import foreign
from tests._graphs import check_dense, graph, info, nodes, rewrite

SEG_SHAPE = {"input_1": (1, 48, 48, 3)}
V2_SHAPE = {"input_1": (1, 64, 64, 3)}
YOLO = {"size": 64, "width": 2}  # small enough that output stride 1 verifies in a second

# name -> (builder, kwargs, input_shapes, reachable output strides, fully convolutional)
MODELS = {
    "tf_mobilenet_v1": ("tf_mobilenet_v1", {}, None, [1, 2, 4, 8, 16, 32], False),
    "tf_mobilenet_v1_dense_top": ("tf_mobilenet_v1", {"top": "dense", "opset": 16}, None, [1, 2, 4, 8, 16, 32], False),
    "tf_mobilenet_v2": ("tf_mobilenet_v2", {}, V2_SHAPE, [1, 2, 4, 8, 16, 32], False),
    "tf_mobilenet_v2_se": ("tf_mobilenet_v2", {"se": True}, V2_SHAPE, [4, 8, 16, 32], False),
    "tf_segmenter": ("tf_segmenter", {}, SEG_SHAPE, [1, 2, 4, 8], True),
    "tf_segmenter_resnet_stem": ("tf_segmenter", {"stem": "resnet"}, SEG_SHAPE, [1, 2, 4, 8], True),
    "tf_segmenter_image_pooling": ("tf_segmenter", {"image_pooling": True}, SEG_SHAPE, [8], True),
    "tf_yolo_tiny": ("tf_yolo_tiny", YOLO, None, [32], False),
    "paddle_mobilenet_v3_opset11": ("paddle_mobilenet_v3", {"opset": 11}, None, [8, 16, 32], False),
    "paddle_mobilenet_v3_opset14": ("paddle_mobilenet_v3", {"opset": 14}, None, [8, 16, 32], False),
    "paddle_mobilenet_v3_opset16": ("paddle_mobilenet_v3", {"opset": 16}, None, [8, 16, 32], False),
}
BACKBONE = list(foreign.YOLO_BACKBONE)


@functools.cache
def _built(name: str) -> bytes:
    builder, kwargs, *_ = MODELS[name]
    return foreign.build(builder, **kwargs).SerializeToString()


def model(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_built(name))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            path = root / f"{name}.onnx"
            onnx.save(model(name), str(path))
            cache[name] = str(path)
        return cache[name]

    return get


def _verify(src, dst, *, phases: bool, max_phases: int = 8):
    report = onnx_dense.verify(src, dst, phases=phases, max_phases=max_phases)
    assert report, report.text()
    checks = {c.check for c in report.comparisons}
    assert {"subgrid", "weights", "any size"} <= checks, report.text()
    if phases:
        assert any(c.check.startswith("phase ") and c.compared for c in report.comparisons), report.text()
    return report


# ============================================================================ whole models


@pytest.mark.parametrize("name", list(MODELS))
def test_reachable_output_strides(name):
    _, _, shapes, reachable, _ = MODELS[name]
    assert [r for (r,) in api.output_strides(model(name), input_shapes=shapes, strategy="dilate")] == reachable


# variants of a model already tested at every stride: the two ends of their range
SUBSET = {"tf_mobilenet_v1_dense_top": [1, 32], "tf_segmenter_resnet_stem": [1, 4], "paddle_mobilenet_v3_opset16": [8]}
CASES = [(name, r) for name, spec in MODELS.items() for r in SUBSET.get(name, spec[3])]


@pytest.mark.parametrize("name, stride", CASES)
def test_dense_equals_original(name, stride, saved, tmp_path):
    _, _, shapes, reachable, fully_convolutional = MODELS[name]
    src = saved(name)
    dst = tmp_path / "dense.onnx"
    dense = onnx_dense.rewrite(src, dst, output_stride=stride, input_shapes=shapes)
    meta = metadata.read(dense)
    for out in meta.outputs.values():
        assert out.stride == tuple(min(stride, s) for s in out.original_stride)
        assert out.est == tuple(s // d for s, d in zip(out.original_stride, out.stride))
    phases = fully_convolutional and stride < max(reachable)
    _verify(src, dst, phases=phases)


@pytest.mark.parametrize("stride", [1, 2, 4, 8, 16, 32])
def test_detector_backbone_cut_with_outputs(stride, saved, tmp_path):
    """YOLOv3-tiny: the neck upsamples (refused below output stride 32); its backbone, cut at
    the two features the neck reads (strides 16 and 32), is dense at every output stride."""
    src = saved("tf_yolo_tiny")
    assert [r for (r,) in api.output_strides(src, outputs=BACKBONE)] == [1, 2, 4, 8, 16, 32]
    dst = tmp_path / "backbone.onnx"
    onnx_dense.rewrite(src, dst, output_stride=stride, outputs=BACKBONE)
    dense = onnx.load(str(dst))
    assert [o.name for o in dense.graph.output] == BACKBONE
    assert not nodes(dense, "Resize") and not nodes(dense, "Concat")
    meta = info(dense)
    assert [meta.outputs[n].original_stride for n in BACKBONE] == [(16, 16), (32, 32)]
    assert [meta.outputs[n].est for n in BACKBONE] == [(max(16 // stride, 1),) * 2, (32 // stride,) * 2]
    # the cut backbone is fully convolutional: check the off-grid phases too (where cheap)
    _verify(src, dst, phases=stride in (8, 16), max_phases=4)


REFUSED = [
    # (model, output stride, fragments of the one-line message)
    ("paddle_mobilenet_v3_opset14", 1, ["'p2o.Mul.0' (Mul)", "'p2o.GlobalAveragePool.0'", "global context", "eST 4"]),
    ("paddle_mobilenet_v3_opset14", 4, ["'p2o.Mul.1' (Mul)", "'p2o.GlobalAveragePool.1'", "global context", "eST 2"]),
    ("paddle_mobilenet_v3_opset11", 2, ["'p2o.Mul.1' (Mul)", "'p2o.GlobalAveragePool.0'", "global context"]),
    ("tf_mobilenet_v2_se", 2, ["block_1_squeeze_excite/excite/mul' (Mul)", "block_1_squeeze_excite/squeeze/Mean'",
                               "global context", "eST 2"]),
    ("tf_segmenter_image_pooling", 4, ["image_pooling/resize/ResizeBilinear' (Resize)", "image_pooling/Mean'",
                                       "global context", "eST 2"]),
    ("tf_yolo_tiny", 16, ["up_sampling2d/resize/ResizeNearestNeighbor' (Resize)", "upsamples at eST 2"]),
    ("tf_yolo_tiny", 1, ["up_sampling2d/resize/ResizeNearestNeighbor' (Resize)", "upsamples at eST 32"]),
]


@pytest.mark.parametrize("name, stride, fragments", REFUSED)
def test_out_of_reach_is_a_clear_error_naming_the_node(name, stride, fragments, saved, tmp_path):
    _, _, shapes, reachable, _ = MODELS[name]
    assert stride not in reachable
    dst = tmp_path / "dense.onnx"
    with pytest.raises(onnx_dense.DenseError) as caught:
        onnx_dense.rewrite(saved(name), dst, output_stride=stride, input_shapes=shapes, strategy="dilate")
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "--outputs" in message or "output stride" in message
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_cli_rewrite_and_verify(saved, tmp_path, capsys):
    """The command line on a TF segmenter with a dynamic input and on the cut detector."""
    seg = saved("tf_segmenter")
    dst = tmp_path / "seg_dense.onnx"
    assert cli_main(["rewrite", seg, str(dst), "-r", "2", "--input-shape", "input_1:1,48,48,3"]) == 0
    assert cli_main(["verify", seg, str(dst), "--phases", "--max-phases", "3"]) == 0
    det = tmp_path / "det_backbone.onnx"
    assert cli_main(["rewrite", saved("tf_yolo_tiny"), str(det), "-r", "8", "--outputs", ",".join(BACKBONE)]) == 0
    assert cli_main(["verify", saved("tf_yolo_tiny"), str(det)]) == 0
    capsys.readouterr()
    no = ["rewrite", saved("paddle_mobilenet_v3_opset14"), str(tmp_path / "no.onnx"), "-r", "4", "--strategy", "dilate"]
    assert cli_main(no) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnx-dense: error: node 'p2o.Mul.1' (Mul)"), err
    assert not (tmp_path / "no.onnx").exists()


# ============================================================================ rules these models needed
# Tiny graphs (tests/_graphs.py), one per pass change, each checked numerically in onnxruntime.

SE_BODY = """
  [gap] g = GlobalAveragePool (h)
  [se1] s1 = Conv (g, ws1, bs1)
  r = Relu (s1)
  [se2] s2 = Conv (r, ws2, bs2)
  s = Sigmoid (s2)
  [se_mul] m = Mul (h, s)
  [c2] y = Conv <pads=[1,1,1,1]> (m, w2)
"""
SE_SIG = ", float[2,3,1,1] ws1, float[2] bs1, float[3,2,1,1] ws2, float[3] bs2, float[4,3,3,3] w2"


def _stride2(body: str, sig: str = "", **kw) -> onnx.ModelProto:
    """``body`` reads h, the output of a stride-2 conv: at output stride 2 it stays at eST 1."""
    return graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1" + sig,
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n" + body,
        **kw,
    )


def refuse(m: onnx.ModelProto, *fragments: str, **kwargs) -> str:
    with pytest.raises(onnx_dense.DenseError) as caught:
        rewrite(m, **kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_se_block_with_1x1_convs_keeps_its_global_context():
    """analyse.window_grid: a 1x1 Conv on the 1x1 map of a global pool (torchvision's and
    PaddleClas' SE) still carries only global context: left alone at eST 1 (it was refused
    as 'operands have different spatial sizes'), refused as global context at eST 2."""
    m = _stride2(SE_BODY, SE_SIG)
    d = rewrite(m, 2)
    check_dense(m, d, est=(1, 1))
    assert nodes(d, "GlobalAveragePool")
    refuse(m, "'se_mul' (Mul)", "'gap'", "global context", output_stride=1)


IMAGE_POOLING = """
  [gap] g = GlobalAveragePool (h)
  [pc] p = Conv (g, wp)
  shp = Shape (h)
  st = Constant <value = int64[1] {2}> ()
  en = Constant <value = int64[1] {4}> ()
  hw = Slice (shp, st, en)
  nc = Constant <value = int64[2] {1, 2}> ()
  sz = Concat <axis=0> (nc, hw)
  [up] u = Resize <mode="linear"> (p, , , sz)
  [cat] k = Concat <axis=1> (h, u)
  [c2] y = Conv <pads=[1,1,1,1]> (k, w2)
"""


def test_image_pooling_resize_is_a_broadcast_of_global_context():
    """analyse.upsample: Resize of a 1x1 global map to the feature map's size (DeepLab's image
    pooling) is a broadcast: exact at eST 1 (it was refused as 'not an integer factor of the
    stride'), refused naming the Resize and the pool at eST 2."""
    m = _stride2(IMAGE_POOLING, ", float[2,3,1,1] wp, float[4,5,3,3] w2")
    d = rewrite(m, 2)
    check_dense(m, d, est=(1, 1))
    assert nodes(d, "GlobalAveragePool") and nodes(d, "Resize")
    refuse(m, "'up' (Resize)", "'gap'", "global context", "eST 2", output_stride=1)


UNFOLDS = {
    # (N, C) -> back to a 1x1 map, as Keras' Reshape((1, 1, C)), Reshape to (N, C, 1, 1), Unsqueeze
    "reshape_channels_first": (
        "t = Constant <value = int64[4] {-1, 3, 1, 1}> ()\n  [unf] v = Reshape (g, t)", "v"),
    "reshape_channels_last": (
        "t = Constant <value = int64[4] {-1, 1, 1, 3}> ()\n  [unf] v0 = Reshape (g, t)\n"
        "  v = Transpose <perm=[0,3,1,2]> (v0)", "v"),
    "unsqueeze": ("ax = Constant <value = int64[2] {2, 3}> ()\n  [unf] v = Unsqueeze (g, ax)", "v"),
}


def _mean_unfolded(kind: str, tail: str, sig: str) -> onnx.ModelProto:
    body, v = UNFOLDS[kind]
    return _stride2(
        "  ax23 = Constant <value = int64[2] {2, 3}> ()\n"
        "  [gap] g = ReduceMean <keepdims=0> (h, ax23)\n  " + body + "\n" + tail.replace("{v}", v),
        sig,
    )


@pytest.mark.parametrize("kind", list(UNFOLDS))
def test_keepdims0_mean_unfolded_for_squeeze_and_excitation(kind):
    """analyse.reshape/unsqueeze (unfold) + check_globals (keep_context_vectors): an SE built
    from a keepdims=0 mean (Keras EfficientNet/MobileNetV3, torch's x.mean((2, 3)) + view)
    works at eST 1, where the mean and everything after it stay as they are."""
    tail = "  [se1] s1 = Conv ({v}, ws1)\n  s = Sigmoid (s1)\n  [se_mul] m = Mul (h, s)\n  [c2] y = Conv (m, w2)"
    m = _mean_unfolded(kind, tail, ", float[3,3,1,1] ws1, float[4,3,1,1] w2")
    d = rewrite(m, 2)
    check_dense(m, d, est=(1, 1))
    refuse(m, "'se_mul' (Mul)", "'gap'", "global context", output_stride=1)


@pytest.mark.parametrize("kind", list(UNFOLDS))
def test_keepdims0_mean_unfolded_in_a_head(kind):
    """A classifier head GAP(keepdims 0) -> back to 1x1 -> 1x1 Conv -> Flatten: dense at eST 2."""
    tail = "  [fc] s1 = Conv ({v}, ws1)\n  [fl] y = Flatten (s1)"
    m = _mean_unfolded(kind, tail, ", float[5,3,1,1] ws1")
    d = rewrite(m, 1)
    check_dense(m, d, est=(2, 2))


@pytest.mark.parametrize("crop", [False, True])
def test_pad_of_the_raw_input_moves_the_receptive_field(crop):
    """analyse.pad before the layout is known (Keras' ZeroPadding2D(3) before ResNet's 7x7
    stem): the receptive field starts 3 pixels before the input (the metadata said 0, and the
    phase check compared positions that read the padding). A crop (Cropping2D) keeps measuring
    from the crop's edge, where the padding of later layers begins."""
    if crop:
        first = ("st = Constant <value = int64[2] {3, 3}> ()\n  en = Constant <value = int64[2] {-3, -3}> ()\n"
                 "  ax = Constant <value = int64[2] {1, 2}> ()\n  [crop] xp = Slice (x, st, en, ax)")
    else:
        first = "pp = Constant <value = int64[8] {0, 3, 3, 0, 0, 3, 3, 0}> ()\n  [pad] xp = Pad (x, pp)"
    m = graph(
        "float[1,22,22,2] x, float[3,2,7,7] w1, float[4,3,3,3] w2",
        f"  {first}\n  xt = Transpose <perm=[0,3,1,2]> (xp)\n"
        "  [c1] h = Conv <strides=[2,2]> (xt, w1)\n  r = Relu (h)\n  [c2] y = Conv <strides=[2,2], pads=[1,1,1,1]> (r, w2)",
    )
    d = rewrite(m, 1)
    out = info(d).outputs["y"]
    shift = 0 if crop else -3
    assert out.rf_start == (shift - 2, shift - 2)  # c2's pad of 1 at stride 2
    assert info(d).inputs["x"].spatial_axes == (1, 2)
    check_dense(m, d, est=(4, 4))  # phases included


def test_upsampling_to_a_dense_shape_names_the_upsampling():
    """analyse.visit: a Resize whose sizes come from Shape of a dense tensor is refused for
    upsampling at eST > 1, not for the computed sizes. (It joins a stride-1 branch: a final
    upsampling alone is rebuilt instead, tests/test_segmentation.py.)"""
    m = _stride2(
        "shp = Shape (h)\n  st = Constant <value = int64[1] {2}> ()\n  en = Constant <value = int64[1] {4}> ()\n"
        "  hw = Slice (shp, st, en)\n  two = Constant <value = int64[1] {2}> ()\n  hw2 = Mul (hw, two)\n"
        "  zero = Constant <value = int64[1] {0}> ()\n  nc = Slice (shp, zero, st)\n  sz = Concat <axis=0> (nc, hw2)\n"
        "  [up] u = Resize <mode=\"nearest\"> (h, , , sz)\n  [c0] k = Conv <pads=[1,1,1,1]> (x, w0)\n  y = Add (u, k)",
        ", float[3,2,3,3] w0",
    )
    refuse(m, "'up' (Resize)", "upsamples at eST 2", output_stride=1)


def test_verify_a_cut_against_the_same_part_of_the_original():
    """equivalence: a model cut with --outputs is verified against the original cut the same
    way: its weights after the cut are not 'missing', and its remainder (here a Resize to a
    baked size, which cannot run at other sizes) does not stop the any-size or phase checks."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[3,3,3,3] w2, float[4,6,3,3] w3",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[c2] f = Conv <strides=[2,2], pads=[1,1,1,1]> (h, w2)\n"
        "sz = Constant <value = int64[4] {1, 3, 8, 8}> ()\n"
        "[up] u = Resize <mode=\"nearest\"> (f, , , sz)\n"
        "[cat] k = Concat <axis=1> (h, u)\n"
        "[c3] y = Conv <pads=[1,1,1,1]> (k, w3)",
    )
    d = rewrite(m, 1, outputs=["f"])
    check_dense(m, d, est=(4, 4))  # subgrid, weights, any size and phases
    notes = {c.check: c.note for c in onnx_dense.verify(m, d).comparisons}
    assert notes["weights"].startswith("2 weights"), notes


def test_any_size_skipped_when_the_original_cannot_run_at_other_sizes():
    """equivalence: at an output stride that changes nothing after a baked-size Resize (f's
    own, 4: an output must end on it, issue 16), the dense model fails at a larger input
    exactly as the original does: skipped, not failed."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[3,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[c2] f = Conv <strides=[2,2], pads=[1,1,1,1]> (h, w2)\n"
        "sz = Constant <value = int64[4] {1, 3, 8, 8}> ()\n"
        "[up] u = Resize <mode=\"nearest\"> (f, , , sz)\n"
        "[add] y = Add (h, u)",
        outputs="float y, float f",
    )
    d = rewrite(m, 4)
    report = onnx_dense.verify(m, d)
    assert report, report.text()
    any_size = next(c for c in report.comparisons if c.check == "any size")
    assert any_size.note.startswith("skipped: the original does not run"), any_size.note


# paddle2onnx with InputSpec([None, 3, None, None]): input [-1, 3, "?", "?"], the head's Reshape
# target computed through Shape/Gather/Cast/Concat (ONNX data propagation stops at the Cast).
PADDLE_DYNAMIC = {"x": (1, 3, 64, 64)}


@pytest.mark.parametrize("stride, per_phase_global", [(8, False), (4, True)])
def test_paddle_dynamic_dims_and_computed_flatten(stride, per_phase_global, tmp_path):
    original = foreign.paddle_mobilenet_v3(dynamic=True)
    assert original.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    dense = rewrite(original, stride, input_shapes=PADDLE_DYNAMIC, per_phase_global=per_phase_global)
    assert info(dense).outputs
    path = tmp_path / "paddle.onnx"
    onnx.save(original, path)
    report = onnx_dense.verify(path, dense)
    assert report, report.text()
    assert (stride,) in api.output_strides(path, input_shapes=PADDLE_DYNAMIC)
    table = api.inspect_model(str(path), output_stride=stride, input_shapes=PADDLE_DYNAMIC, per_phase_global=per_phase_global)
    assert table.rows
    # the command line too, with the flag the rewrite needed
    flags = ["--per-phase-global"] if per_phase_global else []
    assert cli_main(["inspect", str(path), "-r", str(stride), "--input-shape", "x:1,3,64,64", *flags]) == 0


def test_bench_runs_a_model_whose_exporter_wrote_minus_one_for_its_batch(tmp_path):
    """paddle2onnx writes the dynamic batch as -1: bench's random inputs took it as a size
    (numpy: "negative dimensions are not allowed", an internal error); verify already did not."""
    path = tmp_path / "paddle.onnx"
    onnx.save(foreign.paddle_mobilenet_v3(dynamic=True), path)
    dense = tmp_path / "dense.onnx"
    assert cli_main(["rewrite", str(path), str(dense), "-r", "8", "--input-shape", "x:1,3,64,64"]) == 0
    assert cli_main(["bench", str(path), str(dense), "-n", "1", "--warmup", "0", "--no-stitch"]) == 0


def test_paddle_dynamic_input_shape_hint_says_batch_1():
    with pytest.raises(onnx_dense.DenseError, match=r"--input-shape x:1,3,H,W"):
        api.rewrite_model(foreign.paddle_mobilenet_v3(dynamic=True), output_stride=8)
