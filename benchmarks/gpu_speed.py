"""GPU speed of dense models: ORT CUDA EP and the same graphs in PyTorch, against undilated twins.

The GPU part of the speed benchmark (benchmarks/README.md, "GPU"). For every case of
``dense_speed.py`` (the same exports, rewrites and output strides) plus ``vgg16-fc-256``,
the paper's setting (VGG-16 classifier at 256x256, output stride 8 = pool4 stride 1, the
head as a convolution), each row times three graphs:

* ``original``: the original as ``onnx_dense.bench`` runs it (cut to the dense model's outputs,
  made size-flexible when run at another size than its export);
* ``dense``: ``onnx-dense rewrite`` at the row's output stride;
* ``twin``: ``onnx_dense.bench.undilated_twin(dense)``: every dilation 1, same map sizes, same
  FLOPs. Its TFLOP/s is this GPU's convolution throughput on an undilated model of the same
  size, so dense TFLOP/s / twin TFLOP/s is what dilation costs here.

Two frameworks, each timed round-robin (the order rotating every round), medians after warm-up:

* ORT with the CUDA execution provider (``--device cpu``: the CPU provider), graph
  optimisations on, ``OrtRunner``'s CUDA settings (``cuda_options(fixed_shapes=True)``:
  cuDNN EXHAUSTIVE search, max workspace), inputs and outputs bound on the device (IOBinding,
  outputs preallocated after the first run), the clock stopped after the run and
  ``synchronize_outputs``;
* PyTorch: the same three graphs through ``OnnxGraphModule`` (the node-by-node interpreter the
  trainer uses) in eval mode under ``inference_mode``, ``torch.backends.cudnn.benchmark = True``,
  timed with CUDA events (``perf_counter`` on the CPU).

Shift-and-stitch, the equality checks (dense subgrid = original, stitched = dense) and the
prediction and FLOP counts come from one ``onnx_dense.bench.bench(provider=...)`` run per row
(numpy in and out, as the CPU table). Further checks: the twin's outputs have the dense
model's shapes and its FLOPs equal the dense model's; PyTorch's original and dense outputs
equal ORT's (relative to the largest value; looser when TF32 is on).

Run (on a machine with onnxruntime-gpu and a CUDA torch; the runbook in benchmarks/README.md):

    python benchmarks/gpu_speed.py --json gpu.json          # all rows; 4-7 min on an H100 (estimate)
    python benchmarks/gpu_speed.py --device cpu --only fcn-64 --repeat 1   # smoke run, seconds
    # --only vgg16-fc-256,fcn-512  --repeat N  --tf32 on|off  --budget S  --tables gpu.json

Exit status: 0, 1 if any check failed or any row could not be measured, 2 for bad arguments
or a device that is not there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

import dense_speed  # noqa: E402
from dense_speed import Case  # noqa: E402

#: The paper's VGG-16 numbers on 256x256: one pass 44 ms, dense (pool4 stride 1) 132 ms, 240x the predictions.
PAPER = {"original_ms": 44.0, "dense_ms": 132.0, "time_ratio": 3.0, "prediction_ratio": 240.0}
PAPER_CASE = Case("vgg16-fc-256", "VGG-16 classifier, head as conv (paper)", 256, (8,), 20)
CASES = [*dense_speed.CASES, PAPER_CASE]
#: Run the cheapest row first (a broken setup shows at once), then the paper's, then the rest.
RUN_ORDER = ["fcn-64", PAPER_CASE.name, *[c.name for c in dense_speed.CASES if c.name != "fcn-64"]]
GRAPHS = ("original", "dense", "twin")
#: PyTorch vs ORT output tolerance, relative to max|ORT output|: fp32 everywhere / TF32 in either framework.
TOL_FP32 = {"cpu": 1e-4, "cuda": 1e-3}
TOL_TF32 = 2e-2


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def round_robin(fns: dict[str, Callable[[], float]], warmup: int, repeat: int) -> dict[str, list[float]]:
    """ms of each, ``repeat`` rounds after ``warmup`` untimed runs each; the order rotates per round so
    that drift and other work on the machine slow all alike. Each fn runs once and returns its ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    order = list(fns)
    times: dict[str, list[float]] = {k: [] for k in order}
    for r in range(repeat):
        shift = r % len(order)
        for k in order[shift:] + order[:shift]:
            times[k].append(fns[k]())
    return times


class OrtBound:
    """One ORT session timed with inputs and outputs kept on the device (IOBinding)."""

    def __init__(self, model, feeds: dict[str, np.ndarray], device: str, threads: int | None, tf32: str):
        import onnxruntime as ort

        from onnx_dense.errors import DenseError
        from onnx_dense.runtime.session import PROVIDERS, cuda_options, preload_cuda, set_spinning

        ep = PROVIDERS[device]
        providers: list = [ep]
        if device == "cuda":
            options = cuda_options(fixed_shapes=True)
            if tf32 != "default":
                options["use_tf32"] = "1" if tf32 == "on" else "0"
            providers = [(ep, options)]
            preload_cuda()
        source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        self.cpu_nodes = None  # on CUDA: whether ORT had to place some nodes on the CPU
        for strict in ((True, False) if device == "cuda" else (False,)):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if threads:
                so.intra_op_num_threads = threads
            set_spinning(so, False)  # no session's idle workers slow the next one (benchmarks/README.md)
            if strict:
                so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            try:
                self.session = ort.InferenceSession(source, so, providers=providers, enable_fallback=0)
            except Exception as exc:
                if strict:
                    continue
                raise DenseError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None
            self.cpu_nodes = (not strict) if device == "cuda" else None
            break
        if self.session.get_providers()[0] != ep:
            raise DenseError(f"onnxruntime did not start {ep} (got {', '.join(self.session.get_providers())})")
        self.provider_options = self.session.get_provider_options().get(ep, {})
        self.device = device
        self.binding = self.session.io_binding()
        self.names = [o.name for o in self.session.get_outputs()]
        for i in self.session.get_inputs():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[i.name]), device, 0)
            self.binding.bind_ortvalue_input(i.name, value)
        for name in self.names:
            self.binding.bind_output(name, device, 0)
        self._preallocated = False

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        ms = (time.perf_counter() - t0) * 1000
        if not self._preallocated:  # later runs write into the first run's outputs: no allocation timed
            for name, value in zip(self.names, self.binding.get_outputs()):
                self.binding.bind_ortvalue_output(name, value)
            self._preallocated = True
        return ms

    def outputs(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.binding.copy_outputs_to_cpu()))


class TorchTimed:
    """One graph in PyTorch (``OnnxGraphModule``), inputs on the device, timed with CUDA events."""

    def __init__(self, model, feeds: dict[str, np.ndarray], device: str):
        import torch

        from onnx_dense.train.graph_module import OnnxGraphModule

        self.torch = torch
        self.module = OnnxGraphModule(model).to(device).eval()
        self.feeds = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()}
        self.device = device
        self.last: dict | None = None

    def __call__(self) -> float:
        torch = self.torch
        with torch.inference_mode():
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.last = self.module.run(self.feeds)
                end.record()
                end.synchronize()
                return float(start.elapsed_time(end))
            t0 = time.perf_counter()
            self.last = self.module.run(self.feeds)
            return (time.perf_counter() - t0) * 1000

    def outputs(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in self.last.items()}


# --------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    device: str
    repeat: int | None  # None: the case's own (CPU) or DEFAULT_CUDA_REPEAT
    warmup: int
    threads: int | None
    tf32: str  # "default", "on", "off"
    settle: float  # bench's pause before each timed pass (CPU: ORT's spinning threads)


DEFAULT_CUDA_REPEAT = 20


def tflops(flops: int | None, ms: float | None) -> float | None:
    """FLOPs / time in TFLOP/s."""
    return flops / ms / 1e9 if flops and ms else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    from onnx_dense.errors import DenseError

    return text if isinstance(exc, DenseError) else f"{type(exc).__name__}: {text}"


def _stats(times: dict[str, list[float]], flops: dict[str, int | None]) -> dict:
    """Medians, minima, TFLOP/s and the ratios of one framework's three timings."""
    ms = {k: float(np.median(v)) for k, v in times.items()}
    rate = {k: tflops(flops.get(k), ms[k]) for k in ms}
    return {
        "ms": ms, "min_ms": {k: float(np.min(v)) for k, v in times.items()}, "times_ms": times, "tflops": rate,
        "dilation_efficiency": _ratio(rate["dense"], rate["twin"]),  # dense TFLOP/s / twin TFLOP/s
        "dense_over_original_time": _ratio(ms["dense"], ms["original"]),
        "dense_over_twin_time": _ratio(ms["dense"], ms["twin"]),
    }


def _check(name: str, passed: bool, detail: str, **numbers) -> dict:
    return {"check": name, "passed": bool(passed), "detail": detail, **numbers}


def _compare(name: str, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], tolerance: float) -> dict:
    """max|reference - actual| / max|reference| over the outputs."""
    worst = 0.0
    for k, ref in reference.items():
        got = actual.get(k)
        if got is None or got.shape != ref.shape:
            return _check(name, False, f"output {k}: shape {None if got is None else list(got.shape)} vs {list(ref.shape)}")
        scale = float(np.max(np.abs(ref))) or 1.0
        worst = max(worst, float(np.max(np.abs(ref.astype(np.float64) - got))) / scale)
    return _check(name, worst <= tolerance, f"max rel {worst:.2e} (tol {tolerance:.0e})", max_rel=worst, tolerance=tolerance)


def measure_row(case: Case, stride: int, original: Path, dense: Path, shapes, settings: Settings, info: dict) -> dict:
    """Every number of one row; raises for what makes the whole row impossible (the caller reports it)."""
    import onnx

    from onnx_dense.bench import DEFAULT_RTOL, bench, count_flops, load_pair, undilated_twin
    from onnx_dense.bench.driver import _uses_external_data

    device, repeat = settings.device, settings.repeat or (DEFAULT_CUDA_REPEAT if settings.device == "cuda" else case.repeat)
    say = _progress
    t0 = time.time()
    # bench's sessions (OrtRunner) keep ORT's default use_tf32: on a GPU with TF32 its checks get the TF32 tolerance
    rtol = TOL_TF32 if (info.get("gpu") or {}).get("capability", [0])[0] >= 8 else DEFAULT_RTOL
    result = bench(
        original, dense, input_shapes=shapes, provider=device, threads=settings.threads, repeat=repeat,
        warmup=settings.warmup, settle=settings.settle, spinning=False if device == "cuda" else None, rtol=rtol,
    )
    o, d, s = result.get("original"), result.get("dense"), result.get("shift-and-stitch")
    row: dict = {"case": case.name, "label": case.label, "size": case.size, "output_stride": stride, "repeat": repeat}
    row["bench_rtol"] = rtol
    row["bench"] = result.to_dict()
    row["est"] = result.est
    row["inputs"] = result.inputs
    row["predictions"] = {"original": o.predictions, "dense": d.predictions, "shift-and-stitch": s.predictions if s else None}
    checks = [dict(dataclasses.asdict(c), passed=c.passed, detail=c.line()) for c in result.checks]
    say(f"#   r{stride}: bench (host I/O) done in {time.time() - t0:.0f} s")

    pair = load_pair(original, dense, input_shapes=shapes)
    feeds = pair.feeds
    dense_full = onnx.load(str(pair.dense)) if _uses_external_data(pair.dense_proto) else pair.dense_proto
    in_shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    twin = undilated_twin(dense_full, in_shapes)
    flops = {"original": o.flops, "dense": d.flops, "twin": count_flops(twin, in_shapes)[0]}
    row["flops"] = flops
    row["twin"] = {"slices": sum(n.op_type == "Slice" and n.name.startswith("onnx_dense_twin_") for n in twin.graph.node)}
    checks.append(_check(
        "twin FLOPs", flops["twin"] is not None and flops["twin"] == flops["dense"],
        f"twin {flops['twin']} vs dense {flops['dense']}",
    ))
    models = {"original": pair.original, "dense": pair.dense, "twin": twin}

    ort_out: dict[str, dict] = {}
    runs: dict = {}
    try:
        t1 = time.time()
        runs = {k: OrtBound(m, feeds, device, settings.threads, settings.tf32) for k, m in models.items()}
        stats = _stats(round_robin(runs, max(1, settings.warmup), repeat), flops)
        stats["cpu_nodes"] = {k: r.cpu_nodes for k, r in runs.items()}
        stats["provider_options"] = runs["dense"].provider_options
        info.setdefault("ort_provider_options", runs["dense"].provider_options)
        ort_out = {k: r.outputs() for k, r in runs.items()}
        row["ort"] = stats
        checks.append(_twin_shapes("twin shapes (ORT)", ort_out))
        say(f"#   r{stride}: ORT {_fmt(stats)} ({time.time() - t1:.0f} s)")
    except Exception as exc:
        row["ort"] = {"error": _one_line(exc)}
        say(f"#   r{stride}: ORT failed: {row['ort']['error']}")
    finally:
        runs.clear()  # the sessions and their device memory go before PyTorch's turn

    import torch

    try:
        t1 = time.time()
        runs = {k: TorchTimed(m, feeds, device) for k, m in models.items()}
        stats = _stats(round_robin(runs, max(1, settings.warmup), repeat), flops)
        torch_out = {k: r.outputs() for k, r in runs.items()}
        row["torch"] = stats
        checks.append(_twin_shapes("twin shapes (PyTorch)", torch_out))
        if ort_out:
            tol = TOL_TF32 if info.get("tf32_in_use") else TOL_FP32[device]
            for k in ("original", "dense"):
                c = _compare(f"PyTorch = ORT ({k})", ort_out[k], torch_out[k], tol)
                stats.setdefault("max_rel_vs_ort", {})[k] = c.get("max_rel")
                checks.append(c)
        say(f"#   r{stride}: PyTorch {_fmt(stats)} ({time.time() - t1:.0f} s)")
    except Exception as exc:
        row["torch"] = {"error": _one_line(exc)}
        say(f"#   r{stride}: PyTorch failed: {row['torch']['error']}")
    finally:
        runs.clear()
        if device == "cuda":
            torch.cuda.empty_cache()

    row["ratios"] = {
        "dense_over_original_predictions": _ratio(d.predictions, o.predictions),
        "dense_over_original_flops": _ratio(d.flops, o.flops),
        "stitch_over_dense_time_host_io": result.stitch_ratio,
    }
    if case.name == PAPER_CASE.name:
        row["paper"] = paper_comparison(row)
    row["checks"] = checks
    row["passed"] = all(c["passed"] for c in checks) and "error" not in row["ort"] and "error" not in row["torch"]
    row["seconds"] = time.time() - t0
    return row


def _twin_shapes(name: str, outputs: dict[str, dict[str, np.ndarray]]) -> dict:
    dense = {k: list(v.shape) for k, v in outputs["dense"].items()}
    twin = {k: list(v.shape) for k, v in outputs["twin"].items()}
    return _check(name, dense == twin, f"twin {twin} vs dense {dense}", dense_shapes=dense, twin_shapes=twin)


def paper_comparison(row: dict) -> dict:
    """Our dense/original time and prediction ratios against the paper's 3x and 240x, per framework."""
    pred = row["ratios"]["dense_over_original_predictions"]
    out = {"paper": PAPER, "prediction_ratio": pred, "prediction_ratio_over_paper": _ratio(pred, PAPER["prediction_ratio"])}
    for fw in ("ort", "torch"):
        stats = row.get(fw, {})
        if "ms" not in stats:
            continue
        time_ratio = stats["dense_over_original_time"]
        out[fw] = {
            "original_ms": stats["ms"]["original"], "dense_ms": stats["ms"]["dense"], "time_ratio": time_ratio,
            "time_ratio_over_paper": _ratio(time_ratio, PAPER["time_ratio"]),
        }
    return out


def _fmt(stats: dict) -> str:
    ms, rate = stats["ms"], stats["tflops"]
    return (
        f"ms o/d/twin {ms['original']:.2f}/{ms['dense']:.2f}/{ms['twin']:.2f}, TFLOP/s d/twin "
        f"{_num(rate['dense'], '.3f')}/{_num(rate['twin'], '.3f')}, dense/twin per FLOP {_num(stats['dilation_efficiency'], '.2f')}"
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# machine and frameworks
# --------------------------------------------------------------------------------------------


def setup(settings: Settings) -> dict:
    """Apply the framework settings and say what they are (every number in the JSON depends on them)."""
    import onnxruntime as ort
    import torch

    from onnx_dense.bench import machine_info

    torch.backends.cudnn.benchmark = True
    if settings.device == "cpu" and settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.tf32 != "default":
        set_tf32(settings.tf32 == "on")
    info = machine_info()

    def read(get):
        """A torch setting, or why it could not be read (the TF32 API changed in torch 2.9)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return get()
            except Exception as exc:
                return f"unreadable: {_one_line(exc)}"

    info["torch"] = {
        "version": torch.__version__, "cuda": torch.version.cuda, "cudnn": read(torch.backends.cudnn.version),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": read(lambda: torch.backends.cudnn.allow_tf32),
        "cudnn_conv_fp32_precision": read(lambda: torch.backends.cudnn.conv.fp32_precision),
        "matmul_allow_tf32": read(lambda: torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": read(torch.get_float32_matmul_precision), "threads": torch.get_num_threads(),
    }
    info["onnxruntime_providers"] = ort.get_available_providers()
    info["python_executable"] = sys.executable
    info["gpu"] = gpu_info() if settings.device == "cuda" else None
    info["tf32_setting"] = settings.tf32
    return info


def set_tf32(on: bool) -> None:
    """TF32 for fp32 convolutions and matrix products in torch, through whichever API this torch accepts."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.backends.cudnn.allow_tf32 = on
            torch.backends.cuda.matmul.allow_tf32 = on
        except RuntimeError:  # torch >= 2.9 refuses the legacy flags once the new API is in use
            torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
            torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"


def gpu_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {
        "name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        fields = [f.strip() for f in smi.stdout.strip().splitlines()[0].split(",")]
        info.update(driver=fields[0], max_sm_clock=fields[1], max_mem_clock=fields[2], power_limit=fields[3])
    except (OSError, IndexError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def _tf32_in_use(info: dict) -> bool:
    """Whether either framework may run fp32 convolutions in TF32 (Ampere and later)."""
    gpu = info.get("gpu")
    if not gpu or gpu["capability"][0] < 8:
        return False
    ort_tf32 = info.get("ort_provider_options", {}).get("use_tf32", "1" if info["tf32_setting"] != "off" else "0")
    return info["torch"]["cudnn_allow_tf32"] is not False or ort_tf32 == "1"


def check_device(device: str) -> str | None:
    """Why ``device`` cannot run this benchmark, or None."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device; use --device cpu for the smoke run"
    import onnxruntime as ort

    from onnx_dense.runtime.session import preload_cuda

    preload_cuda()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} at {Path(ort.__file__).parent} has no CUDAExecutionProvider; install "
            "onnxruntime-gpu first (../shared/tools/ortgpu/prepare.sh, benchmarks/README.md 'GPU')"
        )
    return None


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _num(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _key(row: dict) -> str:
    est = row.get("est") or []
    e = str(est[0]) if len(set(est)) == 1 else "x".join(map(str, est)) or "?"
    return f"| {row['label']} | {row['size']} | {row['output_stride']} ({e}) |"


def tables(data: dict) -> str:
    """Markdown: the header, ORT, PyTorch, the paper comparison, then rows that failed or were skipped."""
    info, rows = data["machine"], sorted(data["rows"], key=lambda r: _display_index(r))
    good = [r for r in rows if "error" not in r]
    repeats = sorted({r["repeat"] for r in good}, reverse=True)
    gpu = info.get("gpu") or {}
    t = info.get("torch", {})
    head = (
        f"Device: {data['settings']['device']}"
        + (f" ({gpu.get('name')}, driver {gpu.get('driver')})" if gpu else f" (CPU: {info.get('cpu')}, {info.get('cores')} cores)")
        + f"; onnxruntime {info.get('onnxruntime')}, torch {t.get('version')}"
        + (f" (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}); TF32: torch cuDNN allow_tf32={t.get('cudnn_allow_tf32')}, "
           f"ORT use_tf32={info.get('ort_provider_options', {}).get('use_tf32', '-')}" if gpu else "")
        + f"; median of {'/'.join(map(str, repeats)) or '-'} round-robin rounds, fp32"
    )
    ort_rows = [
        "| model | input | output stride (eST) | original ms | dense ms | twin ms | TFLOP/s o / d / twin | dense ÷ twin TFLOP/s "
        "| dense/original time | dense/original predictions | dense/original FLOPs | GFLOPs o / d / twin "
        "| s&s ms (host I/O) | s&s/dense (host I/O) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    torch_rows = [
        "| model | input | output stride (eST) | original ms | dense ms | twin ms | TFLOP/s o / d / twin | dense ÷ twin TFLOP/s "
        "| dense/original time | max rel vs ORT o / d |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in good:
        f, rt = r["flops"], r["ratios"]
        stitch = r["bench"]["measurements"].get("shift-and-stitch", {})
        gf = " / ".join(_num(f[k] / 1e9 if f[k] else None, ".2f") for k in GRAPHS)
        ort_rows.append(_framework_cells(_key(r), r["ort"]) + (
            f" {_num(rt['dense_over_original_predictions'], '.2f')} | {_num(rt['dense_over_original_flops'], '.2f')} | {gf} "
            f"| {_num(stitch.get('median_ms'), '.1f')} | {_num(rt['stitch_over_dense_time_host_io'], '.2f')} |"
        ))
        rel = r["torch"].get("max_rel_vs_ort", {})
        torch_rows.append(_framework_cells(_key(r), r["torch"]) + (
            f" {_num(rel.get('original'), '.1e')} / {_num(rel.get('dense'), '.1e')} |"
        ))
    parts = [head, "", "ORT " + ("CUDA EP" if data["settings"]["device"] == "cuda" else "CPU EP") + " (IOBinding):", "",
             *ort_rows, "", "PyTorch (OnnxGraphModule" + (", cuDNN" if data["settings"]["device"] == "cuda" else "") + "):",
             "", *torch_rows]
    paper = [r for r in good if "paper" in r]
    if paper:
        parts += ["", "Against the paper (VGG-16, 256x256: original 44 ms, dense 132 ms = 3x for 240x the predictions):", "",
                  "| framework | original ms | dense ms | dense/original time | ÷ paper's 3.0 | predictions o → d "
                  "| prediction ratio | ÷ paper's 240 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in paper:
            p, pred = r["paper"], r["predictions"]
            for fw, name in (("ort", "ORT"), ("torch", "PyTorch")):
                if fw in p:
                    q = p[fw]
                    parts.append(
                        f"| {name} | {q['original_ms']:.2f} | {q['dense_ms']:.2f} | {_num(q['time_ratio'], '.2f')} | "
                        f"{_num(q['time_ratio_over_paper'], '.2f')} | {pred['original']} → {pred['dense']} | "
                        f"{_num(p['prediction_ratio'], '.2f')} | {_num(p['prediction_ratio_over_paper'], '.3f')} |"
                    )
    problems = [f"- {r['label']} {r['size']} r{r['output_stride']}: {r['error']}" for r in rows if "error" in r]
    for r in good:
        for fw in ("ort", "torch"):
            if "error" in r[fw]:
                problems.append(f"- {r['label']} {r['size']} r{r['output_stride']} ({fw}): {r[fw]['error']}")
        problems += [f"- {r['label']} {r['size']} r{r['output_stride']}: check {c['check']} FAILED: {c['detail']}"
                     for c in r["checks"] if not c["passed"]]
    problems += [f"- {s['case']}: skipped ({s['reason']})" for s in data.get("skipped", [])]
    if problems:
        parts += ["", "Not measured, failed or skipped:", "", *problems]
    return "\n".join(parts)


def merge(runs: list[dict]) -> dict:
    """One table from several runs (the first's settings and machine): later rows replace earlier
    ones of the same case and stride; a skip is dropped once a run measured that case."""
    data = dict(runs[0])
    rows: dict[tuple, dict] = {}
    for run in runs:
        rows.update({(r["case"], r["output_stride"]): r for r in run["rows"]})
    data["rows"] = list(rows.values())
    done = {case for case, _ in rows}
    data["skipped"] = [s for run in runs for s in run.get("skipped", []) if s["case"] not in done]
    return data


def _framework_cells(key: str, stats: dict) -> str:
    if "ms" not in stats:
        return f"{key} {stats.get('error', '-')} | | | | | |"
    ms, rate = stats["ms"], stats["tflops"]
    return (
        f"{key} {ms['original']:.2f} | {ms['dense']:.2f} | {ms['twin']:.2f} | "
        + " / ".join(_num(rate[k], ".3f") for k in GRAPHS)
        + f" | {_num(stats['dilation_efficiency'], '.2f')} | {_num(stats['dense_over_original_time'], '.2f')} |"
    )


def _display_index(row: dict) -> tuple[int, int]:
    names = [c.name for c in CASES]
    return (names.index(row["case"]) if row["case"] in names else len(names), -row["output_stride"])


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-dense-speed"))
    ap.add_argument("--json", type=Path, help="write every number here (rewritten after every row)")
    ap.add_argument("--only", help="comma-separated case names: " + ", ".join(c.name for c in CASES))
    ap.add_argument("--repeat", type=int, help=f"timed rounds (default: {DEFAULT_CUDA_REPEAT} on cuda, the case's on cpu)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs of each graph first (cuDNN searches on the first)")
    ap.add_argument("--threads", type=int, help="ORT intra-op (and, on cpu, torch) threads (default: 2 on cpu)")
    ap.add_argument("--tf32", choices=("default", "on", "off"), default="default",
                    help="TF32 for fp32 convolutions in both frameworks (default: each framework's own default)")
    ap.add_argument("--settle", type=float, help="bench's pause before each timed pass (default: 0.2 s on cpu, 0 on cuda)")
    ap.add_argument("--budget", type=float, default=420,
                    help="skip the rows not started after this many seconds (default 420: one 10-minute device call)")
    ap.add_argument("--tables", type=Path, nargs="+", metavar="JSON",
                    help="print the tables of earlier --json files (rows merged, e.g. a run and its --only rerun) and exit")
    args = ap.parse_args(argv)

    if args.tables:
        print(tables(merge([json.loads(p.read_text()) for p in args.tables])))
        return 0
    if (args.repeat is not None and args.repeat < 1) or args.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")
    cases = {c.name: c for c in CASES}
    order = RUN_ORDER
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(cases))
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}")
        order = [n for n in RUN_ORDER if n in wanted]
    problem = check_device(args.device)
    if problem:
        print(f"gpu_speed: error: {problem}", file=sys.stderr)
        return 2
    settings = Settings(
        device=args.device, repeat=args.repeat, warmup=args.warmup,
        threads=args.threads if args.threads is not None else (2 if args.device == "cpu" else None), tf32=args.tf32,
        settle=args.settle if args.settle is not None else (0.2 if args.device == "cpu" else 0.0),
    )
    info = setup(settings)
    data = {"settings": dataclasses.asdict(settings) | {"budget_s": args.budget, "python": platform.python_version()},
            "paper": PAPER, "machine": info, "rows": [], "skipped": []}
    started = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for name in order:
        case = cases[name]
        if time.time() - started > args.budget:
            data["skipped"].append({"case": name, "reason": f"--budget {args.budget:g} s spent"})
            _progress(f"# {name}: skipped (--budget {args.budget:g} s spent)")
            continue
        t0 = time.time()
        try:
            source, original, shapes = dense_speed.case_models(case, args.workdir)
            denses = {s: dense_speed.dense_model(source, s, args.workdir) for s in case.strides}
        except Exception as exc:
            for s in case.strides:
                data["rows"].append({"case": name, "label": case.label, "size": case.size, "output_stride": s,
                                     "error": "export/rewrite failed: " + _one_line(exc), "passed": False})
            _progress(f"# {name}: export/rewrite failed: {_one_line(exc)}")
            continue
        _progress(f"# {name}: {source.name} and its rewrites ready in {time.time() - t0:.0f} s")
        for stride, dense in denses.items():
            info["tf32_in_use"] = _tf32_in_use(info)
            try:
                row = measure_row(case, stride, original, dense, shapes, settings, info)
            except Exception as exc:
                row = {"case": name, "label": case.label, "size": case.size, "output_stride": stride,
                       "error": _one_line(exc), "passed": False}
                _progress(f"#   r{stride}: failed: {row['error']}")
            data["rows"].append(row)
            if args.json:
                _write(args.json, data)
    data["seconds"] = time.time() - started
    data["passed"] = all(r["passed"] for r in data["rows"])
    _progress(f"# total {data['seconds']:.0f} s")
    print(tables(data), flush=True)
    if args.json:
        _write(args.json, data)
    return 0 if data["passed"] else 1


def _write(path: Path, data: dict) -> None:
    from onnx_dense.bench.machine import _finite

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
