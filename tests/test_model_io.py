"""model_io: streamed saving keeps every initializer bit for bit, in order, for every dtype."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from onnx_dense import model_io

TENSORS = [
    ("f32", np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)),
    ("f16", np.arange(7, dtype=np.float16)),
    ("f64", np.linspace(0, 1, 4)),
    ("i64", np.array([2, -3, 1 << 40], dtype=np.int64)),
    ("i8", np.array([-128, 0, 127], dtype=np.int8)),
    ("u8", np.arange(256, dtype=np.uint8)),
    ("b", np.array([True, False, True])),
    ("scalar", np.array(1.5, dtype=np.float32)),
    ("empty", np.zeros((0, 4), dtype=np.float32)),
]


def _model() -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(a, name) for name, a in TENSORS]
    inits.append(oh.make_tensor("bf16", onnx.TensorProto.BFLOAT16, [3], [1.0, -2.0, 0.5]))
    inits.append(oh.make_tensor("i4", onnx.TensorProto.INT4, [5], [1, -2, 3, -4, 7]))
    inits.append(oh.make_tensor("text", onnx.TensorProto.STRING, [2], [b"dense", b"maps"]))
    inits.append(onnx.numpy_helper.from_array(np.ones(1 << 18, dtype=np.float32), "big"))  # 1 MiB
    node = oh.make_node("Identity", ["x"], ["y"], name="id")
    graph = oh.make_graph(
        [node], "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])], inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)], producer_name="test")
    model.metadata_props.add(key="k", value="v")
    return model


def test_streamed_save_round_trips_every_initializer(tmp_path):
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    original = _model()
    onnx.save(original, str(src))
    model_io.save(model_io.load(src), dst)
    again = onnx.load(str(dst))
    onnx.checker.check_model(again)
    assert [i.name for i in again.graph.initializer] == [i.name for i in original.graph.initializer]
    for a, b in zip(original.graph.initializer, again.graph.initializer):
        assert a.data_type == b.data_type and list(a.dims) == list(b.dims), a.name
        x, y = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
        assert x.dtype == y.dtype, a.name
        assert (x.tolist() == y.tolist()) if x.dtype == object else (x.tobytes() == y.tobytes()), a.name
    assert {p.key: p.value for p in again.metadata_props} == {"k": "v"}
    assert again.producer_name == "test" and len(again.graph.node) == 1


def test_in_memory_tensors_are_streamed_too(tmp_path):
    model = ir.serde.deserialize_model(_model())
    model.graph.initializers["f32"].const_value = ir.tensor(np.full((3, 5), 7.0, np.float32), name="f32")
    model_io.save(model, tmp_path / "m.onnx")
    again = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert np.array_equal(again["f32"], np.full((3, 5), 7.0, np.float32))


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 1 << 32])
def test_varint(n):
    from google.protobuf.internal.decoder import _DecodeVarint

    assert _DecodeVarint(model_io._varint(n), 0) == (n, len(model_io._varint(n)))


def test_saved_model_gets_the_usual_file_mode(tmp_path):
    import os
    import stat

    src = tmp_path / "src.onnx"
    onnx.save(_model(), str(src))
    model_io.save(model_io.load(src), tmp_path / "out.onnx")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "out.onnx").st_mode) == 0o666 & ~mask
