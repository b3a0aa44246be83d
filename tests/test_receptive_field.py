"""The metadata's receptive field is where the output looks: measured, not derived.

``train --label-mode sample``, the run's pixel grid and the tiling margins all read the
receptive field the analysis writes into the dense model's metadata. Here it is checked
against the input rows each output row actually depends on, found by perturbing one input
row at a time in onnxruntime (linear models: no ReLU or max pool that could hide a
dependency): the field must contain every row that changes the output, and its centre must
sit where those rows are centred (FCN-8s's crops and transposed kernels put it tens of pixels
off when the upsampling's offset was ignored).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests._graphs import graph, info, rewrite, run

H, W = 48, 6
TRUNK = (
    "c1 = Conv <strides = [2,2], pads = [1,1,1,1]> (x, w1)\n"
    "p1 = AveragePool <kernel_shape = [2,2], strides = [2,2]> (c1)\n"
    "c2 = Conv <pads = [1,1,1,1]> (p1, w2)\n"
)
SIGNATURE = "float[1,2,48,6] x, float[4,2,3,3] w1, float[4,4,3,3] w2"
UPSAMPLINGS = {
    "convtranspose k4 s2 (FCN)": ("y = ConvTranspose <strides = [2,2]> (c2, wt)", ", float[4,4,4,4] wt"),
    "convtranspose k4 s2 p1": ("y = ConvTranspose <strides = [2,2], pads = [1,1,1,1]> (c2, wt)", ", float[4,4,4,4] wt"),
    "convtranspose k2 s2": ("y = ConvTranspose <strides = [2,2]> (c2, wt)", ", float[4,4,2,2] wt"),
    "resize linear half_pixel": ('y = Resize <mode = "linear"> (c2, , sc)', ""),
    "resize nearest asymmetric floor": (
        'y = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (c2, , sc)',
        "",
    ),
    "resize nearest half_pixel": ('y = Resize <mode = "nearest"> (c2, , sc)', ""),
    "resize linear align_corners": (
        'y = Resize <mode = "linear", coordinate_transformation_mode = "align_corners"> (c2, , sc)', ""
    ),
    "resize cubic half_pixel": ('y = Resize <mode = "cubic"> (c2, , sc)', ""),
    "depthtospace": ("y = DepthToSpace <blocksize = 2> (c2)", ""),
    "caffe crop and skip (FCN-8s)": (
        "tr = ConvTranspose <strides = [2,2]> (c2, wt)\n"
        "st = Constant <value = int64[1] {1}> ()\n"
        "en = Constant <value = int64[1] {25}> ()\n"
        "ax = Constant <value = int64[1] {2}> ()\n"
        "crop = Slice (tr, st, en, ax)\n"
        "st3 = Constant <value = int64[1] {1}> ()\n"
        "en3 = Constant <value = int64[1] {4}> ()\n"
        "ax3 = Constant <value = int64[1] {3}> ()\n"
        "cropw = Slice (crop, st3, en3, ax3)\n"
        "sk = Conv <strides = [2,2], pads = [1,1,1,1]> (x, ws)\n"
        "y = Add (cropw, sk)",
        ", float[4,4,4,4] wt, float[4,2,3,3] ws",
    ),
}
SCALES = 'sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n'


def measured_rows(model, shape) -> list[tuple[int, int] | None]:
    """Per output row, the first and last input row whose change changes it."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    base = next(iter(run(model, {"x": x}).values()))
    scale = 1e-4 * (1 + np.abs(base).max())
    spans: list[tuple[int, int] | None] = [None] * base.shape[2]
    for r in range(shape[2]):
        y = x.copy()
        y[:, :, r, :] += 10 * rng.standard_normal(y[:, :, r, :].shape).astype(np.float32)
        changed = np.abs(next(iter(run(model, {"x": y}).values())) - base).max(axis=(0, 1, 3)) > scale
        for i in np.nonzero(changed)[0]:
            spans[i] = (r, r) if spans[i] is None else (spans[i][0], r)
    return spans


CASES = [(name, {"output_stride": 4}) for name in UPSAMPLINGS if "skip" not in name] + [
    # A skip joins the upsampled path: not a final upsampling, so the dense region reaches it
    # (fragments: the strategy that accepts an upsampling at eST > 1).
    ("caffe crop and skip (FCN-8s)", {"output_stride": R, "strategy": "fragments"}) for R in (2, 1)
]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-R{k['output_stride']}" for n, k in CASES])
def test_field_contains_and_centres_on_what_the_output_reads(name, kwargs):
    body, weights = UPSAMPLINGS[name]
    model = graph(SIGNATURE + weights, TRUNK + (SCALES if "sc)" in body else "") + body)
    dense = rewrite(model, **kwargs)  # at output stride 4 nothing is dense: the analysis alone
    out = info(dense).outputs["y"]
    spans = measured_rows(dense, (1, 2, H, W))
    # Rows whose field is clipped by neither border (the measurement cannot see past them).
    inner = [j for j, s in enumerate(spans) if s is not None and 0 < s[0] and s[1] < H - 1]
    assert len(inner) >= 8, spans
    start, size, step = out.rf_start[0], out.rf_size[0], out.stride[0]
    offsets = []
    for j in inner:
        lo, hi = spans[j]
        assert start + j * step <= lo and hi <= start + j * step + size - 1, (j, spans[j], start, size)
        offsets.append(out.centres(0, j + 1)[j] - (lo + hi) / 2)
    # Centred where it reads: on average to a pixel, each row within one output step.
    assert abs(np.mean(offsets)) <= 1.0, offsets
    assert max(abs(o) for o in offsets) <= step, offsets


def test_fcn8s_score_map_centres_on_its_pool3_cells(tmp_path):
    """FCN-8s (Caffe crops, bilinear ConvTranspose kernels without pads): the fused score map's
    prediction i is pool3's cell i (pixels 8i..8i+7, centre 8i + 3.5) and the upsampled output's
    pixel i is input pixel i."""
    pytest.importorskip("torch")
    import onnx_dense
    from samples import segmentation as seg

    path = seg.export(seg.fcn8s(width=4, size=64, num_classes=2), tmp_path / "fcn8s.onnx")
    dense = onnx_dense.rewrite(path, tmp_path / "dense.onnx", output_stride=4)
    from onnx_dense import metadata
    import onnx_ir as ir

    outputs = metadata.read(ir.serde.serialize_model(dense)).outputs
    score = next(o for name, o in outputs.items() if name != "output")
    assert score.stride == (4, 4) and score.centres(0, 2) == [3.5, 7.5]
    assert outputs["output"].centres(0, 2) == [0.0, 1.0]
