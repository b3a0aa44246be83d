"""Global context inside the dense region: squeeze-and-excitation under both strategies.

* ``--per-phase-global`` (strategy dilate, passes/phase_global.py): one dilated graph whose SE
  blocks average each phase's positions and scale each position by its own phase's result;
* ``--strategy fragments``: the original SE per phase.

Checked: the subgrid equals the original (the analysis size and others, both exporters of a
MobileNetV3-style net); where every removed stride divides the map the two lowerings agree
at every position (each computes "the original network whose first removed-stride node reads
a shifted map", independently); at other sizes each keeps its documented border behaviour;
the refusals left say what to use instead.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_dense
from onnx_dense import metadata
from tests._graphs import feeds_for, graph, info, nodes, rewrite, run

SE = """
  [c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)
  [gap] g = {pool}
  [fc1] f1 = Conv (g, wa)
  r = Relu (f1)
  [fc2] f2 = Conv (r, wb)
  s = HardSigmoid (f2)
  [se_mul] m = Mul (h, s)
  [c2] h2 = Conv <strides=[2,2], pads=[1,1,1,1]> (m, w2)
  [c3] y = Conv <pads=[1,1,1,1]> (h2, w3)
"""
SIG = "float[1,2,{0},{0}] x, float[4,2,3,3] w1, float[2,4,1,1] wa, float[4,2,1,1] wb, float[3,4,3,3] w2, float[3,3,3,3] w3"
POOLS = {
    "gap": "GlobalAveragePool (h)",
    "gmp": "GlobalMaxPool (h)",
    "reduce_mean": "ReduceMean <keepdims=1> (h, axes)\n  axes = Constant <value = int64[2] {2, 3}> ()",
}


def se(size: int, pool: str = "gap") -> onnx.ModelProto:
    body = SE.format(pool=POOLS[pool])
    if pool == "reduce_mean":  # the Constant must come first
        body = "  axes = Constant <value = int64[2] {2, 3}> ()\n" + body.replace(
            "\n  axes = Constant <value = int64[2] {2, 3}> ()", ""
        )
    return graph(SIG.format(size), body)


def sub(y, e):
    return y[:, :, ::e, ::e]


@pytest.mark.parametrize("pool", list(POOLS))
def test_per_phase_global_is_one_dilated_graph(pool):
    m = se(16, pool)
    with pytest.raises(onnx_dense.DenseError, match="'se_mul' \\(Mul\\).*global context.*--strategy fragments"):
        rewrite(m, 1)
    dense = rewrite(m, 1, per_phase_global=True)
    feeds = feeds_for(m)
    y = run(dense, feeds)["y"]
    np.testing.assert_allclose(sub(y, 4), run(m, feeds)["y"], rtol=0, atol=1e-5 * np.abs(y).max())
    meta = info(dense)
    assert meta.strategy == "dilate" and meta.per_phase_global and meta.outputs["y"].off_grid == "global"
    assert not nodes(dense, "GlobalAveragePool") and not nodes(dense, "GlobalMaxPool")
    assert nodes(dense, "Tile") and any(
        a.name == "dilations" and list(a.ints) == [2, 2] for n in nodes(dense, "Conv") if n.name == "c2" for a in n.attribute
    )
    # the same function as fragments, computed independently, at every position (16 divides)
    frag = run(rewrite(m, 1, strategy="fragments"), feeds)["y"]
    np.testing.assert_allclose(y, frag, rtol=0, atol=1e-5 * np.abs(y).max())
    report = onnx_dense.verify(m, dense, inputs=feeds, phases=True)
    assert report, report.text()
    assert any("global context" in c.note for c in report.comparisons)


def test_non_dividing_size_each_phase_averages_the_positions_it_has():
    """15: phase 1 of c1 has 7 positions, phase 0 has 8. Per-phase global averages the 7 it
    has; fragments averages 8 (one computed from the zero extension). Both keep the subgrid."""
    m = se(15)
    feeds = feeds_for(m)
    ref = run(m, feeds)["y"]
    pg = run(rewrite(m, 1, per_phase_global=True), feeds)["y"]
    fr = run(rewrite(m, 1, strategy="fragments"), feeds)["y"]
    assert pg.shape == (1, 3, 15, 15) and fr.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(sub(pg, 4), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(sub(fr, 4), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # the per-phase means by hand: phase (a, b) of the dense map h is h[a::2, b::2]
    from tests._graphs import with_outputs

    dense = rewrite(m, 1, per_phase_global=True)
    (mean_node,) = [n for n in dense.graph.node if n.name.startswith("gap_per_phase_mean")]
    probe = with_outputs(dense, [onnx.helper.make_tensor_value_info(v, 1, None) for v in ("h", mean_node.output[0])])
    got = run(probe, feeds)
    h, means = got["h"], got[mean_node.output[0]]
    assert h.shape[-2:] == (15, 15) and means.shape == (1, 4, 2, 2)
    for a in range(2):
        for b in range(2):
            np.testing.assert_allclose(means[:, :, a, b], h[:, :, a::2, b::2].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [12, 20])
def test_per_phase_global_runs_at_any_size(size):
    """Nothing in the per-phase mean is tied to the analysis size (unlike a dilated window)."""
    m = se(16)
    dense = rewrite(m, 1, per_phase_global=True)
    other = se(size)
    x = np.random.default_rng(size).standard_normal((1, 2, size, size)).astype(np.float32)
    y = run(dense, {"x": x})["y"]
    ref = run(other, {"x": x})["y"]
    np.testing.assert_allclose(sub(y, 4), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_what_per_phase_global_does_not_rewrite_is_refused():
    """A Linear SE (Flatten + Gemm + Reshape back) has no per-phase form here; fragments takes it."""
    m = graph(
        "float[1,2,16,16] x, float[4,2,3,3] w1, float[4,4] wf, float[3,4,3,3] w2",
        "[c1] h = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)\n[gap] g = GlobalAveragePool (h)\n"
        "fl = Flatten (g)\n[fc] f = Gemm <transB=1> (fl, wf)\ns = Sigmoid (f)\n"
        "sh = Constant <value = int64[4] {1, 4, 1, 1}> ()\n[back] s4 = Reshape (s, sh)\n"
        "[se_mul] m = Mul (h, s4)\n[c2] y = Conv <pads=[1,1,1,1]> (m, w2)",
    )
    with pytest.raises(onnx_dense.DenseError) as caught:
        rewrite(m, 1, per_phase_global=True)
    assert "node '" in str(caught.value)


# ============================================================================ MobileNetV3-style


@functools.cache
def _mbv3(name: str, exporter: str) -> bytes:
    from samples import zoo_context

    with tempfile.TemporaryDirectory() as tmp:
        return zoo_context.export(zoo_context.build(name), Path(tmp) / "m.onnx", exporter).read_bytes()


CASES = [
    ("mobilenetv3", "torchscript", 8),
    ("mobilenetv3", "torchscript", 2),
    ("mobilenetv3_fcn", "torchscript", 4),
    # dynamo export takes 10-30 s here: its Reshape(x, [1, C]) head is covered by a tiny graph
    # in test_fragments.py; this runs with --runslow
    pytest.param("mobilenetv3", "dynamo", 4, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, exporter, stride", CASES)
def test_mobilenetv3_under_both_strategies(name, exporter, stride, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(_mbv3(name, exporter))
    with pytest.raises(onnx_dense.DenseError, match="global context"):
        onnx_dense.rewrite(src, tmp_path / "x.onnx", output_stride=stride, strategy="dilate")
    outs = {}
    for label, kwargs in {"dilate": dict(per_phase_global=True), "fragments": dict(strategy="fragments")}.items():
        dst = tmp_path / f"{label}.onnx"
        onnx_dense.rewrite(src, dst, output_stride=stride, **kwargs)
        report = onnx_dense.verify(src, dst, phases=True, max_phases=4)
        assert report, report.text()
        meta = metadata.read(onnx.load(str(dst)))
        assert meta.strategy == label
        (out,) = meta.outputs.values()
        assert out.est == (32 // stride,) * 2
        x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
        outs[label] = run(onnx.load(str(dst)), {"input": x})
    # 3x3 and 5x5 stride-2 convs with pad k//2 on 64 -> 32 -> ... -> 2: every level divides
    (a,), (b,) = outs["dilate"].values(), outs["fragments"].values()
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
