"""The torch interpreter of ONNX graphs (onnx_dense.train.graph_module).

* forward equality with onnxruntime (graph optimisations off) on the rewrite's zoo: every
  family, dense at two output strides (one also at a size it was not rewritten for) and the
  original, BatchNorm kept, the TorchScript exporter for all and the dynamo exporter for
  AlexNet (shape arguments and scalars as initializers; its other graphs add no op);
* small graphs for the semantics the zoo does not reach (pads past kernel/2, ceil_mode,
  count_include_pad=0 with dilations, auto_pad SAME with dilations, Pad modes, Slice steps...);
* gradients: torch.autograd.gradcheck in float64 through dilated Conv, MaxPool, AveragePool,
  BatchNorm and Gemm, for the input and the weights;
* ONNX names, trainable/buffer roles, state dicts, clear errors; no torch on `import onnx_dense`.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest
import torch

import onnx_dense
from onnx_dense.errors import DenseError
from onnx_dense.train.graph_module import SUPPORTED_OPS, OnnxGraphModule

from _train_fixtures import export_zoo, input_shape, ort_run, shared_root

torch.set_num_threads(1)  # two xdist workers on two cores

MAX_STRIDE = {
    "vgg": 32, "fcn": 16, "resnet": 32, "mobilenetv2": 32, "inception": 16, "alexnet": 32, "conv1d": 8,
    "resnet_bottleneck": 32, "inception_3x3": 16, "alexnet_lrn": 32,
}
# The dynamo exporter's graphs differ in kind, not in ops: shape arguments and LRN's scalars as
# initializers rather than Constant nodes. AlexNet (its LRN decomposition) has all of them.
DYNAMO = ("alexnet",)
CASES = [(n, "torchscript") for n in MAX_STRIDE] + [(n, "dynamo") for n in DYNAMO]


def _strides(name):
    return sorted({min(4, MAX_STRIDE[name]), MAX_STRIDE[name] // 2})


def _close(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-5):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= rtol * scale + 1e-7, f"max abs diff {err:.3e}, {err / scale:.3e} of max|ref| {scale:.3e}"


def _compare(path, extras=(0,), seed=0):
    """The module built from ``path`` against onnxruntime, at the static size plus each of ``extras``."""
    module = OnnxGraphModule(path).eval()
    for k, extra in enumerate(extras):
        name, shape = input_shape(path, extra)
        x = np.random.default_rng(seed + k).standard_normal(shape).astype(np.float32)
        ref = ort_run(path, {name: x})
        with torch.no_grad():
            got = module.run({name: torch.from_numpy(x)})
        for out_name, r in zip(module.output_names, ref):
            _close(got[out_name].numpy(), r)
    return module


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    return shared_root(tmp_path_factory)


@pytest.mark.parametrize("name, exporter", CASES)
def test_zoo_forward_equals_onnxruntime(name, exporter, zoo_root, tmp_path):
    src = export_zoo(zoo_root, name, exporter)
    ops = set()
    module = _compare(src)  # the original runs too: a general interpreter
    ops |= {n.op_type for n in onnx.load(src).graph.node}
    for i, stride in enumerate(_strides(name)):
        dst = tmp_path / f"dense{stride}.onnx"
        onnx_dense.rewrite(src, dst, output_stride=stride)
        module = _compare(dst, extras=(0, 5) if i == 0 else (0,))  # dense models run at any size
        ops |= {n.op_type for n in onnx.load(str(dst)).graph.node}
        assert module.state_dict_onnx(), "no weights"
    assert ops <= SUPPORTED_OPS


# ---------------------------------------------------------------------------------------------
# small graphs
# ---------------------------------------------------------------------------------------------

SMALL = {
    "maxpool pads past kernel/2, dilated, ceil": (
        "MaxPool <kernel_shape=[3,3], pads=[2,2,1,2], dilations=[2,3], strides=[2,1], ceil_mode=1> (x)", [1, 2, 13, 12]),
    "maxpool 1-D": ("MaxPool <kernel_shape=[3], pads=[2,2], strides=[2]> (x)", [1, 2, 17]),
    "avgpool count pads, dilated": (
        "AveragePool <kernel_shape=[3,2], pads=[2,1,2,1], dilations=[2,2], count_include_pad=1> (x)", [1, 2, 11, 10]),
    "avgpool no count pads, dilated": (
        "AveragePool <kernel_shape=[3,3], pads=[2,1,2,1], dilations=[2,1], count_include_pad=0> (x)", [1, 2, 11, 10]),
    "avgpool ceil": ("AveragePool <kernel_shape=[3,3], strides=[2,2], ceil_mode=1> (x)", [1, 2, 10, 10]),
    "avgpool ceil pads": (
        "AveragePool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1], ceil_mode=1, count_include_pad=1> (x)",
        [1, 2, 10, 10]),
    "avgpool 3-D (LRN style)": ("AveragePool <kernel_shape=[5,1,1], dilations=[1,2,2]> (x)", [1, 1, 8, 6, 6]),
    "maxpool SAME_UPPER": ("MaxPool <kernel_shape=[3,3], strides=[2,2], auto_pad=\"SAME_UPPER\"> (x)", [1, 2, 9, 8]),
    "global average": ("GlobalAveragePool (x)", [2, 3, 5, 4]),
    "global max": ("GlobalMaxPool (x)", [2, 3, 5, 4]),
    "lrn": ("LRN <size=3, alpha=0.001, beta=0.75, bias=1.5> (x)", [1, 7, 4, 4]),
    "softmax axis 1": ("Softmax <axis=1> (x)", [2, 5, 3]),
    "logsoftmax": ("LogSoftmax <axis=-1> (x)", [2, 5, 3]),
    "hardswish": ("HardSwish (x)", [2, 8]),
    "hardsigmoid": ("HardSigmoid <alpha=0.3, beta=0.4> (x)", [2, 8]),
    "sigmoid": ("Sigmoid (x)", [2, 8]),
    "leakyrelu": ("LeakyRelu <alpha=0.2> (x)", [2, 8]),
    "transpose": ("Transpose <perm=[0,2,3,1]> (x)", [1, 2, 3, 4]),
    "flatten 2": ("Flatten <axis=2> (x)", [2, 3, 4, 5]),
    "reduce mean": ("ReduceMean <keepdims=0> (x, axes)", [2, 3, 4, 5], {"axes": np.array([2, -1], np.int64)}),
    "reduce max": ("ReduceMax <keepdims=1> (x, axes)", [2, 3, 4, 5], {"axes": np.array([1], np.int64)}),
    "argmax": ("ArgMax <axis=1, keepdims=0> (x)", [2, 5, 3]),
    "slice negative step": (
        "Slice (x, starts, ends, axes, steps)", [2, 3, 9, 7],
        {"starts": np.array([-2, 1], np.int64), "ends": np.array([-100, 7], np.int64),
         "axes": np.array([2, 3], np.int64), "steps": np.array([-2, 3], np.int64)}),
    "pad reflect": ("Pad <mode=\"reflect\"> (x, pads)", [1, 2, 6, 5], {"pads": np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64)}),
    "pad edge": ("Pad <mode=\"edge\"> (x, pads)", [1, 2, 6, 5], {"pads": np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64)}),
    "pad constant negative": (
        "Pad (x, pads, value)", [1, 2, 6, 5],
        {"pads": np.array([0, 0, 2, -1, 0, 0, -2, 3], np.int64), "value": np.array(-1.5, np.float32)}),
    "gemm transA": ("Gemm <transA=1, alpha=0.5, beta=2.0> (x, w, b)", [4, 3],
                    {"w": np.ones((4, 6), np.float32) * 0.25, "b": np.arange(6, dtype=np.float32)}),
    "gather negative": ("Gather <axis=1> (x, idx)", [2, 5, 3], {"idx": np.array([[-1, 0], [2, 1]], np.int64)}),
    "expand": ("Expand (x, shape)", [3, 1], {"shape": np.array([2, 3, 4], np.int64)}),
    "tile": ("Tile (x, reps)", [2, 3], {"reps": np.array([2, 1], np.int64)}),
    "where": ("Where (c, x, x2)", [2, 3], {"c": np.array([[True, False, True], [False, True, True]]),
                                          "x2": np.full((2, 3), 7.0, np.float32)}),
    "clip": ("Clip (x, lo, hi)", [2, 8], {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}),
    "prelu": ("PRelu (x, slope)", [2, 3, 4], {"slope": np.array([[0.1], [0.2], [0.3]], np.float32)}),
    "shape slice": ("Shape <start=1, end=-1> (x)", [2, 3, 4, 5]),
    "resize nearest half_pixel": (
        "Resize <mode=\"nearest\"> (x, , scales)", [1, 2, 5, 6], {"scales": np.array([1, 1, 2.5, 1.5], np.float32)}),
    "resize linear half_pixel sizes": (
        "Resize <mode=\"linear\"> (x, , , sizes)", [1, 2, 5, 6], {"sizes": np.array([1, 2, 11, 4], np.int64)}),
    "resize linear align_corners": (
        "Resize <mode=\"linear\", coordinate_transformation_mode=\"align_corners\"> (x, , scales)", [1, 2, 5, 6],
        {"scales": np.array([1, 1, 2, 3], np.float32)}),
    "resize nearest asymmetric floor": (
        "Resize <mode=\"nearest\", coordinate_transformation_mode=\"asymmetric\", nearest_mode=\"floor\"> (x, , scales)",
        [1, 2, 5, 6], {"scales": np.array([1, 1, 3, 0.5], np.float32)}),
    "hardmax": ("Hardmax <axis=1> (x)", [2, 5, 3]),
    "lpnorm": ("LpNormalization <axis=1, p=2> (x)", [2, 5, 3]),
}


def _small_model(body: str, shape, consts: dict | None):
    text = f"""
    <ir_version: 9, opset_import: ["" : 20]>
    g (float[{','.join(map(str, shape))}] x) => (y) {{
        y = {body}
    }}
    """
    model = onnx.parser.parse_model(text)
    for k, v in (consts or {}).items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(v, k))
    return model


@pytest.mark.parametrize("case", list(SMALL))
def test_small_graph_equals_onnxruntime(case, tmp_path):
    body, shape, *rest = SMALL[case]
    model = _small_model(body, shape, rest[0] if rest else None)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    (ref,) = ort_run(path, {"x": x})
    with torch.no_grad():
        got = OnnxGraphModule(model)(torch.from_numpy(x))
    if ref.dtype == np.float32:
        _close(got.numpy(), ref)
    else:
        np.testing.assert_array_equal(got.numpy(), ref)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------

GRAD_NET = """
<ir_version: 9, opset_import: ["" : 20]>
g (double[2,2,9,8] x) => (y)
  <double[3,2,3,3] w1, double[3] b1, double[3] s, double[3] bb, double[3] m, double[3] v, double[4,3] w2, double[4] b2> {
    c = Conv <dilations=[2,1], pads=[2,1,3,2]> (x, w1, b1)
    n = BatchNormalization <epsilon=0.001> (c, s, bb, m, v)
    r = Relu (n)
    p = MaxPool <kernel_shape=[2,3], dilations=[2,2], pads=[2,3,2,3]> (r)
    a = AveragePool <kernel_shape=[3,2], dilations=[2,3], pads=[2,3,1,2], count_include_pad=0> (p)
    gp = GlobalAveragePool (a)
    f = Flatten (gp)
    y = Gemm <transB=1> (f, w2, b2)
}
"""


def test_gradcheck_float64():
    model = onnx.parser.parse_model(GRAD_NET)
    rng = np.random.default_rng(0)
    shapes = {"w1": (3, 2, 3, 3), "b1": (3,), "s": (3,), "bb": (3,), "m": (3,), "v": (3,), "w2": (4, 3), "b2": (4,)}
    for name, shape in shapes.items():
        value = rng.uniform(0.5, 1.5, shape) if name == "v" else rng.standard_normal(shape)
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float64), name))
    module = OnnxGraphModule(model).eval()
    params = dict(module.named_parameters_onnx())
    assert set(params) == {"w1", "b1", "s", "bb", "w2", "b2"}  # m, v: BatchNorm statistics, buffers
    attrs = module.onnx_names()
    x = torch.from_numpy(rng.standard_normal((2, 2, 9, 8))).requires_grad_(True)
    w1 = params["w1"].detach().clone().requires_grad_(True)
    w2 = params["w2"].detach().clone().requires_grad_(True)

    def f(x, w1, w2):
        return torch.func.functional_call(module, {attrs["w1"]: w1, attrs["w2"]: w2}, (x,))

    assert torch.autograd.gradcheck(f, (x, w1, w2), eps=1e-6, atol=1e-5)
    # and the same through the module's own parameters
    module.zero_grad()
    module(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# names, roles, errors
# ---------------------------------------------------------------------------------------------

ROLES_NET = """
<ir_version: 9, opset_import: ["" : 20]>
g (float[1,2,6,6] x) => (y) {
    c = Conv <pads=[1,1,1,1]> (x, conv_0_weight)
    n = BatchNormalization (c, bn_weight, bn_bias, bn_running_mean, bn_running_var)
    k = Clip (n, lo, hi)
    s = Mul (k, alpha)
    y = Reshape (s, shape)
}
"""


def _roles_model():
    """Names with dots, as the exporters write them (the text format does not allow them)."""
    model = onnx.parser.parse_model(ROLES_NET)
    rename = {"conv_0_weight": "conv.0.weight", "bn_weight": "bn.weight", "bn_bias": "bn.bias",
              "bn_running_mean": "bn.running_mean", "bn_running_var": "bn.running_var"}
    for node in model.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    rng = np.random.default_rng(0)
    values = {
        "conv.0.weight": rng.standard_normal((4, 2, 3, 3)), "bn.weight": rng.uniform(0.5, 1.5, 4),
        "bn.bias": rng.standard_normal(4), "bn.running_mean": rng.standard_normal(4),
        "bn.running_var": rng.uniform(0.5, 1.5, 4), "lo": np.array(0.0), "hi": np.array(6.0), "alpha": np.array(0.5),
    }
    for name, value in values.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
    return model


def test_names_roles_and_state_dict():
    model = _roles_model()
    module = OnnxGraphModule(model)
    trainable = dict(module.named_parameters_onnx())
    assert set(trainable) == {"conv.0.weight", "bn.weight", "bn.bias"}
    state = module.state_dict_onnx()
    assert set(state) == {"conv.0.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "lo", "hi", "alpha"}
    assert all("." not in k for k in module.state_dict())  # escaped for nn.Module
    np.testing.assert_array_equal(state["conv.0.weight"].numpy(), onnx.numpy_helper.to_array(model.graph.initializer[0]))
    # round trip and refusals
    new = {k: v + 1 for k, v in state.items()}
    module.load_state_dict_onnx(new)
    assert torch.equal(module.state_dict_onnx()["conv.0.weight"], new["conv.0.weight"])
    with pytest.raises(DenseError, match="shape"):
        module.load_state_dict_onnx({**new, "conv.0.weight": torch.zeros(4, 2, 5, 5)})
    with pytest.raises(DenseError, match="missing"):
        module.load_state_dict_onnx({"conv.0.weight": new["conv.0.weight"]})
    # an explicit choice of trainable tensors
    only = OnnxGraphModule(model, trainable={"conv.0.weight"})
    assert [n for n, _ in only.named_parameters_onnx()] == ["conv.0.weight"]


def test_batchnorm_inference_by_default_trainable_on_request():
    model = _roles_model()
    x = torch.randn(4, 2, 6, 6)
    frozen = OnnxGraphModule(model).train()
    before = frozen.state_dict_onnx()["bn.running_mean"].clone()
    frozen(x).sum().backward()
    assert torch.equal(frozen.state_dict_onnx()["bn.running_mean"], before)
    live = OnnxGraphModule(model, train_bn=True).train()
    live(x).sum().backward()
    assert not torch.equal(live.state_dict_onnx()["bn.running_mean"], before)


def test_unsupported_op_names_the_node():
    text = """
    <ir_version: 9, opset_import: ["" : 20]>
    g (float[1,2,4,4] x) => (y) {
        y = GridSample (x, x)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.node[0].name = "my_grid_sample"
    with pytest.raises(DenseError, match=r"node 'my_grid_sample' \(GridSample\).*not supported"):
        OnnxGraphModule(model)


def test_run_time_error_names_the_node():
    model = _roles_model()
    module = OnnxGraphModule(model)
    with pytest.raises(DenseError, match=r"\(Conv\)"):
        module(torch.randn(1, 3, 6, 6))


def test_import_does_not_import_torch():
    code = "import onnx_dense.cli, onnx_dense.api, onnx_dense.train; import sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
