"""ceil_mode pooling at the end border: every phase of the dense model, whole.

Oracle: the original run on the input cropped at the top/left by the phase offset (the models
here have no begin padding, so the crop's new start border is no border at all). Every
position of the phase is compared, the end border included, and the phase must have the
original's length, at odd and even sizes (the last window partial or not).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import onnx_dense
from tests._graphs import graph, rewrite, run

W = "float[8,3,3,3] w1, float[8,8,1,1] w2, float[8,8,3,3] w3"

BODIES = {
    # SqueezeNet / GoogLeNet: MaxPool 3x3/2 ceil_mode
    "maxpool": """
        c1 = Conv <strides = [2,2]> (x, w1)
        r1 = Relu (c1)
        p1 = MaxPool <kernel_shape = [3,3], strides = [2,2], ceil_mode = 1> (r1)
        y = Conv (p1, w2)
    """,
    # ResNet-D shortcut: AvgPool 2x2/2 ceil_mode, count_include_pad=0
    "avgpool": """
        c1 = Conv <strides = [2,2]> (x, w1)
        p1 = AveragePool <kernel_shape = [2,2], strides = [2,2], ceil_mode = 1, count_include_pad = 0> (c1)
        y = Conv (p1, w2)
    """,
    # a ceil_mode AvgPool with pads: the pads count, the partial window's overhang does not
    "avgpool_counted": """
        c1 = Conv <strides = [2,2]> (x, w1)
        p1 = AveragePool <kernel_shape = [3,3], strides = [2,2], pads = [0,0,1,1], ceil_mode = 1, count_include_pad = 1> (c1)
        y = Conv (p1, w2)
    """,
    # a padded 3x3 conv after the pool reads the end border's last positions
    "maxpool_conv": """
        c1 = Conv <strides = [2,2]> (x, w1)
        p1 = MaxPool <kernel_shape = [3,3], strides = [2,2], ceil_mode = 1> (c1)
        y = Conv <pads = [1,1,1,1]> (p1, w3)
    """,
    "avgpool_conv": """
        c1 = Conv <strides = [2,2]> (x, w1)
        p1 = AveragePool <kernel_shape = [2,2], strides = [2,2], ceil_mode = 1, count_include_pad = 0> (c1)
        y = Conv <pads = [1,1,1,1]> (p1, w3)
    """,
    # dense pads below the kernel: a dilated AveragePool (opset >= 19), count_include_pad=0 in ORT
    "avgpool_k5": """
        c1 = Conv <strides = [2,2]> (x, w1)
        p1 = AveragePool <kernel_shape = [5,5], strides = [2,2], ceil_mode = 1, count_include_pad = 0> (c1)
        y = Conv <pads = [1,1,1,1]> (p1, w3)
    """,
    # GoogLeNet-like: two ceil_mode MaxPools in a row
    "two_maxpools": """
        c1 = Conv <strides = [2,2]> (x, w1)
        p1 = MaxPool <kernel_shape = [3,3], strides = [2,2], ceil_mode = 1> (c1)
        p2 = MaxPool <kernel_shape = [3,3], strides = [2,2], ceil_mode = 1> (p1)
        y = Conv (p2, w2)
    """,
}


def model(body: str, h: int, w: int):
    return graph(f"float[1,3,{h},{w}] x, {W}", body, seed=3)


def est_and_step(name):
    return (8, 1) if name == "two_maxpools" else (4, 1)


@pytest.mark.parametrize("name", sorted(BODIES))
@pytest.mark.parametrize("size", [(23, 24), (26, 29), (31, 30)])
def test_every_phase_is_the_shifted_original_to_the_last_position(name, size):
    h, w = size
    body = BODIES[name]
    stride, _ = est_and_step(name)
    dense = rewrite(model(body, h, w), 1)
    x = np.random.default_rng(1).standard_normal((1, 3, h, w)).astype(np.float32)
    got = run(dense, {"x": x})["y"]
    # the dense grid's pixel stride is 1 here (every removed stride is the whole output stride)
    worst = 0.0
    for a, b in itertools.product(range(stride), repeat=2):
        crop = x[:, :, a:, b:]
        want = run(model(body, *crop.shape[2:]), {"x": np.ascontiguousarray(crop)})["y"]
        phase = got[:, :, a::stride, b::stride]
        assert phase.shape == want.shape, f"phase {a},{b}: {phase.shape} != original {want.shape}"
        worst = max(worst, float(np.max(np.abs(phase - want))))
        assert np.allclose(phase, want, rtol=1e-5, atol=1e-5), f"phase {a},{b}: max abs {np.max(np.abs(phase - want)):.3e}"


def _drop_last_row(dense):
    """The dense model with its output's last row cut off (metadata kept): a one-position-short phase."""
    import onnx
    import onnx.helper

    copy = onnx.ModelProto()
    copy.CopyFrom(dense)
    g = copy.graph
    out = g.output[0].name
    for n in g.node:
        for i, o in enumerate(n.output):
            if o == out:
                n.output[i] = out + "_full"
    g.initializer.extend([
        onnx.numpy_helper.from_array(np.array([0], np.int64), "cut_start"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "cut_end"),
        onnx.numpy_helper.from_array(np.array([2], np.int64), "cut_axis"),
    ])
    g.node.append(onnx.helper.make_node("Slice", [out + "_full", "cut_start", "cut_end", "cut_axis"], [out]))
    del g.output[0].type.tensor_type.shape.dim[:]
    return copy


def test_verify_phases_fails_a_phase_one_position_short():
    import onnx_dense

    # 24 -> conv 3/2 -> 11 fine positions: 21 -> pool k3 (ceil) dense -> 21 - 8 + 4*... ; cut one row
    original = model(BODIES["maxpool_conv"], 24, 24)
    dense = rewrite(original, 1)
    short = _drop_last_row(dense)
    x = np.random.default_rng(2).standard_normal((1, 3, 24, 24)).astype(np.float32)
    full_rows = run(dense, {"x": x})["y"].shape[2]
    assert (full_rows - 1) % 4 != 0, "the cut row must not be one of phase 0's"
    assert onnx_dense.verify(original, dense, inputs={"x": x}, phases=True)
    report = onnx_dense.verify(original, short, inputs={"x": x}, phases=True)
    assert not report, report.text()
    assert "positions" in report.text()


@pytest.mark.parametrize("name", ["avgpool_conv", "two_maxpools"])
def test_verify_phases_compares_partial_windows_with_random_inputs(name):
    import onnx_dense

    original = model(BODIES[name], 24, 24)
    dense = rewrite(original, 1)
    report = onnx_dense.verify(original, dense, phases=True)
    assert report, report.text()
    phase_lines = [c for c in report.comparisons if c.check.startswith("phase ")]
    assert phase_lines and not any(c.skipped for c in phase_lines), report.text()
    # the random input is odd-sized, so the shifted inputs end in partial windows
    assert all("whole phase" in c.note for c in phase_lines), report.text()


@pytest.mark.parametrize("name", sorted(BODIES))
def test_fragments_run_and_keep_the_subgrid(name):
    """Under fragments the pool runs at its kept stride with the split's extension added to its
    end pads; where that reaches the kernel (onnxruntime's pools refuse it: ResNet-D's 2x2
    AvgPool after its ceil_mode pad) the input is split instead. Phase 0 is the original."""
    h, w = 23, 24
    body = BODIES[name]
    stride, _ = est_and_step(name)
    original = model(body, h, w)
    dense = rewrite(original, 1, strategy="fragments")
    x = np.random.default_rng(2).standard_normal((1, 3, h, w)).astype(np.float32)
    got = run(dense, {"x": x})["y"]
    want = run(original, {"x": x})["y"]
    np.testing.assert_allclose(got[:, :, ::stride, ::stride], want, rtol=1e-5, atol=1e-5)
    assert onnx_dense.verify(original, dense)
