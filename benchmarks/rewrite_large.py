"""Memory and time of ``onnx_dense.rewrite`` on a VGG-16-sized model (138M params, ~553 MB).

What it demonstrates: the rewrite of a ~500 MB model should not copy the weights more than
once. Every measurement runs in a fresh Python subprocess, so the peak RSS it reports is
that of one operation only:

* ``rewrite``: ``onnx_dense.rewrite(src, dst, output_stride=R)`` for each R in --strides.
* ``onnx load+save``: plain ``onnx.load(src)`` + ``onnx.save(proto, dst)`` of the same
  file (with external data for the external layout), the reference point: what any tool
  that round-trips the model through the onnx package pays.
* ``steps`` (first stride only, --no-steps to skip): the same ``rewrite`` call with the
  peak RSS and time of each step of the pipeline recorded: load, every onnx-ir pass of
  normalise/analyse/rewrite/finalise, save, and the onnx/onnx-ir calls inside them that
  could copy weights (file read, protobuf parse/serialise, shape inference, checker).

``rewrite`` and ``onnx load+save`` run --repeat times (default 3): the table gives the
median time and the highest peak.

Each child reports the RSS just after importing onnx, onnx_ir, numpy and onnx_dense
(baseline), its peak RSS (``VmHWM``; ``ru_maxrss`` agrees), the weight bytes of the
model, and ``(peak - baseline) / weight bytes``: about 1x means one copy of the weights
in memory, 0x means they were never brought into memory (memory-mapped external data).
Per-step peaks reset the kernel's high-water mark through ``/proc/self/clear_refs``.

Two layouts of the same weights are measured (--layouts):

* ``inline``: the single ~553 MB ``.onnx`` file the TorchScript exporter writes;
* ``external``: the same model re-saved with its weights in ``<name>.onnx.data``.

Models are cached in --workdir (default: a fresh temporary folder, deleted afterwards).
Children run with that folder as working directory: as of 2026-11-25 the rewrite of an
external-data model whose small (<= 1 KiB) initializers are external fails in CheckModel
when the working directory is not the model's folder (the checker resolves the relative
``location`` against the working directory), see benchmarks/README.md.

    python benchmarks/rewrite_large.py --workdir /tmp/onnx-dense-bench --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
CHILD_MARK = "@@RESULT@@ "


# ---------------------------------------------------------------------------------------
# Memory probes (Linux /proc)
# ---------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------


def _import_libraries():
    """What every child imports before its baseline is taken (same set for all)."""
    import numpy  # noqa: F401
    import onnx
    import onnx_ir

    import onnx_dense
    from onnx_dense import model_io

    return onnx, onnx_ir, onnx_dense, model_io


def _tensor_proto_bytes(t) -> int:
    import math

    import onnx

    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return math.prod(t.dims) * itemsize


def child_rewrite(spec: dict) -> dict:
    onnx, ir, onnx_dense, model_io = _import_libraries()
    base = proc_status()
    t0 = time.perf_counter()
    result = onnx_dense.rewrite(spec["src"], spec["dst"], output_stride=spec["stride"])
    seconds = time.perf_counter() - t0
    end = proc_status()
    n_external = sum(isinstance(v.const_value, ir.ExternalTensor) for v in result.graph.initializers.values())
    return {
        "seconds": seconds,
        "baseline_rss": base["VmRSS"],
        "baseline_hwm": base["VmHWM"],
        "peak_rss": end["VmHWM"],
        "ru_maxrss": maxrss_bytes(),
        "end_rss": end["VmRSS"],
        "end_rss_anon": end["RssAnon"],
        "end_rss_file": end["RssFile"],
        "weight_bytes": model_io.weight_bytes(result),
        "initializers": len(result.graph.initializers),
        "external_initializers": n_external,
    }


def child_plain(spec: dict) -> dict:
    onnx, ir, onnx_dense, model_io = _import_libraries()
    base = proc_status()
    t0 = time.perf_counter()
    proto = onnx.load(spec["src"])
    if spec["layout"] == "external":
        location = Path(spec["dst"]).name + ".data"
        onnx.save(proto, spec["dst"], save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    else:
        onnx.save(proto, spec["dst"])
    seconds = time.perf_counter() - t0
    end = proc_status()
    return {
        "seconds": seconds,
        "baseline_rss": base["VmRSS"],
        "baseline_hwm": base["VmHWM"],
        "peak_rss": end["VmHWM"],
        "ru_maxrss": maxrss_bytes(),
        "end_rss": end["VmRSS"],
        "end_rss_anon": end["RssAnon"],
        "end_rss_file": end["RssFile"],
        "weight_bytes": sum(_tensor_proto_bytes(t) for t in proto.graph.initializer),
        "initializers": len(proto.graph.initializer),
        "external_initializers": None,
    }


class _StepTracker:
    """Nested timing and peak-RSS of named steps; peaks via /proc/self/clear_refs."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.stack: list[dict] = []
        self.can_reset = reset_peak()

    @contextlib.contextmanager
    def step(self, name: str):
        if self.stack:
            self.stack[-1]["peak_rss"] = max(self.stack[-1]["peak_rss"], proc_status()["VmHWM"])
        reset_peak()
        row = {
            "name": name, "depth": len(self.stack), "rss_before": proc_status()["VmRSS"],
            "peak_rss": 0, "seconds": None, "rss_after": None,
        }
        self.rows.append(row)
        self.stack.append(row)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            row["seconds"] = time.perf_counter() - t0
            self.stack.pop()
            st = proc_status()
            row["peak_rss"] = max(row["peak_rss"], st["VmHWM"])
            row["rss_after"] = st["VmRSS"]
            if self.stack:
                self.stack[-1]["peak_rss"] = max(self.stack[-1]["peak_rss"], row["peak_rss"])
            reset_peak()

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        """Replace ``owner.attr`` (a function or method) by a version that records a step."""
        original = getattr(owner, attr)
        label = name or attr
        tracker = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with tracker.step(label):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapper)


def child_steps(spec: dict) -> dict:
    """``onnx_dense.rewrite`` with every step that could copy weights timed and measured."""
    onnx, ir, onnx_dense, model_io = _import_libraries()
    import onnx.checker
    import onnx.serialization
    import onnx.shape_inference
    import onnx_ir.external_data
    import onnx_ir.passes
    import onnx_ir.serde

    from onnx_dense import pipeline

    base = proc_status()
    tracker = _StepTracker()
    # The onnx_dense pipeline, by the names pipeline.py gives its steps.
    tracker.wrap(model_io, "load", "model_io.load")
    tracker.wrap(model_io, "save", "model_io.save")
    for name in ("normalise", "rewrite", "finalise"):
        factory = getattr(pipeline, name)

        def make(*args, _factory=factory, _name=name):
            seq = _factory(*args)
            original_call = seq.__call__

            def call(model):
                with tracker.step(f"pipeline.{_name}"):
                    return original_call(model)

            return call

        setattr(pipeline, name, make)
    tracker.wrap(pipeline, "resolve_output_stride", "pipeline.resolve_output_stride")
    tracker.wrap(pipeline, "analyse", "pipeline.analyse")
    # Every onnx-ir pass (Sequential members show up nested under their step).
    original_pass_call = onnx_ir.passes.PassBase.__call__

    def pass_call(self, model):
        if isinstance(self, onnx_ir.passes.Sequential):
            return original_pass_call(self, model)
        with tracker.step(f"pass {type(self).__name__}"):
            return original_pass_call(self, model)

    onnx_ir.passes.PassBase.__call__ = pass_call
    # onnx / onnx-ir calls that may hold the weights in memory.
    tracker.wrap(onnx, "_load_bytes", "onnx._load_bytes (read whole file)")
    serializer = onnx.serialization._ProtobufSerializer
    tracker.wrap(serializer, "deserialize_proto", "protobuf ParseFromString")
    tracker.wrap(serializer, "serialize_proto", "protobuf SerializeToString")
    tracker.wrap(onnx, "_save_bytes", "onnx._save_bytes (write file)")
    tracker.wrap(onnx_ir.serde, "deserialize_model", "ir.serde.deserialize_model")
    tracker.wrap(onnx_ir.serde, "serialize_model", "ir.serde.serialize_model")
    tracker.wrap(onnx_ir.external_data, "unload_from_model", "ir.external_data.unload_from_model")
    tracker.wrap(onnx.shape_inference, "infer_shapes", "onnx.shape_inference.infer_shapes")
    tracker.wrap(onnx.checker, "check_model", "onnx.checker.check_model")

    t0 = time.perf_counter()
    with tracker.step("onnx_dense.rewrite"):
        result = onnx_dense.rewrite(spec["src"], spec["dst"], output_stride=spec["stride"])
    seconds = time.perf_counter() - t0
    end = proc_status()
    return {
        "seconds": seconds,
        "baseline_rss": base["VmRSS"],
        "peak_rss": max(r["peak_rss"] for r in tracker.rows),
        "weight_bytes": model_io.weight_bytes(result),
        "end_rss": end["VmRSS"],
        "peaks_reset": tracker.can_reset,
        "steps": tracker.rows,
    }


def child_check(spec: dict) -> dict:
    """Are the dense model's initializers byte-identical to the original's (by name)?"""
    import numpy as np
    import onnx_ir as ir

    from onnx_dense import model_io

    def digests(path):
        model = model_io.load(path)
        out = {}
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            h = hashlib.sha256()
            h.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
            h.update(np.ascontiguousarray(tensor.numpy()).view(np.uint8).data)
            out[name] = h.hexdigest()
            if isinstance(tensor, ir.ExternalTensor):
                tensor.release()
        return out

    src, dst = digests(spec["src"]), digests(spec["dst"])
    common = set(src) & set(dst)
    return {
        "src_initializers": len(src),
        "dst_initializers": len(dst),
        "common": len(common),
        "identical": sum(src[n] == dst[n] for n in common),
        "missing_in_dst": sorted(set(src) - set(dst))[:10],
        "new_in_dst": sorted(set(dst) - set(src))[:10],
    }


def child_build(spec: dict) -> dict:
    """Export the zoo model to ``src`` (inline) and, if asked, an external-data copy."""
    out = Path(spec["inline"])
    if not out.exists():
        sys.path.insert(0, str(ROOT))
        from samples import zoo
        from samples.export import export_onnx

        model = zoo.build(spec["model"])
        tmp = out.with_name(out.name + ".partial.onnx")
        export_onnx(model, model.input_shape, tmp, exporter="torchscript")
        os.replace(tmp, out)
    ext = spec.get("external")
    if ext and not Path(ext).exists():
        import onnx

        ext = Path(ext)
        proto = onnx.load(str(out))
        tmp = ext.with_name(ext.name + ".partial.onnx")
        onnx.save(
            proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
            location=ext.name + ".data", size_threshold=1024,
        )
        # the .data file is named for the final model name already; move the model last
        os.replace(tmp, ext)
    return {}


CHILDREN = {
    "rewrite": child_rewrite,
    "plain": child_plain,
    "steps": child_steps,
    "check": child_check,
    "build": child_build,
}


def run_child(kind: str, spec: dict, cwd: Path) -> dict:
    # Flush dirty pages left by the previous run (a 553 MB output file) so its write-back
    # does not slow this run down; the input stays in the page cache (warm-cache timings).
    if hasattr(os, "sync"):
        os.sync()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": "\n".join(tail) or f"exit status {proc.returncode}"}


# ---------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}"


def _ratio(row: dict) -> float | None:
    if "error" in row or not row.get("weight_bytes"):
        return None
    return (row["peak_rss"] - row["baseline_rss"]) / row["weight_bytes"]


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| layout | operation | stride | time (s) | baseline RSS (MiB) | peak RSS (MiB) "
        "| peak − baseline (MiB) | weights (MiB) | (peak − baseline) / weights |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            msg = r["error"].splitlines()[-1][:120].replace("|", "/")
            lines.append(f"| {r['layout']} | {r['operation']} | {r.get('stride') or '-'} | error: {msg} ||||||")
            continue
        lines.append(
            f"| {r['layout']} | {r['operation']} | {r.get('stride') or '-'} | {r['seconds']:.2f} "
            f"| {_mib(r['baseline_rss'])} | {_mib(r['peak_rss'])} | {_mib(r['peak_rss'] - r['baseline_rss'])} "
            f"| {_mib(r['weight_bytes'])} | {_ratio(r):.2f}x |"
        )
    return "\n".join(lines)


def steps_table(run: dict) -> str:
    base, weights = run["baseline_rss"], run["weight_bytes"]
    lines = [
        "| step | time (s) | RSS before − baseline (MiB) | peak during step − baseline (MiB) "
        "| ÷ weights | step's own peak growth (MiB) | RSS after − baseline (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run["steps"]:
        indent = "· " * r["depth"]
        peak = r["peak_rss"] - base
        lines.append(
            f"| {indent}{r['name']} | {r['seconds']:.2f} | {_mib(r['rss_before'] - base)} | {_mib(peak)} "
            f"| {peak / weights:.2f}x | {_mib(r['peak_rss'] - r['rss_before'])} | {_mib(r['rss_after'] - base)} |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    cpu = None
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    versions = {}
    for pkg in ("onnx", "onnx_ir", "onnxruntime", "numpy", "protobuf", "torch"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg.replace("_", "-"))
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _repeated(kind: str, spec: dict, cwd: Path, repeat: int) -> dict:
    """Run a child ``repeat`` times: median time, highest peak, all times kept."""
    runs = [run_child(kind, spec, cwd) for _ in range(max(1, repeat))]
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    times = sorted(r["seconds"] for r in runs)
    out = max(runs, key=lambda r: r["peak_rss"] - r["baseline_rss"])
    out = dict(
        out,
        seconds=times[len(times) // 2],
        all_seconds=[r["seconds"] for r in runs],
        all_peak_rss=[r["peak_rss"] for r in runs],
        repeats=len(runs),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help="where models are cached (default: a temp dir, removed)")
    parser.add_argument("--model", default="vgg16", help="samples.zoo model name (default vgg16)")
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16, 32], help="output strides (default 8 16 32)")
    parser.add_argument("--layouts", nargs="+", choices=("inline", "external"), default=["inline", "external"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement: median time, highest peak (default 3)")
    parser.add_argument("--no-steps", action="store_true", help="skip the per-step breakdown")
    parser.add_argument("--no-check", action="store_true", help="skip comparing output weights with the input's")
    parser.add_argument("--keep", action="store_true", help="keep the rewritten models in WORKDIR/out")
    parser.add_argument("--json", type=Path, help="write all measurements to this JSON file")
    args = parser.parse_args(argv)

    if args.child:
        kind, spec = args.child
        result = CHILDREN[kind](json.loads(spec))
        sys.stdout.write(CHILD_MARK + json.dumps(result) + "\n")
        return 0

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="onnx-dense-bench-")) if temporary else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    outdir = workdir / "out"
    outdir.mkdir(exist_ok=True)
    try:
        sources = {"inline": workdir / f"{args.model}.onnx", "external": workdir / f"{args.model}_ext.onnx"}
        t0 = time.perf_counter()
        built = run_child(
            "build",
            {
                "model": args.model,
                "inline": str(sources["inline"]),
                "external": str(sources["external"]) if "external" in args.layouts else None,
            },
            workdir,
        )
        if "error" in built:
            print(f"building the model failed:\n{built['error']}", file=sys.stderr)
            return 1
        print(f"model ready in {workdir} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

        rows: list[dict] = []
        steps: list[dict] = []
        checks: list[dict] = []
        for layout in args.layouts:
            src = sources[layout]
            jobs = [("plain", None)] + [("rewrite", s) for s in args.strides]
            for kind, stride in jobs:
                dst = outdir / f"{args.model}_{layout}_{kind}{'' if stride is None else f'_os{stride}'}.onnx"
                spec = {"src": str(src), "dst": str(dst), "stride": stride, "layout": layout}
                print(f"{layout}: {kind} {stride or ''} ...", file=sys.stderr)
                r = _repeated(kind, spec, workdir, args.repeat)
                r.update(layout=layout, operation="onnx load+save" if kind == "plain" else "rewrite", stride=stride)
                rows.append(r)
                if kind == "rewrite" and stride == args.strides[0] and "error" not in r and not args.no_check:
                    c = run_child("check", spec, workdir)
                    c.update(layout=layout, stride=stride)
                    checks.append(c)
                if not args.keep:
                    for p in (dst, dst.with_name(dst.name + ".data")):
                        p.unlink(missing_ok=True)
            if not args.no_steps:
                stride = args.strides[0]
                dst = outdir / f"{args.model}_{layout}_steps_os{stride}.onnx"
                print(f"{layout}: steps {stride} ...", file=sys.stderr)
                r = run_child("steps", {"src": str(src), "dst": str(dst), "stride": stride}, workdir)
                r.update(layout=layout, stride=stride)
                steps.append(r)
                if not args.keep:
                    for p in (dst, dst.with_name(dst.name + ".data")):
                        p.unlink(missing_ok=True)

        machine = machine_info()
        print(f"\n{args.model}: {machine['cpus']}-core {machine['machine']} ({machine['cpu']}), "
              f"{(machine['memory_bytes'] or 0) / 2**30:.0f} GiB; "
              + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + "\n")
        print(markdown_table(rows))
        for c in checks:
            if "error" in c:
                print(f"\n{c['layout']} os{c['stride']}: weight check failed: {c['error'].splitlines()[-1]}")
            else:
                print(
                    f"\n{c['layout']} os{c['stride']}: {c['identical']}/{c['src_initializers']} initializers of the "
                    f"input are byte-identical in the output (output has {c['dst_initializers']})"
                )
        for s in steps:
            print(f"\n### steps: {s['layout']}, output stride {s['stride']}\n")
            print(steps_table(s) if "error" not in s else f"error: {s['error']}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"model": args.model, "machine": machine, "runs": rows, "weight_checks": checks, "steps": steps},
                    indent=2,
                )
            )
        failed = any("error" in r for r in rows + checks + steps)
        return 1 if failed else 0
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(outdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
