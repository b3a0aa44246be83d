"""Speed of the dense lowerings side by side: dilate, dilate + per-phase global, fragments.

For each model (built in code, random weights, TorchScript export) and output stride, the
script writes every dense model the analysis allows:

* ``dilate``: one dilated graph (refused where an SE block or upsampling sits at eST > 1);
* ``dilate+pg``: the same with ``--per-phase-global`` (SE blocks as per-phase means);
* ``fragments``: the original ops on a batch of ``eST^2`` phases;

checks each with ``onnx_dense.verify`` (subgrid), then times the original and each dense model
in ONNX Runtime (CPU EP, ``intra_op_num_threads`` = --threads, inter-op 1, default graph
optimisations, one fixed random input at the model's size): --warmup runs, then --repeat
timed runs; the table gives the median and the 10th-90th percentile range, in ms, and the
slowdown against the original, which computes eST^2 times fewer predictions.

    python benchmarks/strategies.py --json strategies.json
    # options: --models mobilenetv3,mobilenetv3_fcn,mobilenetv2,unet  --size 224  --repeat 30  --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnx_dense  # noqa: E402
from onnx_dense import metadata  # noqa: E402

# name -> (builder, kwargs at the benchmark size, output strides)
MODELS = {
    "mobilenetv3": ("context", "mobilenetv3", dict(width=1.0), (16, 8)),
    "mobilenetv3_fcn": ("context", "mobilenetv3_fcn", dict(width=1.0), (16, 8)),
    "mobilenetv2": ("zoo", "mobilenetv2", dict(width=32), (16, 8)),
    "unet": ("context", "unet", dict(width=16), (2, 1)),
}
STRATEGIES = {
    "dilate": dict(strategy="dilate"),
    "dilate+pg": dict(strategy="dilate", per_phase_global=True),
    "fragments": dict(strategy="fragments"),
}


def build(name: str, size: int):
    kind, builder, kwargs, strides = MODELS[name]
    if kind == "context":
        from samples import zoo_context

        return zoo_context.build(builder, size=size, **kwargs), strides
    from samples import zoo

    return zoo.build(builder, size=size, **kwargs), strides


def export(model, path: Path) -> Path:
    from samples import zoo_context

    return zoo_context.export(model, path, "torchscript")


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_rounds(paths: dict[str, Path], x: np.ndarray, threads: int, warmup: int, repeat: int) -> dict[str, list[float]]:
    """``repeat`` rounds, each running every model once in a rotating order, so that a noisy
    (shared) machine's load falls on all of them alike. Milliseconds per run."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for k, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, {names[k]: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(repeat):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            start = time.perf_counter()
            sessions[k].run(None, {names[k]: x})
            times[k].append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    q = np.percentile(times, [10, 90])
    return {
        "median_ms": statistics.median(times), "min_ms": min(times), "p10_ms": float(q[0]), "p90_ms": float(q[1]),
        "runs": times,
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__,
        "onnx": onnx.__version__, "load_average": os.getloadavg(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            model, strides = build(name, args.size)
            src = export(model, work / f"{name}.onnx")
            x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
            paths = {(None, "original"): src}
            meta = {(None, "original"): {"est": 1, "verified": True}}
            for r in strides:
                for label, kwargs in STRATEGIES.items():
                    dst = work / f"{name}_{r}_{label}.onnx"
                    try:
                        onnx_dense.rewrite(src, dst, output_stride=r, **kwargs)
                    except onnx_dense.DenseError as exc:
                        rows.append({"model": name, "stride": r, "strategy": label, "refused": str(exc)[:160]})
                        continue
                    info = metadata.read(onnx.load(str(dst)))
                    if label == "dilate+pg" and all(o.off_grid != "global" for o in info.outputs.values()):
                        continue  # no global context in the dense region: the same graph as dilate
                    est = max(max(o.est) for o in info.outputs.values())
                    paths[(r, label)] = dst
                    meta[(r, label)] = {"est": est, "verified": bool(onnx_dense.verify(src, dst))}
            times = time_rounds(paths, x, args.threads, args.warmup, args.repeat)
            base = statistics.median(times[(None, "original")])
            for (r, label), t in times.items():
                res = summary(t)
                rows.append({
                    "model": name, "stride": r, "strategy": label, **meta[(r, label)],
                    "slowdown": res["median_ms"] / base, **res,
                })
                print(f"{name} R={r} {label}: {res['median_ms']:.2f} ms", file=sys.stderr)
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 0 if all(r.get("verified", True) for r in rows) else 1


def table(rows, args) -> str:
    lines = [
        f"input {args.size}x{args.size}, ORT CPU, {args.threads} threads, median of {args.repeat} (10th-90th percentile)",
        "",
        "| model | R | eST | strategy | median ms (p10-p90) | min ms | median ÷ original | verify |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    models = list(dict.fromkeys(r["model"] for r in rows))
    order = ["original", *STRATEGIES]
    rows = sorted(rows, key=lambda r: (models.index(r["model"]), -(r["stride"] or 1e9), order.index(r["strategy"])))
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['stride']} | | {r['strategy']} | refused | | | |")
            continue
        ms = f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f})"
        lines.append(
            f"| {r['model']} | {r['stride'] or '-'} | {r.get('est', 1)} | {r['strategy']} | {ms} | {r['min_ms']:.1f} | "
            f"{r['slowdown']:.2f} | {'PASS' if r.get('verified', True) else 'FAIL'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
