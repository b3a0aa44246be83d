"""benchmarks/public_sweep.py on one public family (slow; needs the ``sweep`` extra: timm).

The sweep's oracle is the torch model on shifted crops, independent of ``verify``; a ResNet-D
trunk exercises the ceil_mode AvgPool shortcut, at both strategies.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "public_sweep.py"


@functools.cache
def _load_script():
    spec = importlib.util.spec_from_file_location("public_sweep", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["public_sweep"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("strategy", ["dilate", "fragments"])
def test_resnet_d_trunk_is_exact_against_torch(strategy, tmp_path):
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip("needs the sweep extra (timm, torchvision)")
    public_sweep = _load_script()

    module = public_sweep._randomise(public_sweep.FAMILIES["resnet18d"][0]()).eval()
    side = public_sweep._auto_side(module, "torchscript", 32, 16, tmp_path)
    row = public_sweep.check(module, "torchscript", 16, strategy, side, tmp_path, max_phases=3)
    assert row["result"] == "exact", row
    assert row["phases_compared"] == 4 and row["max_abs_end_border"] <= 1e-4 * row["scale"], row


@pytest.mark.parametrize("family", ["resnet18d", "densenet121", "googlenet"])
def test_a_public_trunk_tiles_exactly(family, tmp_path):
    """The tiled trunk (phases, stage 0 on tiles) on public families' trunks, whose fields the
    rewrite recorded: ceil_mode AvgPool shortcuts, dense concatenation, inception branches."""
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip("needs the sweep extra (timm, torchvision)")
    import numpy as np
    import onnx
    import onnx_ir as ir

    import onnx_dense
    from onnx_dense.runtime import DenseSession
    from samples.export import export_onnx

    public_sweep = _load_script()
    module = public_sweep._randomise(public_sweep.FAMILIES[family][0]()).eval()
    export_onnx(module, (1, 3, 224, 224), tmp_path / "m.onnx", exporter="torchscript")
    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(onnx.load(str(tmp_path / "m.onnx")), output_stride=4))
    x = np.random.default_rng(0).standard_normal((1, 3, 421, 389)).astype(np.float32)
    whole = DenseSession(dense, provider="cpu").run(x)
    session = DenseSession(dense, provider="cpu", schedule="tiled-trunk")
    got = session.run(x)
    assert session.last_schedule.kind == "tiled-trunk" and session.last_schedule.tiles > 1
    for name, want in whole.items():
        w = want.numpy()
        assert got[name].numpy().shape == w.shape
        assert np.abs(got[name].numpy() - w).max() <= 1e-6 * np.abs(w).max(), name
