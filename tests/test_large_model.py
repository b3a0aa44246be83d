"""Models whose weights live in external data, up to beyond protobuf's 2 GB: load, rewrite, save.

The model is a small conv backbone (total stride 32) with a wide fully connected head
(GlobalAveragePool -> Flatten -> MatMul -> Relu -> MatMul -> Relu -> MatMul), the shape of a
Keras or Paddle classifier whose Dense weights dominate. Its weights are written as external
data by hand, and the big tensors' bytes *sparsely*: a few random 4 KiB blocks (start, middle,
end of each tensor) and ``truncate`` for the rest, so a 2.5 GB model costs a few MB of disk
and no time to build. The rewrite must

* load it with the weights memory-mapped (``onnx_ir.ExternalTensor``) and never read them
  (the rewrite only needs shapes; the head's MatMuls keep their weights as they are);
* save the dense model with external data beside it, every weight byte-identical;
* leave a model the ONNX checker accepts (given its path: > 2 GB cannot be checked in memory)
  and that ONNX Runtime loads and runs, matching the original on the subgrid.

The fast test does this with 8 MB of weights from another working directory, with relative
paths, through the CLI; the slow one (``--runslow``) with 2.5 GB.
"""

from __future__ import annotations

import mmap
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dense import api, metadata, model_io
from onnx_dense.cli import main as cli_main
from onnx_dense.errors import DenseError

BLOCK = 4096


def build_external(folder: Path, hidden: int, *, name: str = "big.onnx", seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Write ``folder/name`` and ``folder/name.data``; return the model path and the bytes of
    each external tensor. The head's two big MatMul weights are (256, hidden) and (hidden, 256)."""
    rng = np.random.default_rng(seed)
    small: list[onnx.TensorProto] = []
    nodes = []
    x, cin = "input", 3
    for i, cout in enumerate([8, 16, 32, 64, 256]):
        w = numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32), f"conv{i}.weight")
        b = numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"conv{i}.bias")
        small += [w, b]
        nodes.append(helper.make_node("Conv", [x, w.name, b.name], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x, cin = f"r{i}", cout
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc1.weight"], ["m1"], name="fc1"),
        helper.make_node("Relu", ["m1"], ["h1"], name="relu_fc1"),
        helper.make_node("MatMul", ["h1", "fc2.weight"], ["m2"], name="fc2"),
        helper.make_node("Relu", ["m2"], ["h2"], name="relu_fc2"),
        helper.make_node("MatMul", ["h2", "fc3.weight"], ["output"], name="fc3"),
    ]
    big = {"fc1.weight": (256, hidden), "fc2.weight": (hidden, 256)}
    small.append(numpy_helper.from_array((rng.standard_normal((256, 10)) / 16).astype(np.float32), "fc3.weight"))
    data_name = name + ".data"
    sizes: dict[str, int] = {}
    external: list[onnx.TensorProto] = []
    offset = 0
    with open(folder / data_name, "wb") as f:
        for tname, shape in big.items():
            length = int(np.prod(shape)) * 4
            t = TensorProto(name=tname, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            # a few non-zero blocks, so that a misplaced or truncated copy shows
            scale = np.float32(1.0 / np.sqrt(shape[0]))
            for at in (0, (length // 2) // BLOCK * BLOCK, length - BLOCK):
                f.seek(offset + at)
                f.write((rng.standard_normal(BLOCK // 4).astype(np.float32) * scale).tobytes())
            external.append(t)
            sizes[tname] = length
            offset += length
        f.truncate(offset)  # the rest is a hole: reads as zeros, takes no disk
    graph = helper.make_graph(
        nodes, "wide_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
        small + external,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tf2onnx")
    model.ir_version = 8
    path = folder / name
    with open(path, "wb") as f:
        f.write(model.SerializeToString())  # onnx.save would try to resolve the external data
    return path, sizes


def _external_ranges(path: Path) -> dict[str, tuple[Path, int, int]]:
    model = onnx.load(str(path), load_external_data=False)
    ranges = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        ranges[t.name] = (path.parent / info["location"], int(info.get("offset", 0)), int(info["length"]))
    return ranges


def _same_bytes(a: tuple[Path, int, int], b: tuple[Path, int, int], chunk: int = 1 << 26) -> bool:
    (pa, oa, la), (pb, ob, lb) = a, b
    if la != lb:
        return False
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        with mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as ma, mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as mb:
            for start in range(0, la, chunk):
                n = min(chunk, la - start)
                if ma[oa + start : oa + start + n] != mb[ob + start : ob + start + n]:
                    return False
    return True


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check_dense_file(src: Path, dst: Path, sizes: dict[str, int], *, run: bool = True) -> None:
    """External data beside dst, weights byte-identical, checker and ORT accept it, subgrid equal."""
    assert (dst.parent / (dst.name + ".data")).is_file(), "the dense model's weights should be external data"
    assert dst.stat().st_size < 1 << 20, "the weights went into the .onnx file"
    before, after = _external_ranges(src), _external_ranges(dst)
    assert set(sizes) <= set(after), f"weights not external in the output: {set(sizes) - set(after)}"
    for name in sizes:
        assert _same_bytes(before[name], after[name]), f"{name}: bytes differ"
    onnx.checker.check_model(str(dst))  # by path: fine beyond 2 GB
    if not run:
        return
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    expected = _session(src).run(None, {"input": x})[0]
    got = _session(dst).run(None, {"input": x})[0]
    info = metadata.read(onnx.load(str(dst), load_external_data=False))
    out = info.outputs["output"]
    index = [slice(None)] * got.ndim
    for a, e in zip(out.spatial_axes, out.est):
        index[a] = slice(0, None, e)
    sampled = got[tuple(index)].reshape(expected.shape)
    scale = float(np.abs(expected).max())
    assert scale > 0, "the original's output is all zeros: the test weights are degenerate"
    np.testing.assert_allclose(sampled, expected, rtol=0, atol=1e-5 * scale)


def _rewrite_without_reading_weights(src: Path, dst: Path, sizes: dict[str, int], stride: int) -> None:
    model = model_io.load(src)
    tensors = {n: model.graph.initializers[n].const_value for n in sizes}
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors.values()), {n: type(t) for n, t in tensors.items()}
    tracemalloc.start()
    try:
        dense = api.rewrite_model(model, output_stride=stride)
        model_io.save(dense, dst, inputs=(src,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for n, t in tensors.items():
        kept = dense.graph.initializers[n].const_value
        assert kept is t and isinstance(kept, ir.ExternalTensor), f"{n} was replaced by {type(kept).__name__}"
        assert getattr(kept, "_array", None) is None, f"{n} was read into memory"
    total = sum(sizes.values())
    assert peak < max(total // 20, 16 << 20), f"rewrite + save allocated {peak / 1e6:.0f} MB for {total / 1e6:.0f} MB of weights"


def test_external_data_model_rewrites_from_another_directory(tmp_path, monkeypatch, capsys):
    """8 MB of external weights; the CLI, relative paths, run from a sibling directory."""
    models = tmp_path / "models"
    models.mkdir()
    src, sizes = build_external(models, hidden=4096)
    _rewrite_without_reading_weights(src, models / "dense_api.onnx", sizes, stride=16)
    _check_dense_file(src, models / "dense_api.onnx", sizes)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = Path("..") / "out"
    out.mkdir()
    assert cli_main(["rewrite", str(Path("..") / "models" / "big.onnx"), str(out / "dense.onnx"), "-r", "8",
                     "--strategy", "dilate"]) == 0
    assert cli_main(["verify", str(Path("..") / "models" / "big.onnx"), str(out / "dense.onnx")]) == 0
    capsys.readouterr()
    _check_dense_file(src, (tmp_path / "out" / "dense.onnx"), sizes)
    # the dense model is loadable from anywhere too: its data location is relative to itself
    monkeypatch.chdir(tmp_path)
    _session(Path("out") / "dense.onnx")


def test_missing_external_data_is_a_clear_error(tmp_path):
    src, _ = build_external(tmp_path, hidden=1024)
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(DenseError, match="external data file 'big.onnx.data', which is missing"):
        model_io.load(src)


@pytest.mark.slow
def test_model_over_2gb_loads_rewrites_and_saves(tmp_path):
    """2.5 GB of weights in two 1.2 GB MatMul weights (sparse on disk until saved)."""
    hidden = 1_200_000
    total = 2 * 256 * hidden * 4
    assert total > 2**31, "the point is to exceed protobuf's 2 GB"
    free = shutil.disk_usage(tmp_path).free
    if free < total * 1.5:
        pytest.skip(f"needs {total * 1.5 / 1e9:.1f} GB free in {tmp_path} for the saved dense model, has {free / 1e9:.1f} GB")
    src, sizes = build_external(tmp_path, hidden=hidden)
    assert sum(sizes.values()) == total
    dst = tmp_path / "dense.onnx"
    _rewrite_without_reading_weights(src, dst, sizes, stride=16)
    _check_dense_file(src, dst, sizes)
