"""Public model families through onnx-dense, checked against the torch model itself.

    pip install -e '.[sweep]'          # timm, torchvision (random weights, nothing downloaded)
    python benchmarks/public_sweep.py --out sweep.json [--size 0] [--only resnet18,squeezenet]

For every family (timm and torchvision architectures, random weights, the fully
convolutional trunk: ``forward_features`` or ``.features``), both torch exporters
(``samples/export.py``), two output strides (half and a quarter of the model's stride) and
both strategies (``dilate``, with ``--per-phase-global`` when plain dilation refuses a
squeeze-and-excitation block, and ``fragments``), it rewrites the export and compares the
dense model's output, in onnxruntime (CPU, graph optimisations off), with an oracle that does
not use ``onnx_dense.verify``:

* phase 0: the torch model on the input, every position;
* phase (a, b): the torch model on the input cropped by (a, b) times the dense grid's pixel
  stride at the top/left. The phase must have the shifted original's length, and it is
  compared from the first position whose receptive field (``rf_start`` in the dense model's
  metadata) does not reach the crop's new start border, to its last position: the end border
  is included. Where the metadata says ``off_grid: "global"`` (global context in the dense
  region) no cropped input is the oracle and only phase 0 is compared; ``"interior"``
  (fragments whose splits are uneven) reports the end border apart.

A cell is ``exact`` (max abs difference over the output's scale below 1e-4), ``refused``
(the one-line reason onnx-dense gave), or ``WRONG`` (a difference: a defect). The input side
is chosen per model so that at least two positions per axis lie past the start border.

torchvision's wheel in the registry is a CUDA build whose C++ ops do not load against the CPU
torch; only its Python models are used, so :func:`_import_torchvision` declares the two
operators its import registers fake kernels for, and skips its C++ library.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = 1e-4  # max abs / max |original|


def _import_torchvision():
    if getattr(_import_torchvision, "keep", None) is not None or "torchvision" in sys.modules:
        import torchvision

        return torchvision
    import torch

    load = torch.ops.load_library

    def skip_torchvision(path):
        if "torchvision" in str(path):
            raise OSError("torchvision C++ ops not loaded (CPU torch, CUDA wheel)")
        return load(path)

    torch.ops.load_library = skip_torchvision
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    try:
        import torchvision
    finally:
        torch.ops.load_library = load
    _import_torchvision.keep = lib  # the definitions live as long as the library object
    return torchvision


class _Trunk:
    """nn.Module factories, built lazily (torch imported only when the sweep runs)."""

    @staticmethod
    def timm(name, **kw):
        _import_torchvision()  # timm imports torchvision
        import timm
        from torch import nn

        class Features(nn.Module):
            def __init__(self):
                super().__init__()
                self.m = timm.create_model(name, pretrained=False, **kw)

            def forward(self, x):
                return self.m.forward_features(x)

        return Features()

    @staticmethod
    def googlenet():
        from torch import nn

        tv = _import_torchvision()
        g = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True)
        names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                 "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                 "inception5a", "inception5b"]
        return nn.Sequential(*(getattr(g, n) for n in names))

    @staticmethod
    def tv_features(name):
        tv = _import_torchvision()
        return getattr(tv.models, name)(weights=None).features


# family -> (builder, total stride, what it exercises)
FAMILIES = {
    "resnet18": (lambda: _Trunk.timm("resnet18"), 32, "plain residual"),
    "resnet18d": (lambda: _Trunk.timm("resnet18d"), 32, "ResNet-D: ceil_mode AvgPool shortcut"),
    "squeezenet1_1": (lambda: _Trunk.tv_features("squeezenet1_1"), 16, "ceil_mode MaxPools"),
    "googlenet": (_Trunk.googlenet, 32, "ceil_mode MaxPools, inception branches"),
    "mobilenetv3_small_100": (lambda: _Trunk.timm("mobilenetv3_small_100"), 32, "SE blocks, hard-swish"),
    "efficientnet_b0": (lambda: _Trunk.timm("efficientnet_b0"), 32, "SE blocks, depthwise"),
    "tf_efficientnet_b0": (lambda: _Trunk.timm("tf_efficientnet_b0"), 32, "TF SAME padding computed at run time"),
    "regnetx_002": (lambda: _Trunk.timm("regnetx_002"), 32, "grouped convs"),
    "convnext_atto": (lambda: _Trunk.timm("convnext_atto"), 32, "patchify stem, LayerNorm"),
    "densenet121": (lambda: _Trunk.tv_features("densenet121"), 32, "dense concatenation, AvgPool transitions"),
    "vgg11": (lambda: _Trunk.tv_features("vgg11"), 32, "plain VGG"),
}
EXPORTERS = ("torchscript", "dynamo")


def _session(model_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _size_for(rf_start: int, stride: int, est: int, minimum: int) -> int:
    """An odd input side with two positions past the start border, after the largest crop."""
    border = math.ceil(-rf_start / stride) if rf_start < 0 else 0
    side = max(minimum, (border + 4) * stride)
    return side if side % 2 else side + 1


def _phases(est: int, limit: int) -> list[tuple[int, int]]:
    every = [p for p in itertools.product(range(est), repeat=2) if any(p)]
    if len(every) <= limit:
        return every
    keep = [(est - 1, est - 1), (est - 1, 0), (0, est - 1)]
    rest = [p for p in every if p not in keep]
    rng = np.random.default_rng(0)
    return keep + [rest[i] for i in sorted(rng.choice(len(rest), limit - len(keep), replace=False))]


def check(module, exporter: str, stride: int, strategy: str, side: int, workdir: Path, max_phases: int) -> dict:
    """One cell of the table."""
    import onnx
    import onnx_ir as ir
    import torch

    import onnx_dense
    from onnx_dense import metadata
    from samples.export import export_onnx

    row = {"exporter": exporter, "output_stride": stride, "strategy": strategy, "size": side}
    path = workdir / f"{exporter}_{side}.onnx"
    if not path.exists():
        export_onnx(module, (1, 3, side, side), path, exporter=exporter)
    kwargs = {}
    label = strategy
    t0 = time.perf_counter()
    try:
        try:
            dense_ir = onnx_dense.rewrite_model(onnx.load(str(path)), output_stride=stride, strategy=strategy)
        except onnx_dense.DenseError as exc:
            if strategy != "dilate" or "--per-phase-global" not in str(exc):
                raise
            kwargs["per_phase_global"] = True
            label = "dilate --per-phase-global"
            dense_ir = onnx_dense.rewrite_model(onnx.load(str(path)), output_stride=stride, strategy=strategy, **kwargs)
    except onnx_dense.DenseError as exc:
        row.update(result="refused", reason=str(exc), strategy=label)
        return row
    row["strategy"] = label
    row["rewrite_s"] = round(time.perf_counter() - t0, 2)
    dense = ir.serde.serialize_model(dense_ir)
    info = metadata.read(dense)
    out = next(iter(info.outputs.values()))
    est, pixel = out.est[0], out.stride[0]
    start = math.ceil(-out.rf_start[0] / out.original_stride[0]) if out.rf_start[0] < 0 else 0
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, side, side)).astype(np.float32)
    sess = _session(dense.SerializeToString())
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want0 = module(torch.from_numpy(x)).numpy()
    scale = float(np.abs(want0).max()) or 1.0
    worst = {"phase 0": float(np.abs(got[:, :, ::est, ::est] - want0).max()) if got[:, :, ::est, ::est].shape == want0.shape else math.inf}
    if worst["phase 0"] == math.inf:
        row.update(result="WRONG", reason=f"phase 0 shape {got[:, :, ::est, ::est].shape} != {want0.shape}")
        return row
    end_border, interior = 0.0, 0.0
    compared = 1
    skipped = None
    if out.off_grid == "global":
        skipped = "off-grid phases: global context in the dense region, no cropped-input oracle"
    else:
        for a, b in _phases(est, max_phases):
            crop = np.ascontiguousarray(x[:, :, a * pixel:, b * pixel:])
            with torch.no_grad():
                want = module(torch.from_numpy(crop)).numpy()
            phase = got[:, :, a::est, b::est]
            if out.off_grid == "interior" and all(p >= w for p, w in zip(phase.shape, want.shape)):
                phase = phase[:, :, : want.shape[2], : want.shape[3]]  # fragments: phase 0's count (README)
            if phase.shape != want.shape:
                row.update(result="WRONG", reason=f"phase {a},{b}: {phase.shape[2:]} positions, the original on the "
                           f"shifted input {want.shape[2:]}")
                return row
            if min(want.shape[2:]) <= start:
                continue
            diff = np.abs(phase - want)[:, :, start:, start:]
            whole = float(diff.max())
            # interior: positions whose receptive field ends inside the shifted input
            stops = [(n - out.rf_start[0] - out.rf_size[0]) // out.original_stride[0] + 1 - start
                     for n in crop.shape[2:]]
            inner = float(diff[:, :, : max(stops[0], 0), : max(stops[1], 0)].max(initial=0.0))
            end_border, interior = max(end_border, whole), max(interior, inner)
            compared += 1
    row.update(
        est=est, phases_compared=compared, start_border=start, scale=scale,
        max_abs_phase0=worst["phase 0"], max_abs_interior=interior, max_abs_end_border=end_border,
        off_grid=out.off_grid,
    )
    if skipped:
        row["note"] = skipped
    bad0 = worst["phase 0"] > TOL * scale
    bad_inner = interior > TOL * scale
    bad_end = end_border > TOL * scale
    if bad0 or bad_inner:
        row["result"] = "WRONG"
    elif bad_end:
        # fragments with uneven splits: documented (README, "What is exact, and the border")
        row["result"] = "exact except end border" if out.off_grid == "interior" else "WRONG (end border)"
    else:
        row["result"] = "exact"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated families")
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--strategies", default="dilate,fragments")
    parser.add_argument("--size", type=int, default=0, help="input side (0: chosen per model, odd)")
    parser.add_argument("--max-phases", type=int, default=3)
    parser.add_argument("--out", default="public_sweep.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    families = args.only.split(",") if args.only else list(FAMILIES)
    rows = []
    for name in families:
        builder, total, what = FAMILIES[name]
        t0 = time.perf_counter()
        try:
            module = _randomise(builder()).eval()
        except Exception as exc:  # a library that is not installed, a model it lacks
            rows.append({"family": name, "result": "not built", "reason": f"{type(exc).__name__}: {exc}"[:200]})
            print(rows[-1], flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for exporter in args.exporters.split(","):
                for stride in (total // 2, total // 4):
                    for strategy in args.strategies.split(","):
                        side = args.size or _auto_side(module, exporter, total, stride, Path(tmp))
                        try:
                            row = check(module, exporter, stride, strategy, side, Path(tmp), args.max_phases)
                        except Exception as exc:  # an exporter failure is a row too, not the end of the sweep
                            row = {"exporter": exporter, "output_stride": stride, "strategy": strategy,
                                   "result": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
                        row = {"family": name, "exercises": what, **row}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads 1, ORT 1 thread",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(rows))
    return 0


def _randomise(module):
    """Random weights that keep activations of order 1 through a deep trunk (the libraries' own
    initialisations with eval-mode BatchNorm at mean 0, var 1 can shrink them to 1e-11):
    Kaiming-normal convs and linears, BatchNorm statistics and affine parameters random."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


_SIDES: dict = {}


def _auto_side(module, exporter, total, stride, tmp: Path) -> int:
    """The smallest odd side with two positions past the start border at this output stride,
    from the receptive field the rewrite reports (one small export to learn it)."""
    key = (id(module), stride)
    if key in _SIDES:
        return _SIDES[key]
    import onnx

    import onnx_dense
    from onnx_dense import metadata
    from samples.export import export_onnx

    probe = tmp / f"probe_{total * 4 + 1}.onnx"
    if not probe.exists():
        export_onnx(module, (1, 3, total * 4 + 1, total * 4 + 1), probe, exporter="torchscript")
    side = 4 * total + 1
    for strategy in ("fragments", "dilate"):
        try:
            dense = onnx_dense.rewrite_model(onnx.load(str(probe)), output_stride=stride, strategy=strategy)
        except onnx_dense.DenseError:
            continue
        out = next(iter(metadata.read(dense).outputs.values()))
        side = _size_for(out.rf_start[0], out.original_stride[0], out.est[0], 2 * total + 1)
        break
    _SIDES[key] = side
    return side


def table(rows) -> str:
    lines = ["| family | exporter | R | strategy | result (max abs / max abs original) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("result") == "exact":
            worst = max(r["max_abs_phase0"], r["max_abs_interior"], r["max_abs_end_border"]) / r["scale"]
            res = (f"exact, {worst:.0e}" + (" (phase 0 only: global context)" if r.get("note") else
                                           f" ({r['phases_compared']} phases, end border incl.)"))
        elif r.get("result") == "exact except end border":
            res = (f"phase 0 exact, {r['max_abs_phase0'] / r['scale']:.0e}; off-grid end border differs by design "
                   f"(uneven splits), {r['max_abs_end_border'] / r['scale']:.0e}")
        else:
            res = f"{r.get('result')}: {r.get('reason', '')[:160]}"
        lines.append(f"| {r['family']} | {r.get('exporter', '')} | {r.get('output_stride', '')} | "
                     f"{r.get('strategy', '')} | {res} |")
    return "\n".join(lines)


def _cell(r) -> str:
    if r.get("result") == "exact":
        worst = max(r["max_abs_phase0"], r["max_abs_interior"], r["max_abs_end_border"]) / r["scale"]
        return f"exact {worst:.0e}" + (" (phase 0)" if r.get("note") else "")
    if r.get("result") == "exact except end border":
        return f"exact {r['max_abs_phase0'] / r['scale']:.0e} except off-grid end border"
    return f"{r.get('result')}: {r.get('reason', '')[:100]}"


def summary(rows) -> str:
    """One line per family and output stride, both exporters folded together where they agree."""
    lines = ["| family | exercises | R | dilate | fragments |", "| --- | --- | --- | --- | --- |"]
    seen = []
    for r in rows:
        key = (r["family"], r.get("output_stride"))
        if key not in seen:
            seen.append(key)
    for family, stride in seen:
        group = [r for r in rows if r["family"] == family and r.get("output_stride") == stride]
        cells = []
        for strategy in ("dilate", "fragments"):
            mine = [r for r in group if str(r.get("strategy", "")).startswith(strategy)]
            kinds = {(_cell(r).split(" ")[0], r.get("strategy"), r.get("note")) for r in mine}
            if len(kinds) == 1 and mine:
                worst = max(mine, key=lambda r: max(r.get("max_abs_phase0", 0), r.get("max_abs_end_border", 0))
                            / r.get("scale", 1))
                extra = " (--per-phase-global)" if "per-phase" in str(worst.get("strategy")) else ""
                cells.append(_cell(worst) + extra)
            else:
                cells.append("; ".join(f"{r['exporter']}: {_cell(r)}" for r in mine))
        what = group[0].get("exercises", "")
        lines.append(f"| {family} | {what} | {stride if stride is not None else ''} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--tables":  # tables of a finished run's JSON
        data = json.loads(Path(sys.argv[2]).read_text())
        print(summary(data["rows"]) + "\n\n" + table(data["rows"]))
        sys.exit(0)
    sys.exit(main())
