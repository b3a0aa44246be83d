"""Speed of dense models against their originals and shift-and-stitch (``onnx_dense.bench``).

Builds the models (random weights, nothing downloaded), exports them with the TorchScript
exporter, rewrites them at the output strides below, and runs ``onnx_dense.bench.bench``
on each pair: the original one pass, the dense model one pass, and shift-and-stitch (the
original eST² times on shifted inputs, interleaved), round-robin, medians. Prints a
markdown tables (the ones in benchmarks/README.md) and, with ``--json``, writes every number.

Cases (see benchmarks/README.md for why the classifiers are benchmarked this way):

* ``vgg16-conv-224`` / ``vgg16-conv-512``: VGG-16's convolutional part (13 convs, 5 max
  pools, up to pool5), exported at 224 and 512; output strides 16 (pool5 stride 1) and 8
  (pool4 and pool5 stride 1, the paper's "pool4 stride 1").
* ``vgg16-fc-512``: the whole VGG-16 classifier at 512. The export at 224 (fc6 needs a 7x7
  map) is the reference; its head as a convolution (fc6 a 7x7 Conv, fc7/fc8 1x1), which is
  ``onnx-dense rewrite --output-stride 32`` (eST 1), is "the original" run at 512: a 10x10
  map of class scores, one every 32 pixels. Dense: output strides 16 and 8 of the same export.
* ``resnet50-conv-224``: ResNet-50 up to layer4 (before the global pool); output strides 16
  (layer4 stride 1) and 8 (layer3 and layer4).
* ``fcn-64`` / ``fcn-512``: the FCN-style sample (``samples.zoo.build("fcn")``, width 8)
  at its own 64x64 and at 512x512; output strides 8 and 4.

``--kernels`` instead times single layers taken from these models three ways (as in the
original, as in the dense model: larger map and dilated, and undilated at the dense map
size), which separates the cost of dilation from the cost of the larger map.

Run (about 15 minutes on an idle 2-core VM, twice that on a busy one; ~1.5 GB of models in
the work folder):

    # from the repository root, in the environment where onnx-dense is installed
    python benchmarks/dense_speed.py --workdir /tmp/onnx-dense-speed --json speed.json
    # --only vgg16-conv-224,fcn-512   --repeat N (default: per case)   --profile   --no-fc
    python benchmarks/dense_speed.py --kernels --json kernels.json      # ~1.5 minutes
    python benchmarks/dense_speed.py --tables speed.json                # reprint the tables
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@dataclasses.dataclass
class Case:
    name: str
    label: str
    size: int
    strides: tuple[int, ...]
    repeat: int


CASES = [
    Case("fcn-64", "FCN-style sample (width 8)", 64, (8, 4), 30),
    Case("fcn-512", "FCN-style sample (width 8)", 512, (8, 4), 10),
    Case("resnet50-conv-224", "ResNet-50 to layer4", 224, (16, 8), 7),
    Case("vgg16-conv-224", "VGG-16 to pool5", 224, (16, 8), 7),
    Case("vgg16-conv-512", "VGG-16 to pool5", 512, (16, 8), 3),
    Case("vgg16-fc-512", "VGG-16 classifier, head as conv", 512, (16, 8), 3),
]


def _export(case: Case, workdir: Path) -> tuple[Path, dict | None]:
    """The original model of a case (cached) and the input shape to bench it at (None: its own)."""
    from samples import zoo
    from samples.export import export_onnx

    Features, Backbone = _wrappers()
    family = case.name.rsplit("-", 1)[0]
    path = workdir / f"{case.name}.onnx"
    shape = (1, 3, case.size, case.size)
    if family == "fcn":
        if not path.exists():
            export_onnx(zoo.build("fcn"), shape, path, exporter="torchscript")
        return path, None
    if family == "vgg16-conv":
        if not path.exists():
            export_onnx(Features(zoo.build("vgg16")), shape, path, exporter="torchscript")
        return path, None
    if family == "resnet50-conv":
        if not path.exists():
            export_onnx(Backbone(zoo.build("resnet50")), shape, path, exporter="torchscript")
        return path, None
    if family == "vgg16-fc":
        path = workdir / "vgg16-224.onnx"
        if not path.exists():
            export_onnx(zoo.build("vgg16"), (1, 3, 224, 224), path, exporter="torchscript")
        return path, {"input": shape}
    raise KeyError(case.name)


def case_models(case: Case, workdir: Path) -> tuple[Path, Path, dict | None]:
    """(exported source, the original to bench, input shapes or None for its own) of a case, cached
    in ``workdir``. A ``vgg16-fc-*`` case's original is the 224 export with its head as a
    convolution (rewritten at its own output stride 32), so it runs at the case's size."""
    import onnx_dense

    source, shapes = _export(case, workdir)
    original = source
    if case.name.startswith("vgg16-fc-"):
        original = workdir / f"{source.stem}-r32.onnx"
        if not original.exists():
            onnx_dense.rewrite(source, original, output_stride=32)
    return source, original, shapes


def dense_model(source: Path, stride: int, workdir: Path) -> Path:
    """``source`` rewritten at output stride ``stride`` (cached in ``workdir``)."""
    import onnx_dense

    dense = workdir / f"{source.stem}-r{stride}.onnx"
    if not dense.exists():
        onnx_dense.rewrite(source, dense, output_stride=stride)
    return dense


def _wrappers():
    """Modules for the convolutional parts, keeping the full models' attribute (node) names."""
    from torch import nn

    class Features(nn.Module):
        """VGG-16 up to pool5."""

        def __init__(self, vgg):
            super().__init__()
            self.features = vgg.features

        def forward(self, x):
            return self.features(x)

    class Backbone(nn.Module):
        """ResNet-50 up to layer4 (no global pool, no fc)."""

        def __init__(self, r):
            super().__init__()
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
                setattr(self, name, getattr(r, name))

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    return Features, Backbone


# --------------------------------------------------------------------------
# single-layer kernels: is a dilated window as fast per FLOP as an undilated one?
# --------------------------------------------------------------------------

#: (layer, op, channels in, channels out, kernel, original map, dense map, dilation in the dense model)
KERNELS = [
    ("VGG-16 conv5_x, 224, r8", "Conv", 512, 512, 3, 14, 27, 2),
    ("VGG-16 conv5_x, 512, r8", "Conv", 512, 512, 3, 32, 63, 2),
    ("VGG-16 conv4_x, 224, r4", "Conv", 512, 512, 3, 28, 55, 2),
    ("ResNet-50 layer3 conv2, 224, r8", "Conv", 256, 256, 3, 14, 28, 2),
    ("ResNet-50 layer4 conv2, 224, r8", "Conv", 512, 512, 3, 7, 28, 4),
    ("ResNet-50 layer4 conv1 (1x1), 224, r8", "Conv", 2048, 512, 1, 7, 28, 1),
    ("FCN stage 4, 512, r4", "Conv", 64, 64, 3, 64, 127, 2),
    ("FCN fc6 (pad 0), 512, r4", "Conv0", 64, 64, 3, 32, 125, 4),
    ("VGG-16 pool5, 224, r8", "MaxPool", 512, 512, 2, 14, 27, 2),
]


def _layer(op: str, cin: int, cout: int, k: int, n: int, d: int, stride: int = 1):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = []
    if op == "MaxPool":
        nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], dilations=[d, d], strides=[stride] * 2)]
    else:
        pad = 0 if op == "Conv0" else d * (k // 2)
        rng = np.random.default_rng(0)
        inits = [
            numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.05).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(cout, np.float32), "b"),
        ]
        nodes = [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], dilations=[d, d], pads=[pad] * 4),
            helper.make_node("Relu", ["c"], ["y"]),
        ]
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def kernels(repeat: int = 40, threads: int = 2, optimize: bool = True) -> list[dict]:
    """Each layer three ways: as in the original (its map, dilation 1), as in the dense model
    (larger map, dilated), and undilated at the dense map size. Wall time with 2 ORT threads
    and CPU time of a 1-thread session (less disturbed by other processes taking the CPU),
    both the fastest of ``repeat`` round-robin runs; no session spin-waits, so none slows the
    next. The 1x1 row has no dilation: its "dense" and "undilated" models are the same, so its
    dilation cost shows the noise of the measurement."""
    import numpy as np
    import onnxruntime as ort

    from onnx_dense.bench import count_flops

    rows = []
    for label, op, cin, cout, k, n_orig, n_dense, d in KERNELS:
        variants = {
            "original": _layer(op, cin, cout, k, n_orig, 1, 2 if op == "MaxPool" else 1),
            "dense": _layer(op, cin, cout, k, n_dense, d),
            "undilated": _layer(op, cin, cout, k, n_dense, 1),
        }
        sessions = {}
        for name, model in variants.items():
            for mode, nthreads in (("wall", threads), ("cpu", 1)):
                so = ort.SessionOptions()
                so.intra_op_num_threads = nthreads
                so.log_severity_level = 3
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no session slows the next
                if not optimize:  # no NCHWc layout: MLAS im2col + GEMM
                    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                sessions[name, mode] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {
            name: {"x": np.random.default_rng(1).standard_normal((1, cin, n, n)).astype(np.float32)}
            for name, n in (("original", n_orig), ("dense", n_dense), ("undilated", n_dense))
        }
        best = {key: float("inf") for key in sessions}
        keys = list(sessions)
        for key in keys:
            sessions[key].run(None, feeds[key[0]])
        for r in range(repeat):
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                c0, t0 = time.process_time(), time.perf_counter()
                sessions[key].run(None, feeds[key[0]])
                spent = (time.perf_counter() - t0) if key[1] == "wall" else (time.process_time() - c0)
                best[key] = min(best[key], spent * 1000)
        flops = {
            name: count_flops(model, {"x": (1, cin, n, n)})[0]
            for (name, model), n in zip(variants.items(), (n_orig, n_dense, n_dense))
        }
        row = {"layer": label, "op": "Conv" if op == "Conv0" else op, "cin": cin, "cout": cout, "kernel": k,
               "map": [n_orig, n_dense], "dilation": d, "flops": flops}
        for mode in ("wall", "cpu"):
            row[mode] = {name: best[name, mode] for name in variants}
            per = {name: best[name, mode] / flops[name] for name in variants}
            row[mode + "_dilation_cost"] = per["dense"] / per["undilated"]  # same map, dilated vs not
            row[mode + "_per_flop_vs_original"] = per["dense"] / per["original"]  # what the model ratio sees
        rows.append(row)
        print(f"# kernel {label}: {_fmt_kernel(row)}", file=sys.stderr, flush=True)
    return rows


def _fmt_kernel(row: dict) -> str:
    w, c = row["wall"], row["cpu"]
    return (
        f"wall ms o/d/u {w['original']:.2f}/{w['dense']:.2f}/{w['undilated']:.2f}, cpu ms {c['original']:.2f}/"
        f"{c['dense']:.2f}/{c['undilated']:.2f}; dilation cost wall {row['wall_dilation_cost']:.2f} cpu "
        f"{row['cpu_dilation_cost']:.2f}; per FLOP vs original wall {row['wall_per_flop_vs_original']:.2f} cpu "
        f"{row['cpu_per_flop_vs_original']:.2f}"
    )


def kernel_table(rows: list[dict]) -> str:
    lines = [
        "| layer | op | channels | kernel | map original → dense | dilation | GFLOPs o / d | wall ms o / d / undilated "
        "| CPU ms (1 thread) o / d / undilated | dilation cost wall / CPU | per FLOP vs original wall / CPU |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        w, c, f = r["wall"], r["cpu"], r["flops"]
        lines.append(
            f"| {r['layer']} | {r['op']} | {r['cin']}→{r['cout']} | {r['kernel']}x{r['kernel']} | "
            f"{r['map'][0]} → {r['map'][1]} | {r['dilation']} | {f['original'] / 1e9:.3f} / {f['dense'] / 1e9:.3f} | "
            f"{w['original']:.2f} / {w['dense']:.2f} / {w['undilated']:.2f} | {c['original']:.2f} / {c['dense']:.2f} / "
            f"{c['undilated']:.2f} | {r['wall_dilation_cost']:.2f} / {r['cpu_dilation_cost']:.2f} | "
            f"{r['wall_per_flop_vs_original']:.2f} / {r['cpu_per_flop_vs_original']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-dense-speed"))
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--only", help="comma-separated case names: " + ", ".join(c.name for c in CASES))
    ap.add_argument("--repeat", type=int, help="timed rounds per pair (default: per case)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="per-node times (ORT profiler) too")
    ap.add_argument("--no-spin", action="store_true", help="ORT worker threads do not spin-wait between runs")
    ap.add_argument("--no-fc", action="store_true", help="skip vgg16-fc-512 (the slowest case)")
    ap.add_argument("--kernels", action="store_true", help="only the single-layer table (dilated vs undilated)")
    ap.add_argument("--no-optimize", action="store_true", help="with --kernels: ORT graph optimisations off (no NCHWc)")
    ap.add_argument("--tables", type=Path, metavar="JSON", help="print the tables of an earlier --json file and exit")
    args = ap.parse_args(argv)

    if args.tables:
        data = json.loads(args.tables.read_text())
        if "results" in data:
            print(table(data["results"]))
        if "kernels" in data:
            print(kernel_table(data["kernels"]))
        return 0

    if args.kernels:
        from onnx_dense.bench import machine_info

        rows = kernels(repeat=args.repeat or 40, threads=args.threads, optimize=not args.no_optimize)
        print(kernel_table(rows))
        if args.json:
            args.json.write_text(json.dumps({"machine": machine_info(), "kernels": rows}, indent=2))
        return 0

    from onnx_dense.bench import bench, machine_info

    cases = CASES
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = set(wanted) - {c.name for c in CASES}
        if unknown:
            ap.error(f"unknown case(s) {', '.join(sorted(unknown))}")
        cases = [c for c in CASES if c.name in wanted]
    if args.no_fc:
        cases = [c for c in cases if c.name != "vgg16-fc-512"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.time()
    for case in cases:
        t0 = time.time()
        source, original, shapes = case_models(case, args.workdir)
        print(f"# {case.name}: {source.name} (exported/cached in {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        for stride in case.strides:
            dense = dense_model(source, stride, args.workdir)
            t1 = time.time()
            result = bench(
                original, dense, input_shapes=shapes, threads=args.threads, repeat=args.repeat or case.repeat,
                profile=args.profile, spinning=False if args.no_spin else None,
            )
            row = {"case": case.name, "label": case.label, "size": case.size, "output_stride": stride, **result.to_dict()}
            results.append(row)
            print(
                f"#   r{stride}: {_fmt_row(row)} ({time.time() - t1:.0f} s)", file=sys.stderr, flush=True,
            )
            if args.profile:
                print(result.text(top_nodes=20), file=sys.stderr, flush=True)
    print(f"# total {time.time() - started:.0f} s", file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "results": results}, indent=2, default=str))
    return 0 if all(r["passed"] for r in results) else 1


def _fmt_row(row: dict) -> str:
    m = row["measurements"]
    r = row["ratios"]
    return (
        f"orig {m['original']['median_ms']:.1f} ms, dense {m['dense']['median_ms']:.1f} ms, "
        f"s&s {m['shift-and-stitch']['median_ms']:.1f} ms; time x {r['dense_over_original_time']:.3f}, "
        f"FLOPs x {r['dense_over_original_flops']:.3f}, per FLOP {r['time_per_flop']:.3f}, "
        f"s&s/dense {r['stitch_over_dense_time']:.2f}"
    )


def table(results: list[dict]) -> str:
    """Two markdown tables: what was measured, then the ratios against the targets."""
    speed = [
        "| model | input | output stride (eST) | original ms | dense ms | shift-and-stitch ms | predictions o / d / s&s "
        "| predictions/s o / d / s&s | GFLOPs o / d / s&s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = [
        "| model | input | output stride (eST) | dense/original time | dense/original FLOPs | time per FLOP (target ≤ 1.15) "
        "| s&s/dense | target s&s/dense (0.8·eST²/FLOP ratio) | fastest runs: time per FLOP, s&s/dense "
        "| CPU time: time per FLOP | s&s vs dense: max abs (positions compared / overlap) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        m = row["measurements"]
        o, d, s = m["original"], m["dense"], m["shift-and-stitch"]
        r, t, other = row["ratios"], row["targets"], row["ratios_other_statistics"]
        check = next(c for c in row["checks"] if c["check"] == "shift-and-stitch")
        est = str(row["est"][0]) if len(set(row["est"])) == 1 else "x".join(map(str, row["est"]))
        key = f"| {row['label']} | {row['size']} | {row['output_stride']} ({est}) |"
        speed.append(
            f"{key} {o['median_ms']:.1f} | {d['median_ms']:.1f} | {s['median_ms']:.0f} | {o['predictions']} / "
            f"{d['predictions']} / {s['predictions']} | {o['predictions_per_s']:.0f} / {d['predictions_per_s']:.0f} / "
            f"{s['predictions_per_s']:.0f} | {o['flops'] / 1e9:.2f} / {d['flops'] / 1e9:.2f} / {s['flops'] / 1e9:.1f} |"
        )
        tpf, ss = t["time_per_flop"], t["stitch_over_dense"]
        cpu = other.get("cpu_median", {}).get("time_per_flop")
        ratios.append(
            f"{key} {r['dense_over_original_time']:.2f} | {r['dense_over_original_flops']:.2f} | "
            f"{_mark(tpf)}{tpf['value']:.2f}{_mark(tpf)} | {_mark(ss)}{ss['value']:.2f}{_mark(ss)} | {ss['target']:.2f} | "
            f"{other['min']['time_per_flop']:.2f}, {other['min']['stitch_over_dense_time']:.2f} | "
            f"{'-' if cpu is None else f'{cpu:.2f}'} | {check['max_abs']:.1e} ({check['compared']} / {check['overlap']}) |"
        )
    return "\n".join(speed) + "\n\n" + "\n".join(ratios)


def _mark(target: dict) -> str:
    """Bold when a target is not met."""
    return "" if target["met"] else "**"


if __name__ == "__main__":
    sys.exit(main())
