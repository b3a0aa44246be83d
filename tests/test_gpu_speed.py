"""benchmarks/gpu_speed.py and its undilated twin: the whole script on the CPU (the FCN sample at
64, one round), the twin on tiny graphs, and the CUDA run (skipped without onnxruntime-gpu and a
CUDA torch). No timing assertions: the numbers are checked for consistency, not speed."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import onnx_dense
from onnx_dense import DenseError, metadata
from onnx_dense.bench import count_flops, undilated_twin
from tests._graphs import with_weights

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_speed.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_speed", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_speed"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gs = _load_script()


# ------------------------------------------------------------------------------------------
# the undilated twin
# ------------------------------------------------------------------------------------------

NET = """
<ir_version: 9, opset_import: ["" : 20]>
net (float[1,3,40,40] input) => (float output) {
    c1 = Conv <pads = [1,1,1,1]> (input, w1, b1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    c2 = Conv <pads = [1,1,1,1]> (p1, w2)
    r2 = Relu (c2)
    p2 = AveragePool <kernel_shape = [3,3], strides = [2,2], pads = [1,1,1,1]> (r2)
    c3 = Conv <pads = [1,1,1,1]> (p2, w3)
    s = Conv (p2, w4)
    j = Add (c3, s)
    p3 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (j)
    output = Conv (p3, w5)
}
"""
WEIGHTS = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (8, 8, 3, 3), "w3": (6, 8, 3, 3), "w4": (6, 8, 1, 1), "w5": (5, 6, 3, 3)}


def _parse(text: str) -> onnx.ModelProto:
    """The parser reads ``float output`` as a scalar: leave the output shapes to inference."""
    model = onnx.parser.parse_model(text)
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")
    return model


@pytest.fixture(scope="module")
def dense_nets(tmp_path_factory):
    """NET (pools, a join, a pad-0 last conv) rewritten at output strides 4, 2 and 1 (eST 2, 4, 8)."""
    d = tmp_path_factory.mktemp("twin")
    onnx.save(with_weights(NET, WEIGHTS), str(d / "net.onnx"))
    out = {}
    for r in (4, 2, 1):
        onnx_dense.rewrite(d / "net.onnx", d / f"r{r}.onnx", output_stride=r)
        out[r] = onnx.load(str(d / f"r{r}.onnx"))
    return out


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _dilations(model: onnx.ModelProto) -> list[list[int]]:
    return [
        list(a.ints) for n in model.graph.node if n.op_type in ("Conv", "MaxPool", "AveragePool")
        for a in n.attribute if a.name == "dilations"
    ]


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_twin_has_no_dilation_and_the_dense_shapes_and_flops(dense_nets, stride):
    dense = dense_nets[stride]
    assert any(max(d) > 1 for d in _dilations(dense))  # there is something to undo
    before = dense.SerializeToString()
    shapes = {"input": (1, 3, 40, 40)}
    twin = undilated_twin(dense, shapes)
    assert dense.SerializeToString() == before  # the input proto is not modified
    assert all(d == [1, 1] for d in _dilations(twin))
    x = np.random.default_rng(1).standard_normal((1, 3, 40, 40)).astype(np.float32)
    got, want = _run(twin, x), _run(dense, x)
    assert got.shape == want.shape
    assert not np.allclose(got, want)  # a different computation: the same workload only
    flops = count_flops(dense, shapes)[0]
    assert flops and count_flops(twin, shapes)[0] == flops
    assert metadata.read(twin) is None and metadata.read(dense) is not None  # the twin has no dense grid


def test_twin_pads_and_crops(dense_nets):
    """eST 8: the dilated 3x3 windows (pads 2 and 4) keep pads 1; the pad-0 dilated pool and last conv
    get a crop of their input instead (a Slice), so that every map keeps the dense size."""
    twin = undilated_twin(dense_nets[1])
    by_output = {n.output[0]: n for n in twin.graph.node}
    pads = {k: next(list(a.ints) for a in by_output[k].attribute if a.name == "pads") for k in ("c2", "p2", "c3")}
    assert pads == {"c2": [1, 1, 1, 1], "p2": [1, 1, 1, 1], "c3": [1, 1, 1, 1]}
    slices = [n for n in twin.graph.node if n.op_type == "Slice"]
    assert all(n.name.startswith("onnx_dense_twin_") for n in slices)
    cropped = {n.output[0] for n in slices}
    assert sorted(n.output[0] for n in twin.graph.node if n.input and n.input[0] in cropped) == ["output", "p3"]
    assert {n.input[0] for n in slices} == {"j", "p3"}


WINDOW = """
<ir_version: 9, opset_import: ["" : 20]>
w (float[1,4,{n},{n}] input) => (float output) {{
    output = {op} <{attrs}> ({args})
}}
"""


@pytest.mark.parametrize(
    "op, attrs, n",
    [
        ("Conv", "dilations = [3,3], pads = [3,3,3,3]", 21),  # pads cover it all
        ("Conv", "dilations = [4,2], pads = [1,2,0,1], strides = [2,1]", 23),  # partly pads, partly crop
        ("Conv", "dilations = [2,2], auto_pad = \"VALID\"", 20),  # only a crop
        ("MaxPool", "kernel_shape = [3,3], dilations = [2,2], strides = [2,2], pads = [1,1,1,1], ceil_mode = 1", 18),
        ("AveragePool", "kernel_shape = [2,2], dilations = [3,3], pads = [1,0,0,1]", 17),
    ],
)
def test_twin_of_single_windows(op, attrs, n):
    args = "input, w" if op == "Conv" else "input"
    model = _parse(WINDOW.format(n=n, op=op, attrs=attrs, args=args))
    if op == "Conv":
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((2, 4, 3, 3), np.float32), "w"))
    shapes = {"input": (1, 4, n, n)}
    twin = undilated_twin(model, shapes)
    x = np.random.default_rng(0).standard_normal((1, 4, n, n)).astype(np.float32)
    assert _run(twin, x).shape == _run(model, x).shape
    assert count_flops(twin, shapes)[0] == count_flops(model, shapes)[0] > 0
    assert all(d == [1, 1] for d in _dilations(twin))


def test_twin_keeps_same_auto_pad():
    """auto_pad=SAME_*: the output size does not depend on the dilation, so only the dilation changes.
    (ORT refuses dilated SAME convolutions, so the shapes come from ONNX shape inference.)"""
    attrs = 'dilations = [2,2], auto_pad = "SAME_UPPER", strides = [2,2]'
    model = _parse(WINDOW.format(n=19, op="Conv", attrs=attrs, args="input, w"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((2, 4, 3, 3), np.float32), "w"))
    twin = undilated_twin(model, {"input": (1, 4, 19, 19)})
    assert all(d == [1, 1] for d in _dilations(twin)) and not any(n.op_type == "Slice" for n in twin.graph.node)
    shapes = [
        [d.dim_value for d in onnx.shape_inference.infer_shapes(m).graph.output[0].type.tensor_type.shape.dim]
        for m in (model, twin)
    ]
    assert shapes == [[1, 2, 10, 10]] * 2
    assert _run(twin, np.zeros((1, 4, 19, 19), np.float32)).shape == (1, 2, 10, 10)


def test_twin_without_a_kernel_size_is_one_line():
    model = _parse("""
    <ir_version: 9, opset_import: ["" : 20]>
    w (float[1,4,16,16] input, float w) => (float output) {
        output = Conv <dilations = [2,2]> (input, w)
    }
    """)
    with pytest.raises(DenseError, match="kernel_shape") as err:
        undilated_twin(model)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------
# the script, on the CPU
# ------------------------------------------------------------------------------------------


def _main(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = gs.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The FCN sample at 64 (output strides 8 and 4), one round, CPU."""
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("gpu_speed")
    code, out, err = _main("--device", "cpu", "--only", "fcn-64", "--repeat", "1", "--settle", "0",
                           "--workdir", d, "--json", d / "gpu.json")
    return code, out, err, json.loads((d / "gpu.json").read_text()), d


def test_smoke_run_passes_and_reports_every_row(smoke):
    code, out, err, data, _ = smoke
    assert code == 0, out + err
    assert data["passed"] is True and data["skipped"] == []
    assert data["settings"]["device"] == "cpu" and data["settings"]["repeat"] == 1
    assert data["paper"] == {"original_ms": 44.0, "dense_ms": 132.0, "time_ratio": 3.0, "prediction_ratio": 240.0}
    assert {"cpu", "onnxruntime", "torch"} <= set(data["machine"]) and data["machine"]["gpu"] is None
    assert "cudnn_allow_tf32" in data["machine"]["torch"]
    rows = {r["output_stride"]: r for r in data["rows"]}
    assert sorted(rows) == [4, 8]
    # the same counts as the CPU table (benchmarks/README.md): FCN at 64, predictions o / d / s&s
    assert rows[8]["est"] == [2, 2] and rows[8]["predictions"] == {"original": 4, "dense": 9, "shift-and-stitch": 16}
    assert rows[4]["est"] == [4, 4] and rows[4]["predictions"] == {"original": 4, "dense": 25, "shift-and-stitch": 64}
    for r in rows.values():
        names = {c["check"] for c in r["checks"]}
        assert {"subgrid", "shift-and-stitch", "twin FLOPs", "twin shapes (ORT)", "twin shapes (PyTorch)",
                "PyTorch = ORT (original)", "PyTorch = ORT (dense)"} <= names
        assert all(c["passed"] for c in r["checks"]), r["checks"]
        assert r["bench"]["measurements"]["shift-and-stitch"]["passes"] == math.prod(r["est"])
        assert r["twin"]["slices"] >= 1  # fc6 has no padding: its twin crops


def test_numbers_are_consistent(smoke):
    """TFLOP/s = FLOPs / time, the ratios are ratios of the medians, the twin does the dense FLOPs."""
    data = smoke[3]
    for r in data["rows"]:
        f = r["flops"]
        assert f["twin"] == f["dense"] > f["original"] > 0
        assert r["ratios"]["dense_over_original_flops"] == pytest.approx(f["dense"] / f["original"])
        assert r["ratios"]["dense_over_original_predictions"] == pytest.approx(
            r["predictions"]["dense"] / r["predictions"]["original"])
        for fw in ("ort", "torch"):
            s = r[fw]
            assert set(s["ms"]) == {"original", "dense", "twin"}
            for k, ms in s["ms"].items():
                assert ms > 0 and ms == pytest.approx(float(np.median(s["times_ms"][k])))
                assert len(s["times_ms"][k]) == 1
                assert s["tflops"][k] == pytest.approx(f[k] / (ms / 1000) / 1e12, rel=1e-12)
            assert s["dilation_efficiency"] == pytest.approx(s["tflops"]["dense"] / s["tflops"]["twin"])
            assert s["dense_over_original_time"] == pytest.approx(s["ms"]["dense"] / s["ms"]["original"])
        assert max(r["torch"]["max_rel_vs_ort"].values()) < 1e-4


def test_tables(smoke):
    code, out, err, data, d = smoke
    assert "ORT CPU EP (IOBinding):" in out and "PyTorch (OnnxGraphModule):" in out
    for stride, est in ((8, 2), (4, 4)):
        key = f"| FCN-style sample (width 8) | 64 | {stride} ({est}) |"
        lines = [ln for ln in out.splitlines() if ln.startswith(key)]
        assert len(lines) == 2, out  # one in each framework's table
        row = next(r for r in data["rows"] if r["output_stride"] == stride)
        assert f" {row['ort']['ms']['dense']:.2f} |" in lines[0]
        assert f" {row['torch']['ms']['twin']:.2f} |" in lines[1]
        assert f" {row['ort']['dilation_efficiency']:.2f} |" in lines[0]
    assert "Against the paper" not in out and "Not measured" not in out
    assert "# fcn-64:" in err and "r4: ORT" in err
    code, again, _ = _main("--tables", d / "gpu.json")
    assert code == 0 and again.strip() == out.strip()


def test_paper_comparison(smoke):
    """The paper row's ratios: ours over the paper's 3x time and 240x predictions, per framework."""
    data = json.loads(json.dumps(smoke[3]))
    row = next(r for r in data["rows"] if r["output_stride"] == 4)
    paper = gs.paper_comparison(row)
    assert paper["prediction_ratio"] == pytest.approx(25 / 4)
    assert paper["prediction_ratio_over_paper"] == pytest.approx(25 / 4 / 240)
    for fw in ("ort", "torch"):
        ratio = row[fw]["ms"]["dense"] / row[fw]["ms"]["original"]
        assert paper[fw]["time_ratio"] == pytest.approx(ratio)
        assert paper[fw]["time_ratio_over_paper"] == pytest.approx(ratio / 3.0)
    row["paper"] = paper
    text = gs.tables(data)
    assert "Against the paper" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| ORT |"))
    assert f"| {paper['ort']['time_ratio_over_paper']:.2f} | 4 → 25 | 6.25 | 0.026 |" in line


def test_a_failing_row_and_a_failing_check(smoke, monkeypatch):
    """A row that raises is reported with its reason and the others still run; a failed check exits 1."""
    measure = gs.measure_row

    def broken(case, stride, *args, **kwargs):
        if stride == 4:
            raise RuntimeError("planted failure\nsecond line")
        return measure(case, stride, *args, **kwargs)

    monkeypatch.setattr(gs, "measure_row", broken)
    monkeypatch.setattr(gs, "TOL_FP32", {"cpu": -1.0, "cuda": -1.0})  # PyTorch = ORT can no longer pass
    d = smoke[4]
    code, out, err = _main("--device", "cpu", "--only", "fcn-64", "--repeat", "1", "--settle", "0", "--workdir", d,
                           "--json", d / "broken.json")
    assert code == 1
    data = json.loads((d / "broken.json").read_text())
    rows = {r["output_stride"]: r for r in data["rows"]}
    assert rows[4]["error"] == "RuntimeError: planted failure" and rows[4]["passed"] is False
    assert "ms" in rows[8]["ort"] and rows[8]["passed"] is False
    assert [c["check"] for c in rows[8]["checks"] if not c["passed"]] == ["PyTorch = ORT (original)", "PyTorch = ORT (dense)"]
    assert "r4: RuntimeError: planted failure" in out and "check PyTorch = ORT (dense) FAILED" in out
    # a rerun's rows replace the failed ones in the merged tables (--tables RUN RERUN)
    merged = gs.merge([data, smoke[3]])
    assert sorted(r["output_stride"] for r in merged["rows"]) == [4, 8] and all(r["passed"] for r in merged["rows"])
    assert "Not measured" not in gs.tables(merged) and "Not measured" in gs.tables(data)


def test_tf32_setting_is_applied_and_recorded():
    torch = pytest.importorskip("torch")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for mode, expected in (("off", False), ("on", True)):
            info = gs.setup(gs.Settings("cpu", 1, 0, 2, mode, 0.0))
            assert info["tf32_setting"] == mode
            assert info["torch"]["cudnn_allow_tf32"] is expected and info["torch"]["matmul_allow_tf32"] is expected
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_absent_is_one_line(tmp_path):
    code, out, err = _main("--device", "cuda", "--only", "fcn-64", "--workdir", tmp_path)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_speed: error: ")
    assert "CUDA" in lines[0]


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        gs.main(["--device", "cpu", "--only", "vgg17"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------
# CUDA (skipped without onnxruntime-gpu and a CUDA torch)
# ------------------------------------------------------------------------------------------


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and _torch_cuda()), reason="needs onnxruntime-gpu and torch with a CUDA device")
def test_cuda_run(tmp_path):
    code, out, err = _main("--device", "cuda", "--only", "fcn-64", "--repeat", "3", "--workdir", tmp_path,
                           "--json", tmp_path / "gpu.json")
    assert code == 0, out + err
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["machine"]["gpu"]["name"] and "ORT CUDA EP (IOBinding):" in out
    for r in data["rows"]:
        assert r["passed"], r["checks"]
        assert r["ort"]["provider_options"]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
        assert r["bench"]["provider"] == "cuda"
        for fw in ("ort", "torch"):
            for k, ms in r[fw]["ms"].items():
                assert r[fw]["tflops"][k] == pytest.approx(r["flops"][k] / ms / 1e9)
