"""Strategy "fragments" (passes/fragments.py): the original ops run once per phase.

Tiny graphs from ONNX text (tests/_graphs.py) and the U-Net/FPN sample of
samples/zoo_context.py, checked in onnxruntime with optimisations off:

* the subgrid (phase 0) is the original, always, at the analysis size and at others;
* where every removed stride divides the map, the fragments output equals the dilated one
  at every position, borders included; where it does not, they differ only at positions
  whose receptive field passes the end of the image (the documented border behaviour);
* verify (with --phases) passes, leaving out both borders ("interior");
* global context, InstanceNorm and upsampling, refused by dilation, are exact here;
* what is still out of reach is refused with the node named.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_dense
from onnx_dense import metadata
from tests._graphs import feeds_for, graph, info, nodes, rewrite, run

CHAIN = """
  [c1] h1 = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)
  r1 = Relu (h1)
  [c2] h2 = Conv <strides=[2,2], pads=[1,1,1,1]> (r1, w2)
  r2 = Relu (h2)
  [c3] y = Conv <pads=[1,1,1,1]> (r2, w3)
"""


def chain(size: int, batch: int = 1) -> onnx.ModelProto:
    return graph(f"float[{batch},2,{size},{size}] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[4,4,3,3] w3", CHAIN)


def both(m: onnx.ModelProto, stride, feeds=None, **kwargs):
    """Outputs of the dilated and the fragments model (dicts), the fragments model."""
    feeds = feeds or feeds_for(m)
    d = rewrite(m, stride, **kwargs)
    f = rewrite(m, stride, strategy="fragments", **kwargs)
    return run(d, feeds), run(f, feeds), f, feeds


def sample(y: np.ndarray, est) -> np.ndarray:
    return y[(slice(None), slice(None)) + tuple(slice(0, None, e) for e in est)]


def verified(original, dense, **kwargs):
    report = onnx_dense.verify(original, dense, **kwargs)
    assert report, report.text()
    return report


def splits(m: onnx.ModelProto) -> list:
    """The space-to-batch points of a fragments model (one per split removal node)."""
    return [n for n in m.graph.node if n.name.endswith("_phases")]


def phase_checks(report) -> list:
    return [c for c in report.comparisons if c.check.startswith("phase ")]


# ============================================================================ the lowering


def test_dividing_size_equals_dilation_everywhere():
    """16 -> 8 -> 4 with 3x3/2 pad 1: every phase of every level has as many windows as
    phase 0, so the two lowerings agree at every position, borders included."""
    m = chain(16)
    d, f, dense, feeds = both(m, 1)
    assert d["y"].shape == f["y"].shape == (1, 4, 16, 16)
    np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())
    np.testing.assert_array_equal(sample(f["y"], (4, 4)), run(m, feeds)["y"])
    out = info(dense).outputs["y"]
    assert info(dense).strategy == "fragments" and out.est == (4, 4) and out.off_grid == "interior"
    # space-to-batch of each removal node's output: c1, c2 run at stride 1, then their phases
    # move to the batch (after the Relu, which stays fused to its Conv in ORT)
    assert len(splits(dense)) == 2 and not nodes(dense, "Pad")
    c1 = next(n for n in dense.graph.node if n.name == "c1")
    assert list(next(a for a in c1.attribute if a.name == "strides").ints) == [1, 1]
    relu = next(n for n in dense.graph.node if n.op_type == "Relu")
    assert [n for n in dense.graph.node if relu.output[0] in n.input][0].op_type in ("Shape", "Slice")
    report = verified(m, dense, phases=True)
    assert len(phase_checks(report)) == 15 and all(c.compared for c in phase_checks(report))


def test_non_dividing_size_differs_only_at_the_end_border():
    """15 -> 8 -> 4: phase 1 of c1 has 7 windows, one fewer than phase 0. The fragments
    model zero-extends the map so that every phase has 8; phase 0 stays the original, the
    others differ from the dilated model only where the receptive field (15 pixels, starting
    7 before the position's window) passes the end of the image."""
    m = chain(15)
    d, f, dense, feeds = both(m, 1)
    assert f["y"].shape == (1, 4, 16, 16) and d["y"].shape == (1, 4, 15, 15)
    np.testing.assert_array_equal(sample(f["y"], (4, 4)), run(m, feeds)["y"])
    out = info(dense).outputs["y"]
    diff = np.abs(f["y"][..., :15, :15] - d["y"]).max(axis=(0, 1))
    # dense position j sees input pixels j - 7 .. j + 7: inside the image up to j = 7
    inside = 15 - (out.rf_start[0] + out.rf_size[0])  # last j whose field ends inside
    assert diff[: inside + 1, : inside + 1].max() <= 1e-5 * np.abs(d["y"]).max()
    assert diff.max() > 1e-3  # the border does differ: the test would notice a wrong claim
    report = verified(m, dense, phases=True)
    assert all(c.compared for c in phase_checks(report))


@pytest.mark.parametrize("size", [12, 19, 24])
def test_subgrid_is_the_original_at_other_sizes(size):
    m = chain(16)
    dense = rewrite(m, 1, strategy="fragments")
    x = np.random.default_rng(size).standard_normal((1, 2, size, size)).astype(np.float32)
    other = chain(size)
    for i in other.graph.initializer:  # same weights
        i.CopyFrom(next(j for j in m.graph.initializer if j.name == i.name))
    np.testing.assert_array_equal(sample(run(dense, {"x": x})["y"], (4, 4)), run(other, {"x": x})["y"])


def test_batch_of_two():
    """Phases sit next to the batch (phase-major): every image keeps its own phases."""
    m = chain(16, batch=2)
    d, f, dense, feeds = both(m, 2)
    np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())


def test_kept_part_of_a_stride_shifts_by_it():
    """R=2 on a stride-4 conv keeps 2 and removes 2: phase a reads the map shifted by 2a."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,5,5] w1, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[4,4], pads=[2,2,2,2]> (x, w1)\nr = Relu (h)\n[c2] y = Conv <pads=[1,1,1,1]> (r, w2)",
    )
    d, f, dense, _ = both(m, 2)
    assert info(dense).outputs["y"].est == (2, 2) and info(dense).outputs["y"].stride == (2, 2)
    np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())
    verified(m, dense, phases=True)


def test_maxpool_pads_with_the_lowest_value():
    """A removed MaxPool's pads (and the phases' extension) are ignored, not zeros (all-negative
    input): in its own pads when it runs at the kept stride, a -inf-like Pad value under
    ceil_mode (below)."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1",
        "[c1] h = Conv <pads=[1,1,1,1]> (x, w1)\n[mp] p = MaxPool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]> (h)"
        "\n[mp2] y = MaxPool <kernel_shape=[2,2], strides=[2,2]> (p)",
    )
    feeds = {"x": -np.abs(feeds_for(m)["x"]) - 5}
    for w in m.graph.initializer:
        w.CopyFrom(onnx.numpy_helper.from_array(np.abs(onnx.numpy_helper.to_array(w)), w.name))
    d, f, dense, _ = both(m, 1, feeds=feeds)
    np.testing.assert_array_equal(sample(f["y"], (4, 4)), run(m, feeds)["y"])
    mp = next(n for n in dense.graph.node if n.name == "mp")
    assert list(next(a for a in mp.attribute if a.name == "pads").ints) == [1, 1, 2, 2]
    verified(m, dense, inputs=feeds, phases=True)


def test_ceil_mode_pool_splits_its_input():
    """ceil_mode clips each phase's partial last window at that phase's own end, which one run
    at the kept stride cannot: that pool takes shifted copies of its input (Pad with a
    -inf-like value, Slices, Concat); phase 0 is still the original."""
    m = graph(
        "float[1,2,15,15] x, float[3,2,3,3] w1",
        "[c1] h = Conv <pads=[1,1,1,1]> (x, w1)\n"
        "[mp] p = MaxPool <kernel_shape=[3,3], strides=[2,2], ceil_mode=1> (h)\n"
        "[mp2] y = MaxPool <kernel_shape=[2,2], strides=[2,2], ceil_mode=1> (p)",
    )
    feeds = {"x": -np.abs(feeds_for(m)["x"]) - 5}
    dense = rewrite(m, 1, strategy="fragments")
    np.testing.assert_array_equal(sample(run(dense, feeds)["y"], (4, 4)), run(m, feeds)["y"])
    pads = nodes(dense, "Pad")
    assert pads and len(splits(dense)) == 2  # (mp may lose ceil_mode where its windows divide)
    value = next(n for n in dense.graph.node if n.output[0] == pads[0].input[2])
    assert onnx.numpy_helper.to_array(value.attribute[0].t) < -1e38
    verified(m, dense, inputs=feeds)


@pytest.mark.parametrize("pool", [
    "MaxPool <kernel_shape=[5,5], dilations=[2,2], strides=[2,2], pads=[0,4,0,4], ceil_mode=1>",
    "AveragePool <kernel_shape=[3,3], dilations=[2,2], strides=[2,2], pads=[0,2,0,2], ceil_mode=1, count_include_pad=0>",
])
def test_a_kept_pool_whose_ceil_pads_reach_its_kernel_reads_them_from_a_pad(pool):
    """ceil_mode's extra end pad takes a kept pool's pads to its kernel size, which onnxruntime
    refuses ("Pad should be smaller than kernel"): they move to a Pad node (found by the random
    chains of tests/test_fragment_batches.py)."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,1,1] w1",
        f"[p1] p = {pool} (x)\n[c1] h = Conv (p, w1)\n[p2] y = MaxPool <kernel_shape=[1,1], strides=[2,2], ceil_mode=1> (h)",
    )
    feeds = {"x": -np.abs(feeds_for(m)["x"]) - 5}
    dense = rewrite(m, 2, strategy="fragments")
    for node in dense.graph.node:
        attrs = {a.name: list(a.ints) for a in node.attribute}
        if node.op_type.endswith("Pool") and attrs.get("pads"):
            assert all(p < k for p, k in zip(attrs["pads"], attrs["kernel_shape"] * 2)), node.name
    np.testing.assert_allclose(sample(run(dense, feeds)["y"], (2, 2)), run(m, feeds)["y"], rtol=1e-5, atol=1e-6)
    verified(m, dense, inputs=feeds)


def test_an_uncounted_average_pool_at_a_removed_stride_can_be_an_output():
    """Its division by the pooled mask takes over the graph output, which the batch-to-space
    must then read (the rewrite raised StopIteration: found by random chains)."""
    m = graph("float[1,1,17] x", "[ap] t = AveragePool <kernel_shape=[2], strides=[2], ceil_mode=1> (x)\n"
              "[mp] y = MaxPool <kernel_shape=[1]> (t)", outputs="float t, float y")
    feeds = feeds_for(m)
    dense = rewrite(m, 1, strategy="fragments")
    got, want = run(dense, feeds), run(m, feeds)
    for name in ("t", "y"):
        np.testing.assert_allclose(sample(got[name], (2,)), want[name], rtol=1e-6, atol=1e-7)
    verified(m, dense, inputs=feeds)


def test_average_pool_that_does_not_count_pads():
    """count_include_pad=0 with pads at a removed stride: divided by the pooled mask."""
    m = graph(
        "float[1,2,15,15] x, float[3,2,3,3] w1, float[3,3,3,3] w2",
        "[c1] h = Conv <pads=[1,1,1,1]> (x, w1)\n"
        "[ap] p = AveragePool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1], count_include_pad=0> (h)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (p, w2)",
    )
    d, f, dense, feeds = both(m, 1)
    np.testing.assert_allclose(sample(f["y"], (2, 2)), run(m, feeds)["y"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(f["y"][..., :12, :12], d["y"][..., :12, :12], rtol=0, atol=1e-5)
    verified(m, dense, phases=True)


def test_classifier_head_gives_one_prediction_per_phase():
    """GAP + Flatten + Gemm: (N, K) per phase -> (N, K, e, e), the dilated head's layout."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[5,4] wf, float[5] bf",
        CHAIN.replace("[c3] y = Conv <pads=[1,1,1,1]> (r2, w3)", "")
        + "  g = GlobalAveragePool (r2)\n  fl = Flatten (g)\n  [fc] y = Gemm <transB=1> (fl, wf, bf)",
    )
    d, f, dense, feeds = both(m, 1)
    assert f["y"].shape == d["y"].shape == (1, 5, 4, 4)
    np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())
    np.testing.assert_allclose(f["y"][:, :, 0, 0], run(m, feeds)["y"], rtol=0, atol=1e-6)
    verified(m, dense, phases=True)


def test_classifier_head_at_the_models_own_stride():
    """Nothing split (eST 1): the head's output still gets the spatial axes the metadata declares,
    (N, K) -> (N, K, 1, 1) as dilate gives; verify --phases used to fail with an IndexError."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[5,4] wf, float[5] bf",
        CHAIN.replace("[c3] y = Conv <pads=[1,1,1,1]> (r2, w3)", "")
        + "  g = GlobalAveragePool (r2)\n  fl = Flatten (g)\n  [fc] y = Gemm <transB=1> (fl, wf, bf)",
    )
    d, f, dense, feeds = both(m, 4)
    assert f["y"].shape == d["y"].shape == (1, 5, 1, 1)
    np.testing.assert_allclose(f["y"][:, :, 0, 0], run(m, feeds)["y"], rtol=0, atol=1e-6)
    verified(m, dense, phases=True)


def test_reshape_with_a_baked_batch():
    """dynamo's Reshape(x, [1, C*H*W]) takes the batch from the running tensor."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[5,64] wf",
        CHAIN.replace("[c3] y = Conv <pads=[1,1,1,1]> (r2, w3)", "")
        + "  sh = Constant <value = int64[2] {1, 64}> ()\n  [rs] fl = Reshape (r2, sh)\n  [fc] y = Gemm <transB=1> (fl, wf)",
    )
    d, f, dense, feeds = both(m, 1)
    assert f["y"].shape == (1, 5, 4, 4)
    np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())


def test_a_reshape_that_bakes_the_maps_size_fails_loudly_at_another_size(tmp_path):
    """dynamo's GroupNorm: Reshape to [1, G, -1], normalise, Reshape back to [1, C, H, W] with
    H and W of the export. Its baked batch is taken from the running tensor by copying its axis
    0, not by -1: at another size -1 took the extra positions into the batch and the model
    returned a wrong output, (3, 5, 64, 64) for a 96x128 FPN; now the size mismatch fails in
    onnxruntime, as the original does."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[4,4,3,3] w3",
        """
  [c1] h1 = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)
  r1 = Relu (h1)
  [c2] h2 = Conv <strides=[2,2], pads=[1,1,1,1]> (r1, w2)
  g = Constant <value = int64[3] {0, 2, -1}> ()
  [flat] f = Reshape (h2, g)
  one = Constant <value = float[2] {1.0, 1.0}> ()
  zero = Constant <value = float[2] {0.0, 0.0}> ()
  n = InstanceNormalization (f, one, zero)
  back = Constant <value = int64[4] {1, 4, 4, 4}> ()
  [unflat] u = Reshape (n, back)
  [c3] y = Conv <pads=[1,1,1,1]> (u, w3)""",
    )
    dense = rewrite(m, 1, strategy="fragments")
    x = np.random.default_rng(3).standard_normal((1, 2, 16, 16)).astype(np.float32)
    assert run(dense, {"x": x})["y"].shape == (1, 4, 16, 16)
    verified(m, dense)
    with pytest.raises(Exception, match="Reshape"):
        run(dense, {"x": np.zeros((1, 2, 24, 32), np.float32)})
    # the rewrite's summary names the baked size, and so does a run at another size
    notes = onnx_dense.rewrite_model(m, output_stride=1, strategy="fragments").meta.get("onnx_dense.size_notes", [])
    assert any("Reshape 'unflat'" in n and "1x4x4x4" in n for n in notes), notes
    from onnx_dense.runtime.dense_session import DenseSession

    path = tmp_path / "dense.onnx"
    path.write_bytes(dense.SerializeToString())
    with pytest.raises(onnx_dense.DenseError, match=r"runs only at 16x16: Reshape 'unflat'"):
        DenseSession(path, provider="cpu").run(np.zeros((1, 2, 24, 32), np.float32))


# ============================================================================ global context, normalisation


SE = """
  [c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)
  [gap] g = GlobalAveragePool (h)
  [fc1] f1 = Conv (g, wa)
  r = Relu (f1)
  [fc2] f2 = Conv (r, wb)
  s = HardSigmoid (f2)
  [se_mul] m = Mul (h, s)
  [c2] y = Conv <pads=[1,1,1,1]> (m, w2)
"""
SE_SIG = "float[1,2,{0},{0}] x, float[4,2,3,3] w1, float[2,4,1,1] wa, float[4,2,1,1] wb, float[3,4,3,3] w2"


@pytest.mark.parametrize("size", [16, 15])
def test_squeeze_excitation(size):
    m = graph(SE_SIG.format(size), SE)
    dense = rewrite(m, 1, strategy="fragments")
    feeds = feeds_for(m)
    np.testing.assert_array_equal(sample(run(dense, feeds)["y"], (2, 2)), run(m, feeds)["y"])
    out = info(dense).outputs["y"]
    assert out.off_grid == "global"
    report = verified(m, dense, phases=True)
    assert any("global context" in c.note for c in report.comparisons if c.check == "phases")


def test_instance_norm_is_exact_per_phase():
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[3] sc, float[3] bi, float[4,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n[inorm] n = InstanceNormalization (h, sc, bi)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (n, w2)",
    )
    with pytest.raises(onnx_dense.DenseError, match="--strategy fragments"):
        rewrite(m, 1)
    dense = rewrite(m, 1, strategy="fragments")
    feeds = feeds_for(m)
    np.testing.assert_allclose(sample(run(dense, feeds)["y"], (2, 2)), run(m, feeds)["y"], rtol=0, atol=1e-5)
    verified(m, dense, phases=True)


# ============================================================================ upsampling


UPNET = """
  [c1] e1 = Conv <pads=[1,1,1,1]> (x, w1)
  [p1] q1 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (e1)
  [c2] e2 = Conv <pads=[1,1,1,1]> (q1, w2)
  [p2] q2 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (e2)
  [c3] e3 = Conv <pads=[1,1,1,1]> (q2, w3)
  sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
  [up] u = Resize <mode="nearest"> (e3, , sc)
  cat = Concat <axis=1> (u, e2)
  [c4] y = Conv <pads=[1,1,1,1]> (cat, w4)
"""
UPNET_SIG = "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[4,4,3,3] w3, float[3,8,3,3] w4"


def test_upsampling_collapses_the_levels_it_makes_whole_steps():
    """Output at stride 2, bottleneck at stride 4, R=1: p1 splits 2x2 phases (1 pixel apart),
    p2 another 2x2 (2 pixels apart) that the x2 upsampling turns into whole steps of the
    stride-2 map; no output keeps them, so p2 is not split at all (it runs as the original,
    once per phase of p1)."""
    m = graph(UPNET_SIG, UPNET)
    with pytest.raises(onnx_dense.DenseError, match="'up' \\(Resize\\).*--strategy fragments"):
        rewrite(m, 1)
    dense = rewrite(m, 1, strategy="fragments")
    feeds = feeds_for(m)
    y = run(dense, feeds)["y"]
    assert y.shape == (1, 3, 16, 16) and info(dense).outputs["y"].est == (2, 2)
    np.testing.assert_array_equal(sample(y, (2, 2)), run(m, feeds)["y"])
    assert len(splits(dense)) == 1  # one split (p1); p2 keeps its stride per phase
    report = verified(m, dense, phases=True)
    assert all(c.compared for c in phase_checks(report))


def test_upsampling_with_two_outputs_keeps_the_level_one_of_them_needs():
    """With e3 also an output (stride 4, eST 4 at R=1), p2's level is needed: it is split and
    the Resize reads only its phase 0 (a batch slice before the upsampling)."""
    m = graph(UPNET_SIG, UPNET, outputs="float y, float e3")
    dense = rewrite(m, 1, strategy="fragments")
    feeds = feeds_for(m)
    got, ref = run(dense, feeds), run(m, feeds)
    assert info(dense).outputs["e3"].est == (4, 4) and info(dense).outputs["y"].est == (2, 2)
    np.testing.assert_array_equal(sample(got["y"], (2, 2)), ref["y"])
    np.testing.assert_array_equal(sample(got["e3"], (4, 4)), ref["e3"])
    assert len(splits(dense)) == 2
    verified(m, dense, phases=True)


def test_uneven_upsampling_is_refused():
    """A stride 4 removed at once (4x4 phases, 1 pixel apart) upsampled x2: phases a and a+2
    coincide, a and a+1 do not: no layout of whole levels, refused. (The upsampled map joins a
    stride-2 branch, so it is not a final upsampling, which would be rebuilt instead.)"""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[3,3,3,3] w2, float[3,2,3,3] w0",
        "[c1] h = Conv <strides=[4,4], pads=[1,1,1,1]> (x, w1)\n"
        'sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()\n[up] u = Resize <mode="nearest"> (h, , sc)\n'
        "[c0] k = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w0)\nj = Add (u, k)\n"
        "[c2] y = Conv <pads=[1,1,1,1]> (j, w2)",
    )
    with pytest.raises(onnx_dense.DenseError, match="'up' \\(Resize\\).*unevenly"):
        rewrite(m, 1, strategy="fragments")


# The Resize reads its sizes at run time: batch and channels from Shape(e3) (tf2onnx's
# UpSampling2D), or a baked batch 1 (keras-deeplab's image pooling) with the map from Shape.
UPNET_SIZES_FROM_SHAPE = UPNET.replace(
    "[up] u = Resize <mode=\"nearest\"> (e3, , sc)",
    """s = Shape (e3)
  lo = Constant <value = int64[1] {0}> ()
  mid = Constant <value = int64[1] {2}> ()
  hi = Constant <value = int64[1] {4}> ()
  nc = Slice (s, lo, mid)
  hw = Slice (s, mid, hi)
  two = Constant <value = int64[1] {2}> ()
  hw2 = Mul (hw, two)
  sz = Concat <axis=0> (nc, hw2)
  [up] u = Resize <mode="nearest"> (e3, , , sz)""",
)
UPNET_SIZES_BAKED_BATCH = UPNET_SIZES_FROM_SHAPE.replace(
    "nc = Slice (s, lo, mid)", "nc = Constant <value = int64[2] {1, 4}> ()"
)


@pytest.mark.parametrize("body", [UPNET_SIZES_FROM_SHAPE, UPNET_SIZES_BAKED_BATCH], ids=["from_shape", "baked"])
@pytest.mark.parametrize("outputs", ["float y", "float y, float e3"])
def test_upsampling_sizes_computed_at_run_time_follow_the_batch(body, outputs):
    """Regression (tf_yolo_tiny's neck): the Resize's sizes were read from Shape of its input
    *before* the batch slice of the collapse (or baked batch 1), so the Resize resized the
    batch axis too and the Concat with the skip met another number of phases (ORT: "Axis 0
    has mismatched dimensions"). The batch entry of computed sizes now comes from the tensor
    the Resize runs on."""
    m = graph(UPNET_SIG, body, outputs=outputs)
    dense = rewrite(m, 1, strategy="fragments")
    feeds = feeds_for(m)
    got, ref = run(dense, feeds), run(m, feeds)
    np.testing.assert_array_equal(sample(got["y"], (2, 2)), ref["y"])
    verified(m, dense, phases=True)


def test_reshape_to_a_shape_read_from_other_phases_is_refused():
    """Operands of one node carry the same levels *and* the same batch: a Reshape target read
    from a tensor of other levels (its batch is another number of phases) is refused."""
    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[3,3,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "[c2] k = Conv <strides=[2,2], pads=[1,1,1,1]> (h, w2)\n"
        "[gp] g = GlobalAveragePool (h)\n"
        "s = Shape (k)\n"
        "lo = Constant <value = int64[1] {0}> ()\n"
        "one = Constant <value = int64[1] {1}> ()\n"
        "rest = Constant <value = int64[1] {-1}> ()\n"
        "n = Slice (s, lo, one)\n"
        "t = Concat <axis=0> (n, rest)\n"
        "[rs] y = Reshape (g, t)",
        outputs="float y, float k",
    )
    with pytest.raises(onnx_dense.DenseError, match="'rs' \\(Reshape\\).*'t'.*2x2 then 2x2.*batch"):
        rewrite(m, 1, strategy="fragments")
    rewrite(m, 1, strategy="auto")  # dilation needs no batch of phases


def test_tf_yolo_tiny_every_output_stride(tmp_path):
    """The detector neck (UpSampling2D whose sizes come from Shape, Concat with the stride-16
    route): every output stride fragments reports rewrites and verifies."""
    from onnx_dense.api import output_strides
    from samples import foreign

    src = tmp_path / "yolo.onnx"
    onnx.save(foreign.build("tf_yolo_tiny"), str(src))
    strides = output_strides(str(src), strategy="fragments")
    assert strides
    for r in strides:
        dst = tmp_path / f"yolo_{r[0]}.onnx"
        onnx_dense.rewrite(src, dst, output_stride=r, strategy="fragments")
        verified(src, dst)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_tf_segmenter_image_pooling(stride, tmp_path):
    """keras-deeplab's image pooling: Resize to Concat([1, C], Shape(feature)[2:4]), a baked
    batch 1 that would shrink the batch of phases to one."""
    from samples import foreign

    src = tmp_path / "seg.onnx"
    onnx.save(foreign.build("tf_segmenter", image_pooling=True), str(src))
    dst = tmp_path / "dense.onnx"
    onnx_dense.rewrite(src, dst, output_stride=stride, strategy="fragments", input_shapes={"input_1": (1, 64, 64, 3)})
    verified(src, dst)


@functools.cache
def _unet(mode: str) -> bytes:
    import tempfile
    from pathlib import Path

    from samples import zoo_context

    model = zoo_context.build("unet" if mode == "nearest" else "unet_bilinear")
    with tempfile.TemporaryDirectory() as tmp:
        path = zoo_context.export(model, Path(tmp) / "unet.onnx")
        return path.read_bytes()


@pytest.mark.parametrize("mode, stride", [("nearest", 1), ("nearest", 2), ("bilinear", 1)])
def test_unet_fpn(mode, stride, tmp_path):
    """The U-Net/FPN sample (outputs p2 at stride 2, p4 at stride 4): exact on the subgrid and,
    away from the borders, at every off-grid phase."""
    src = tmp_path / "unet.onnx"
    src.write_bytes(_unet(mode))
    dst = tmp_path / "dense.onnx"
    with pytest.raises(onnx_dense.DenseError, match="--strategy fragments"):
        onnx_dense.rewrite(src, dst, output_stride=stride, strategy="dilate")
    onnx_dense.rewrite(src, dst, output_stride=stride, strategy="auto")
    meta = metadata.read(onnx.load(str(dst)))
    assert meta.strategy == "fragments"
    assert meta.outputs["p2"].est == (2 // stride,) * 2 and meta.outputs["p4"].est == (4 // stride,) * 2
    report = verified(src, dst, phases=True, max_phases=6)
    assert any(c.compared for c in phase_checks(report))
    # the stride-8 pool is never split: its level is collapsed by the upsampling on every path
    # (R=1 splits the pools to strides 2 and 4, R=2 only the one to stride 4)
    assert len(splits(onnx.load(str(dst)))) == (2 if stride == 1 else 1)



def _work_as_run(path, size: int) -> int:
    """FLOPs of the Conv, ConvTranspose and pooling nodes of ``path`` at the shapes onnxruntime
    actually runs them (every such output made a graph output), counted as inspect counts them."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    counted = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "MaxPool", "AveragePool")]
    for n in counted:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    for n in counted:
        if n.op_type == "ConvTranspose":
            model.graph.output.append(onnx.helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    shapes = dict(zip(names, (v.shape for v in sess.run(None, {sess.get_inputs()[0].name: x}))))
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    total = 0
    for n in counted:
        out = shapes[n.output[0]]
        if n.op_type == "Conv":
            total += 2 * int(np.prod(weights[n.input[1]])) * out[0] * int(np.prod(out[2:]))
        elif n.op_type == "ConvTranspose":
            inp = shapes[n.input[0]]
            total += 2 * int(np.prod(weights[n.input[1]])) * inp[0] * int(np.prod(inp[2:]))
        else:
            kernel = next(a.ints for a in n.attribute if a.name == "kernel_shape")
            total += int(np.prod(out)) * int(np.prod(kernel))
    return total


@pytest.mark.parametrize("stride", [2, 1])
def test_inspect_counts_the_work_of_the_phases(stride, tmp_path):
    """Under fragments an upsampling collapses the phases of deeper levels, so the deep layers run
    on fewer phases than their eST: inspect's dense FLOPs are what the fragments model runs
    (to the few % of the split maps' end extension), not eST^2 times each layer."""
    src = tmp_path / "unet.onnx"
    src.write_bytes(_unet("nearest"))
    dst = tmp_path / "dense.onnx"
    onnx_dense.rewrite(src, dst, output_stride=stride, strategy="fragments")
    inspection = onnx_dense.inspect_model(str(src), output_stride=stride, strategy="fragments")
    size = onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[2].dim_value
    assert inspection.dense_flops == pytest.approx(_work_as_run(dst, size), rel=0.05)
    assert inspection.flops == _work_as_run(src, size)

# ============================================================================ out of reach


@pytest.mark.parametrize(
    "body, fragments",
    [
        ("[cat] y = Concat <axis=0> (h, h)", ["'cat' (Concat)", "batch axis"]),
        (
            "ax = Constant <value = int64[1] {0}> ()\n[rs] y = ReduceSum <keepdims=1> (h, ax)",
            ["'rs' (ReduceSum)", "batch axis"],
        ),
        ("[tr] y = Transpose <perm=[1,0,2,3]> (h)", ["'tr' (Transpose)", "batch axis"]),
    ],
)
def test_ops_on_the_batch_axis_are_refused(body, fragments):
    m = graph("float[1,2,16,16] x, float[3,2,3,3] w1", "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n" + body)
    with pytest.raises(onnx_dense.DenseError) as caught:
        rewrite(m, 1, strategy="fragments")
    for text in fragments:
        assert text in str(caught.value)


# ============================================================================ strategy auto, CLI


def test_auto_is_dilation_where_it_applies():
    m = chain(16)
    auto = rewrite(m, 1, strategy="auto")
    dilate = rewrite(m, 1)
    assert auto.SerializeToString() == dilate.SerializeToString()
    assert info(auto).strategy == "dilate"


def test_cli_default_is_auto_and_verify_passes(tmp_path):
    from onnx_dense.cli import cli

    src = tmp_path / "se.onnx"
    onnx.save(graph(SE_SIG.format(16), SE), str(src))
    runner = CliRunner()
    r = runner.invoke(cli, ["rewrite", str(src), str(tmp_path / "d.onnx"), "-r", "1"])
    assert r.exit_code == 0, r.output
    assert "strategy fragments" in r.output
    r = runner.invoke(cli, ["verify", str(src), str(tmp_path / "d.onnx"), "--phases"])
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    r = runner.invoke(cli, ["rewrite", str(src), str(tmp_path / "e.onnx"), "-r", "1", "--strategy", "dilate"])
    assert r.exit_code == 2 and "--strategy fragments" in r.stderr and "'se_mul' (Mul)" in r.stderr
    r = runner.invoke(cli, ["rewrite", str(src), str(tmp_path / "t.onnx"), "-r", "1", "--tune"])
    assert r.exit_code == 0 and "tuned on cpu" in r.output, r.output
    meta = metadata.read(onnx.load(str(tmp_path / "t.onnx")))
    assert set(meta.tuning["median_ms"]) == {"dilate+per-phase-global", "fragments"}
    assert meta.tuning["chosen"] in meta.tuning["median_ms"] and "dilate" in meta.tuning["refused"]
    r = runner.invoke(cli, ["verify", str(src), str(tmp_path / "t.onnx")])
    assert r.exit_code == 0, r.output


# ============================================================================ where the phases move to the batch


def test_space_to_batch_goes_after_the_pointwise_chain_where_it_is_narrowest():
    """Conv 3x3/2 -> BatchNormalization -> Relu -> 1x1 Conv (8 -> 2 channels) -> Add of a
    per-channel constant: every one acts position by position, so the phases move to the batch
    after the last of them, on the 2-channel tensor; values as dilation's everywhere."""
    m = graph(
        "float[1,2,16,16] x, float[8,2,3,3] w1, float[8] s, float[8] b, float[8] mu, float[8] var, "
        "float[2,8,1,1] w2, float[1,2,1,1] c, float[3,2,3,3] w3",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n"
        "bn = BatchNormalization (h, s, b, mu, var)\nr = Relu (bn)\n"
        "[narrow] k = Conv (r, w2)\na = Add (k, c)\n[c3] y = Conv <pads=[1,1,1,1]> (a, w3)",
    )
    for w in m.graph.initializer:
        if w.name == "var":
            w.CopyFrom(onnx.numpy_helper.from_array(np.abs(onnx.numpy_helper.to_array(w)) + 0.5, w.name))
    d, f, dense, feeds = both(m, 1)
    np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())
    np.testing.assert_allclose(sample(f["y"], (2, 2)), run(m, feeds)["y"], rtol=0, atol=1e-5)
    (split,) = splits(dense)
    shape = next(n for n in dense.graph.node if n.name == "c1_phases_shape")
    assert next(n for n in dense.graph.node if shape.input[0] in n.output).op_type == "Add"
    verified(m, dense, phases=True)


def test_a_used_intermediate_keeps_the_space_to_batch_before_it():
    """A value of the chain read twice (Relu feeding a 1x1 conv and the Add's other side) stops
    the move there: the phases go to the batch on the Relu's output."""
    m = graph(
        "float[1,2,16,16] x, float[2,2,3,3] w1, float[2,2,1,1] w2, float[3,2,3,3] w3",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\nr = Relu (h)\n"
        "k = Conv (r, w2)\na = Add (k, r)\n[c3] y = Conv <pads=[1,1,1,1]> (a, w3)",
    )
    d, f, dense, feeds = both(m, 1)
    np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())
    shape = next(n for n in dense.graph.node if n.name == "c1_phases_shape")
    assert next(n for n in dense.graph.node if shape.input[0] in n.output).op_type == "Relu"


@pytest.mark.parametrize("size", [16, 15])
def test_one_spatial_axis_and_unequal_factors(size):
    """Conv1d strides 2 then 2, and a 2-D conv removing (2, 1): the phases of each axis."""
    m1 = graph(
        f"float[1,2,{size}] x, float[3,2,3] w1, float[3,3,3] w2, float[2,3,3] w3",
        "[c1] h = Conv <strides=[2], pads=[1,1]> (x, w1)\n[c2] k = Conv <strides=[2], pads=[1,1]> (h, w2)\n"
        "[c3] y = Conv <pads=[1,1]> (k, w3)",
    )
    m2 = graph(
        f"float[1,2,{size},{size}] x, float[3,2,3,3] w1, float[2,3,3,3] w2",
        "[c1] h = Conv <strides=[2,1], pads=[1,1,1,1]> (x, w1)\n[c2] y = Conv <pads=[1,1,1,1]> (h, w2)",
    )
    for m, est in ((m1, (4,)), (m2, (2, 1))):
        d, f, dense, feeds = both(m, 1)
        assert info(dense).outputs["y"].est == est
        np.testing.assert_allclose(sample(f["y"], est), run(m, feeds)["y"], rtol=0, atol=1e-5)
        if size % 4 == 0:
            np.testing.assert_allclose(f["y"], d["y"], rtol=0, atol=1e-5 * np.abs(d["y"]).max())
        verified(m, dense, phases=True)


def test_a_run_past_the_size_its_classifier_head_reads_says_what_to_do(tmp_path):
    """fragments keeps the original's Flatten + Gemm, which reads the final map of one phase at
    the export size: one prediction per phase, not a head that slides. Where an input is so
    much larger that a phase's final map grows, onnxruntime fails in the Gemm; the error says
    why and names --strategy dilate, whose head slides."""
    from onnx_dense.runtime.dense_session import DenseSession

    m = graph(
        "float[1,2,16,16] x, float[3,2,3,3] w1, float[4,3,3,3] w2, float[5,64] wf",
        CHAIN.replace("[c3] y = Conv <pads=[1,1,1,1]> (r2, w3)", "")
        + "  sh = Constant <value = int64[2] {1, 64}> ()\n  [rs] fl = Reshape (r2, sh)\n  [fc] y = Gemm <transB=1> (fl, wf)",
    )
    path = tmp_path / "dense.onnx"
    path.write_bytes(rewrite(m, 1, strategy="fragments").SerializeToString())
    session = DenseSession(path, provider="cpu")
    assert session.run(np.zeros((1, 2, 16, 16), np.float32))["y"].numpy().shape == (1, 5, 4, 4)
    with pytest.raises(onnx_dense.DenseError) as raised:
        session.run(np.zeros((1, 2, 40, 40), np.float32))
    message = str(raised.value)
    assert "classifier head" in message and "16x16" in message and "--strategy dilate" in message, message
    dilated = tmp_path / "dilated.onnx"
    dilated.write_bytes(rewrite(m, 1, strategy="dilate").SerializeToString())
    assert DenseSession(dilated, provider="cpu").run(np.zeros((1, 2, 40, 40), np.float32))["y"].numpy().shape[2:] \
        == (28, 28)
