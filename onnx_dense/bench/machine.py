"""The machine a benchmark ran on, named in every result."""

from __future__ import annotations

import math
import os
import platform

import numpy as np
import onnx

def machine_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
            mem = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    load = None
    if hasattr(os, "getloadavg"):
        load = [round(v, 2) for v in os.getloadavg()]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "numpy": np.__version__, "load_average": load,
    }

def _finite(value):
    """JSON has no inf/nan: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value



