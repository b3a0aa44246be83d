"""Speed of ``--strategy fragments`` against ``dilate`` and shift-and-stitch, before and after
the output-side space-to-batch (issue 18).

For each network (built in code, random weights, TorchScript export) and output stride, the
script writes:

* ``dilate``: one dilated graph (``--per-phase-global`` where plain dilation refuses an SE
  block; nothing where dilation cannot apply at all);
* ``fragments``: the current lowering (each removal node runs at its kept stride, its output's
  phases move to the batch by Reshape/Transpose after the pointwise ops that follow it);
* ``fragments-before``: the previous lowering, rebuilt in the same run by refusing the new one
  (``fragments.check_split_after``): Pad, eST^2 Slices of the input, Concat, node at stride s;

then times the original, each of them and shift-and-stitch (the original run eST^2 times on
shifted crops and interleaved, ``onnx_dense.bench``'s ``_Stitcher``) in ONNX Runtime (CPU EP,
--threads intra-op, default graph optimisations, one fixed random input at the model's size).
Each of --repeat rounds runs every variant once, in an order rotating from round to round,
each timed run preceded by an untimed run of the same session (warm threads and caches, as
shift-and-stitch's back-to-back passes have). The table gives minima and medians, and the
ratios fragments / dilate and shift-and-stitch / fragments as the ratio of the minima and
the median of the per-round ratios, in wall time and in CPU time (ORT workers not spin-waiting:
CPU time is the better estimate on a shared machine). The outputs of both lowerings are compared.

    python benchmarks/fragments_speed.py --json fragments_speed.json
    # options: --models mobilenetv2,resnet18,mobilenetv3_fcn,unet,lraspp,fpn,resnet50
    #          --strides 8 --size 224 --repeat 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import onnx_dense  # noqa: E402
from onnx_dense import metadata  # noqa: E402
from onnx_dense.bench.driver import load_pair  # noqa: E402
from onnx_dense.bench.machine import machine_info  # noqa: E402
from onnx_dense.bench.stitch import _stitch_phases, _Stitcher  # noqa: E402
from onnx_dense.passes import fragments  # noqa: E402
from onnx_dense.runtime.session import OrtRunner  # noqa: E402

# name -> (zoo module, builder, kwargs, output strides)
MODELS = {
    "mobilenetv2": ("zoo", "mobilenetv2", dict(width=32), (16, 8)),
    "resnet18": ("zoo", "resnet", dict(width=64), (16, 8)),
    "mobilenetv3_fcn": ("context", "mobilenetv3_fcn", dict(width=1.0), (16, 8)),
    "unet": ("context", "unet", dict(width=16), (2, 1)),
    "lraspp": ("segmentation", "lraspp", dict(width=16), (4, 2)),
    "fpn": ("segmentation", "fpn", dict(width=16), (2, 1)),
    "resnet50": ("zoo", "resnet", dict(full50=True), (16, 8)),
}


def build(name: str, size: int):
    kind, builder, kwargs, strides = MODELS[name]
    if kind == "context":
        from samples import zoo_context

        return zoo_context.build(builder, size=size, **kwargs), strides
    if kind == "segmentation":
        from samples import segmentation

        return segmentation.build(builder, size=size, **kwargs), strides
    from samples import zoo

    if kwargs.get("full50"):
        return zoo.build(builder, **kwargs), strides  # 224x224

    return zoo.build(builder, size=size, **kwargs), strides


OPTIONS: dict = {}  # rewrite options of the model being benchmarked


def write_before(src: Path, dst: Path, r: int) -> None:
    """The previous lowering: every removal node takes shifted copies of its input."""
    saved = fragments.check_split_after
    fragments.check_split_after = lambda node: "benchmark: the previous lowering"
    try:
        onnx_dense.rewrite(src, dst, output_stride=r, strategy="fragments", **OPTIONS)
    finally:
        fragments.check_split_after = saved


def write_dilate(src: Path, dst: Path, r: int) -> str | None:
    """dilate, else dilate --per-phase-global; the label, or None when dilation refuses."""
    for label, kwargs in (("dilate", {}), ("dilate+pg", {"per_phase_global": True})):
        try:
            onnx_dense.rewrite(src, dst, output_stride=r, strategy="dilate", **kwargs, **OPTIONS)
            return label
        except onnx_dense.DenseError:
            continue
    return None


def time_rounds(fns: dict, repeat: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU milliseconds per run. The CPU time of the process (all threads; ORT's
    workers do not spin-wait, see bench_one) is what a run costs when neighbours preempt it."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeat):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            fns[k]()  # untimed pass of the same session
            c0, start = time.process_time(), time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - start) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    return times, cpu


def ratio(times, num: str, den: str) -> dict:
    per_round = [a / b for a, b in zip(times[num], times[den])]
    return {"of_minima": min(times[num]) / min(times[den]), "median_per_round": statistics.median(per_round)}


def est_phases(pair) -> int:
    """How many times shift-and-stitch runs the original (as bench_one's _Stitcher)."""
    try:
        return int(np.prod(_stitch_phases(pair.info, pair.spatial)))
    except onnx_dense.DenseError:
        return int(np.prod(_stitch_phases(pair.info, pair.spatial[:1])))


def bench_one(name: str, r: int, src: Path, work: Path, args) -> dict:
    paths = {"fragments": work / f"{name}_{r}_fragments.onnx", "fragments-before": work / f"{name}_{r}_before.onnx"}
    onnx_dense.rewrite(src, paths["fragments"], output_stride=r, strategy="fragments", **OPTIONS)
    write_before(src, paths["fragments-before"], r)
    dilate = write_dilate(src, work / f"{name}_{r}_dilate.onnx", r)
    if dilate:
        paths[dilate] = work / f"{name}_{r}_dilate.onnx"
    info = metadata.read(onnx.load(str(paths["fragments"])))
    est = max(max(o.est) for o in info.outputs.values())
    row = {"model": name, "stride": r, "est": est, "dilate": dilate}
    with ExitStack() as stack:
        pair = load_pair(src, paths["fragments"], seed=0)
        runner = dict(provider="cpu", optimize=True, threads=args.threads, spinning=False)
        orig = stack.enter_context(OrtRunner(pair.original, **runner))
        fns = {"original": lambda: orig(pair.feeds, pair.names)}
        for label, path in paths.items():
            sess = stack.enter_context(OrtRunner(str(path), **runner))
            fns[label] = (lambda s: lambda: s(pair.feeds))(sess)
        try:  # one output grid (the U-Net's two outputs at strides 2 and 4 have none)
            fns["shift-and-stitch"] = _Stitcher(
                orig, pair.info, pair.spatial, pair.feeds, _stitch_phases(pair.info, pair.spatial)
            )
        except onnx_dense.DenseError:
            pass
        outs = {k: fns[k]() for k in ("fragments", "fragments-before")}
        row["max_abs_diff_before_after"] = max(
            float(np.max(np.abs(outs["fragments"][n] - outs["fragments-before"][n]))) for n in outs["fragments"]
        )
        row["max_abs_output"] = max(float(np.max(np.abs(v))) for v in outs["fragments-before"].values())
        # What shift-and-stitch / fragments could be at equal time per FLOP. The FLOPs from the
        # analysis (inspect: the phases each node runs on, which upsamplings collapse); the FLOP
        # counter's shape inference stops at the fragments models' run-time reshapes.
        inspection = onnx_dense.inspect_model(str(src), output_stride=r, strategy="fragments", **OPTIONS)
        row["flop_bound"] = est_phases(pair) * inspection.flops / inspection.dense_flops
        times, cpu = time_rounds(fns, args.repeat, args.warmup)
    for label, t in (("", times), ("cpu_", cpu)):
        row[f"{label}min_ms"] = {k: min(v) for k, v in t.items()}
        row[f"{label}median_ms"] = {k: statistics.median(v) for k, v in t.items()}
        row[f"{label}ratios"] = {}
        for frag in ("fragments", "fragments-before"):
            if dilate:
                row[f"{label}ratios"][f"{frag} / {dilate}"] = ratio(t, frag, dilate)
            if "shift-and-stitch" in t:
                row[f"{label}ratios"][f"shift-and-stitch / {frag}"] = ratio(t, "shift-and-stitch", frag)
    row["runs_ms"], row["cpu_runs_ms"] = times, cpu
    return row


def table(rows, args, machine, prefix: str = "") -> str:
    lines = [
        f"{'CPU time' if prefix else 'wall time'}: "
        f"input {args.size}x{args.size}, ORT CPU, {args.threads} threads, {args.repeat} rounds; "
        f"{machine['cpu']}, {machine['cores']} cores, load average {machine.get('load_average')} at the end",
        "",
        "| model | R | eST | original | dilate | fragments before | fragments | stitch | before ÷ dilate | "
        "after ÷ dilate | stitch ÷ before | stitch ÷ after | FLOP bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, md = r[f"{prefix}min_ms"], r[f"{prefix}median_ms"]

        def cell(k):
            return f"{m[k]:.1f} ({md[k]:.1f})" if k in m else "-"

        def rat(key):
            v = r[f"{prefix}ratios"].get(key)
            return f"{v['of_minima']:.2f} ({v['median_per_round']:.2f})" if v else "-"

        d = r["dilate"]
        bound = f"{r['flop_bound']:.2f}" if "flop_bound" in r else "-"
        lines.append(
            f"| {r['model']} | {r['stride']} | {r['est']} | {cell('original')} | "
            f"{cell(d) + (' pg' if d == 'dilate+pg' else '') if d else 'refused'} | {cell('fragments-before')} | "
            f"{cell('fragments')} | {cell('shift-and-stitch')} | {rat(f'fragments-before / {d}')} | "
            f"{rat(f'fragments / {d}')} | {rat('shift-and-stitch / fragments-before')} | "
            f"{rat('shift-and-stitch / fragments')} | {bound} |"
        )
    lines.append("")
    lines.append("ms: minimum (median); ratios: of the minima (median of the per-round ratios); FLOP bound: "
                 "eST^2 x original FLOPs / fragments FLOPs, the stitch / fragments ratio at equal time per FLOP")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--strides", default=None, help="comma-separated; default: each model's two")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    from samples import zoo_context

    rows = []
    start = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            model, strides = build(name, args.size)
            if args.strides:
                strides = tuple(int(s) for s in args.strides.split(","))
            src = zoo_context.export(model, work / f"{name}.onnx", "torchscript")
            # segmentation: the dense score map (shift-and-stitch has no final upsampling either)
            OPTIONS.clear()
            if MODELS[name][0] == "segmentation":
                OPTIONS["final_upsampling"] = False
            for r in strides:
                row = bench_one(name, r, src, work, args)
                rows.append(row)
                print(f"{name} R={r}: " + ", ".join(f"{k} {v['of_minima']:.2f}" for k, v in row["cpu_ratios"].items()),
                      file=sys.stderr, flush=True)
    end = machine_info()
    print(table(rows, args, end))
    print()
    print(table(rows, args, end, "cpu_"))
    if args.json:
        args.json.write_text(json.dumps({"machine_start": start, "machine_end": end,
                                         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
