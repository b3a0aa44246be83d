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
