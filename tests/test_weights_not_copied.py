"""The rewrite must not copy weights: a 500 MB model should cost one copy of its weights at most.

Passes only ever need the *shapes* of weights (shape inference sees large initializers as
typed inputs, see ``passes/static_shapes._light_proto``), and head weights keep their name
and shape (Transpose/Reshape nodes reshape them at run time). So:

* weights loaded with external data stay memory-mapped ``ExternalTensor``s through the
  rewrite, untouched (never read), and are written correctly by ``model_io.save``;
* every weight tensor of the result is the very object the input held (no re-created,
  transposed or materialised tensor);
* the rewrite of an in-memory model allocates far less than its weights, both in
  Python-tracked memory (tracemalloc: bytes objects, numpy arrays) and in process RSS
  (which also sees protobuf's C allocations, e.g. a full ``serialize_model``).

* a single-file model rewritten file to file peaks at about twice its weights: the parsed
  model, plus the file's pages mapped while protobuf parses them; the save streams one
  tensor at a time (``onnx.load`` + ``onnx.save`` alone peak at three times).

benchmarks/rewrite_large.py measures the same on a VGG-16-sized model.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dense import api, model_io

OUTPUT_STRIDE = 1  # fully dense: every pool and the head Gemm become dilated windows
_BIG = 1024  # initializers above this many bytes must never be touched


def build_model(hidden: int = 512, classes: int = 10, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """conv-relu-pool x2, flatten, fc1 (2048 -> hidden), relu, fc2: a VGG-like classifier.

    Weights: ``4 * (2048 * hidden + hidden * classes)`` bytes plus ~80 KB of convs. No
    initializer is exactly 1 KiB (see ``test_external_small_tensors_from_another_cwd``).
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}

    def param(name: str, *shape: int) -> str:
        weights[name] = rng.standard_normal(shape, dtype=np.float32)
        return name

    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["input", param("conv1.weight", 16, 3, 3, 3), param("conv1.bias", 16)], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", **pool),
        helper.make_node("Conv", ["p1", param("conv2.weight", 32, 16, 3, 3), param("conv2.bias", 32)], ["c2"], name="conv2", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", **pool),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", param("fc1.weight", hidden, 32 * 8 * 8), param("fc1.bias", hidden)], ["g1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["g1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", param("fc2.weight", classes, hidden), param("fc2.bias", classes)], ["output"], transB=1, name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "vgg_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weights


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    # onnx's default threshold: tensors of >= 1 KiB go to <path>.data, smaller ones stay inline
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=path.name + ".data", size_threshold=1024,
    )


def _big_tensors(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    return {
        name: v.const_value
        for name, v in model.graph.initializers.items()
        if v.const_value is not None and v.const_value.nbytes > _BIG
    }


def test_external_weights_stay_memory_mapped_and_are_saved_correctly(tmp_path):
    proto, weights = build_model(hidden=512)  # ~4 MB of weights
    src = tmp_path / "model.onnx"
    _save_external(proto, src)
    del proto

    model = model_io.load(src)
    before = _big_tensors(model)
    assert len(before) >= 4 and all(isinstance(t, ir.ExternalTensor) for t in before.values())

    dense = api.rewrite_model(model, output_stride=OUTPUT_STRIDE)

    after = _big_tensors(dense)
    assert set(after) == set(before), "large initializers were added, dropped or renamed"
    for name, tensor in after.items():
        external = isinstance(tensor, ir.ExternalTensor)
        assert external, f"{name} was materialised as {type(tensor).__name__}"
        same = tensor is before[name]
        assert same, f"{name} is a new tensor object: the rewrite replaced the weight"
        # ExternalTensor maps its file lazily (into _array) on the first numpy()/__array__
        assert getattr(tensor, "_array", None) is None, f"{name} was loaded (numpy()) during the rewrite"

    dst = tmp_path / "dense.onnx"
    model_io.save(dense, dst, inputs=(src,))
    assert (tmp_path / "dense.onnx.data").is_file(), "external weights should be saved as external data"
    for tensor in after.values():  # saving copies file to file, without reading into memory
        assert getattr(tensor, "_array", None) is None

    saved = onnx.load(str(dst))  # loads dense.onnx.data
    saved_weights = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    for name, array in weights.items():
        assert name in saved_weights, f"{name} missing from the saved dense model"
        np.testing.assert_array_equal(saved_weights[name], array, err_msg=name)


def test_in_memory_weights_are_neither_replaced_nor_copied():
    proto, weights = build_model(hidden=4096, classes=500)  # ~40 MB of weights
    weight_bytes = sum(a.nbytes for a in weights.values())
    assert weight_bytes > 35_000_000
    del weights
    model = ir.serde.deserialize_model(proto)  # TensorProtoTensors wrap the proto, no copy
    before = _big_tensors(model)
    gc.collect()

    tracemalloc.start()
    try:
        dense = api.rewrite_model(model, output_stride=OUTPUT_STRIDE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    after = _big_tensors(dense)
    assert set(after) == set(before)
    for name, tensor in after.items():
        same = tensor is before[name]
        assert same, f"{name} was replaced by a new {type(tensor).__name__}"
    # A pass that read the weights (tensor.numpy(): a bytes + an array) or shape-inferred the
    # full model (SerializeToString: a bytes object) would allocate >= the fc1 weight (32 MB).
    assert peak < weight_bytes / 10, (
        f"the rewrite allocated {peak / 1e6:.1f} MB of Python-tracked memory for a model with "
        f"{weight_bytes / 1e6:.1f} MB of weights"
    )


# What both children share: the model, /proc/self/status, and a peak reset just before the
# measured call (VmHWM := VmRSS, after freeing what building the model left behind).
_CHILD_PRELUDE = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    sys.path.insert(0, sys.argv[1])
    from test_weights_not_copied import build_model

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

    def reset_peak():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    def report(base, weight_bytes):
        print(json.dumps({"growth": status("VmHWM") - base, "weight_bytes": weight_bytes}))

    proto, weights = build_model(hidden=4096, classes=500)
    weight_bytes = sum(a.nbytes for a in weights.values())
    """
)

_RSS_CHILD = _CHILD_PRELUDE + textwrap.dedent(
    """
    import onnx_ir as ir
    from onnx_dense import api

    del weights
    model = ir.serde.deserialize_model(proto)
    base = reset_peak()
    api.rewrite_model(model, output_stride=int(sys.argv[2]))
    report(base, weight_bytes)
    """
)

_FILE_CHILD = _CHILD_PRELUDE + textwrap.dedent(
    """
    import onnx
    import onnx_dense

    onnx.save(proto, sys.argv[2])
    del proto, weights
    base = reset_peak()
    onnx_dense.rewrite(sys.argv[2], sys.argv[3], output_stride=int(sys.argv[4]))
    report(base, weight_bytes)
    """
)


def _peak_in_child(child: str, *args) -> dict:
    """Run ``child`` in a fresh interpreter; its {"growth", "weight_bytes"} (bytes of peak RSS growth)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the RSS high-water mark here")
    # Large blocks mmap'd and returned on free, so a copy shows up as RSS growth instead of
    # silently reusing memory the model build freed (glibc's dynamic threshold would).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-c", child, str(Path(__file__).parent), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_file_to_file_rewrite_peaks_at_two_weight_sizes(tmp_path):
    """Load parses once (no bytes copy of the file), save streams tensor by tensor."""
    result = _peak_in_child(_FILE_CHILD, tmp_path / "m.onnx", tmp_path / "d.onnx", OUTPUT_STRIDE)
    ratio = result["growth"] / result["weight_bytes"]
    assert ratio < 2.3, f"file-to-file rewrite peaked at {ratio:.2f}x the weights (onnx.load+save: 3x)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_in_memory_rewrite_peak_rss_is_far_below_weight_size():
    """What tracemalloc cannot see: protobuf's own allocations (e.g. a full serialize_model)."""
    result = _peak_in_child(_RSS_CHILD, OUTPUT_STRIDE)
    growth, weight_bytes = result["growth"], result["weight_bytes"]
    assert growth < weight_bytes / 4, (
        f"peak RSS grew by {growth / 1e6:.1f} MB during the rewrite of a model with "
        f"{weight_bytes / 1e6:.1f} MB of weights"
    )


_HELD_CHILD = textwrap.dedent(
    """
    import json, sys
    import onnxruntime as ort

    def rss():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))

    kind, path = sys.argv[2], sys.argv[3]
    from onnx_dense.runtime import DenseSession  # imports first, so they are not counted
    base = rss()
    session = DenseSession(path, provider="cpu") if kind == "dense" else ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    print(json.dumps({"held": rss() - base}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_dense_session_holds_no_second_copy_of_the_weights(tmp_path):
    """After loading, DenseSession holds what onnxruntime's own session holds: the metadata read
    from the file is freed with the model it came from (reference cycles of the onnx-ir model
    kept a whole copy of the weights alive until the next garbage collection)."""
    proto, weights = build_model(hidden=8192)  # ~67 MB of weights
    weight_bytes = sum(a.nbytes for a in weights.values())
    src, dst = tmp_path / "m.onnx", tmp_path / "d.onnx"
    onnx.save(proto, str(src))
    api.rewrite(src, dst, output_stride=OUTPUT_STRIDE)
    held = {kind: _peak_in_child(_HELD_CHILD, kind, dst)["held"] for kind in ("ort", "dense")}
    extra = held["dense"] - held["ort"]
    assert extra < weight_bytes / 4, (
        f"DenseSession holds {extra / 1e6:.0f} MB more than onnxruntime's session ({weight_bytes / 1e6:.0f} MB of weights)"
    )


def test_external_small_tensors_from_another_cwd(tmp_path, monkeypatch):
    """onnx's default size_threshold (1024) puts 1 KiB tensors (256-float biases) in the .data file."""
    proto, _ = build_model(hidden=256)  # fc1.bias: 256 floats = exactly 1 KiB, external
    src = tmp_path / "model.onnx"
    _save_external(proto, src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    api.rewrite(src, tmp_path / "dense.onnx", output_stride=OUTPUT_STRIDE)


def test_int8_weights_of_a_quantized_head_are_not_read():
    """QDQ models: DequantizeLinear(int8 weight, scale, zero point) has only constant inputs."""
    rng = np.random.default_rng(0)
    w_q = rng.integers(-128, 127, size=(512, 16384), dtype=np.int8)  # 8 MiB
    initializers = [
        numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3), dtype=np.float32), "conv.weight"),
        numpy_helper.from_array(w_q, "fc.weight_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "fc.scale"),
        numpy_helper.from_array(np.array(0, np.int8), "fc.zero_point"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["p"], ["flat"], axis=1, name="flatten"),  # 32 * 4 * 4 = 512
        helper.make_node("DequantizeLinear", ["fc.weight_q", "fc.scale", "fc.zero_point"], ["fc.weight"], name="dq"),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["output"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16384])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    weight_bytes = w_q.nbytes
    del w_q
    gc.collect()

    tracemalloc.start()
    try:
        api.rewrite_model(model, output_stride=OUTPUT_STRIDE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < weight_bytes / 10, (
        f"the rewrite allocated {peak / 1e6:.1f} MB of Python-tracked memory for {weight_bytes / 1e6:.1f} MB of int8 weights"
    )
