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
