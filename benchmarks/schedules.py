"""Time and peak memory of a dense model against image size: whole, tiled, and by a memory budget.

The question: **does running phase by phase keep a dense model within a memory budget at about
the untiled time, where tiling pays for its overlap?** For each model and image size, three
runs of ``DenseSession.run`` on the same random image, side by side, each in a fresh Python
process (so its peak is its own):

* ``whole``: the dense model on the whole image (no budget);
* ``tiled``: ``tile=--tile`` (overlap included), the tiling that existed before;
* ``budget``: ``max_memory=--budget`` (``budget=2GB``: that budget): the session picks whole,
  phases, tiled-trunk or phases+tiles from its estimate (the schedule chosen is in the table);
  ``budget=700MB@phases+tiles`` forces one kind, sized to the budget (to compare two kinds).

A whole run whose estimate is above ``--max-whole`` is not run (its row says what it would
need); the other runs are then compared with the tiled run. ``--keep`` keeps the outputs, so
that runs made by several invocations can be compared. ``--image pixels`` gives each child
8-bit pixels read by windows (:class:`onnx_dense.runtime.images.PixelsImage`, what ``onnx-dense
run`` feeds under a budget): the timed run makes the input it needs, the whole float input for
a run on the whole image, a window per tile otherwise.

Each child reports the run's wall time (one run, after building the session), its peak RSS
(``VmHWM`` of the whole process: Python, onnxruntime, weights, image, outputs) and the RSS
before the run; it saves the outputs, and the parent compares them with the whole run's
(bit for bit, else the largest difference relative to the largest value).

Models (built in code, random weights, TorchScript export, nothing downloaded):

* ``fcn``: the FCN sample (``samples.zoo.build("fcn")``, width 8, 4 stages), output stride 1:
  eST 16 after four removed pools; receptive field 108 pixels (small).
* ``resnet``: a ResNet-18 layout of width 16 exported at 224 with its classifier head, output
  stride 8 (layer3 and layer4 strides removed, eST 2 and 4; the head's global pool becomes a
  7x7 average dilated by 4); receptive field 627 pixels (large, like ResNet-50's 427).
* ``deeplab``: the DeepLabV3 sample (``samples.segmentation``, width 16: a stride-8 backbone,
  ASPP with global pooling, bilinear upsampling back to the input), output stride 2, rewritten
  with ``rederive_sizes``. ``auto`` writes it as ``fragments`` (global context in the dense
  region): no tiles of the whole model; under a budget it runs by phases of its batch
  (:mod:`onnx_dense.runtime.fragment_batches`), its trunk on tiles if need be. Run it with
  ``--runs whole,budget``.
* ``fcn8s``: the FCN-8s sample (``samples.segmentation``, width 8: a VGG-like backbone of five
  pools, skip joins at strides 8 and 16, a bilinear ConvTranspose back to the input), output
  stride 1, ``fragments`` like ``deeplab``: three levels of phases, and a trunk at the image's
  size (two 8-channel convs) that is the largest stage.
* ``deeplab21``: ``deeplab`` with 21 classes (as Pascal VOC): its rebuilt final upsampling
  (21 maps the image's size) is the largest part of a budgeted run, where the final
  upsampling runs in bands of the score map's rows (:mod:`onnx_dense.runtime.final_tail`).

Run (Linux: reads /proc/self/status):

    python benchmarks/schedules.py --workdir /tmp/onnx-dense-schedules --json schedules.json
    # --models fcn,resnet  --sizes 512,1024,2048,4096  --budget 1GB  --tile 512  --runs whole,tiled,budget,budget=2GB
    # --models deeplab,/path/to/any_dense.onnx --runs whole,budget   (fragments models: no tiles)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # samples/ is imported from the checkout, not installed
    sys.path.insert(0, str(ROOT))

MODELS = {
    "fcn": dict(zoo="fcn", kwargs={}, stride=1, tile=512),
    "resnet": dict(zoo="resnet", kwargs={"width": 16, "size": 224}, stride=8, tile=1024),
    "deeplab": dict(segmentation="deeplabv3", kwargs={"width": 16}, stride=2, tile=None),
    "fcn8s": dict(segmentation="fcn8s", kwargs={"width": 8}, stride=1, tile=None),
    "deeplab21": dict(segmentation="deeplabv3", kwargs={"width": 16, "num_classes": 21}, stride=2, tile=None),
}

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from onnx_dense.runtime import DenseSession

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

    model, size, kind, tile, budget, out, runs, image = sys.argv[1:9]
    size = int(size)
    if image == "pixels":  # 8-bit pixels, as onnx-dense run reads a PNG; the run makes the input (timed)
        from onnx_dense.runtime.images import PixelsImage
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        x = PixelsImage(pixels, 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3, (2, 3), np.dtype(np.float32))
    else:
        x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    options = {}
    if kind == "tiled":
        options["tile"] = int(tile)
    if kind.startswith("budget"):
        kind, _, forced = kind.partition("@")
        options["max_memory"] = kind.partition("=")[2] or budget
        if forced:
            options["schedule"] = forced
    session = DenseSession(model, provider="cpu", **options)
    before = status("VmRSS")
    t0 = time.perf_counter()
    maps = session.run(x)
    seconds = time.perf_counter() - t0
    chosen = session.last_schedule.describe() if session.last_schedule else kind
    second = {}
    if int(runs) >= 2:  # the same image again: the sessions exist, as for every image after the first
        times = []
        for _ in range(int(runs) - 1):
            del maps
            t0 = time.perf_counter()
            maps = session.run(x)
            times.append(time.perf_counter() - t0)
        second = {"seconds2": min(times), "runs2": len(times),
                  "schedule2": session.last_schedule.describe() if session.last_schedule else kind}
    peak = status("VmHWM")
    for i, (name, m) in enumerate(maps.items()):
        np.save(f"{out}.{i}.npy", m.numpy())
    print(json.dumps({"seconds": seconds, "peak": peak, "before": before, "schedule": chosen, **second}))
    """
)


def build(name: str, workdir: Path) -> Path:
    import onnx_dense
    from samples import export, zoo

    if name.endswith(".onnx"):  # a dense model written elsewhere (a public one: benchmarks/README.md)
        return Path(name)
    spec = MODELS[name]
    src = workdir / f"{name}.onnx"
    dst = workdir / f"{name}_dense_r{spec['stride']}.onnx"
    if not dst.exists():
        if "segmentation" in spec:  # its interpolation sizes, baked at export, taken at run time
            from samples import segmentation

            segmentation.export(segmentation.build(spec["segmentation"], **spec["kwargs"]).eval(), src)
            onnx_dense.rewrite(src, dst, output_stride=spec["stride"], rederive_sizes=True)
        else:
            export.export_onnx(zoo.build(spec["zoo"], **spec["kwargs"]), None, src)
            onnx_dense.rewrite(src, dst, output_stride=spec["stride"])
    return dst


def child(model: Path, size: int, kind: str, tile: int, budget: str, out: Path, runs: int = 1,
          extra_env: dict | None = None, image: str = "float") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model), str(size), kind, str(tile), budget, str(out), str(runs), image],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> str:
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    if x.shape != y.shape:
        return f"shape {y.shape} vs {x.shape}"
    worst, scale = 0.0, 0.0
    step = max(1, x.shape[-2] // 16)
    for i in range(0, x.shape[-2], step):
        xa, ya = np.asarray(x[..., i:i + step, :]), np.asarray(y[..., i:i + step, :])
        worst = max(worst, float(np.max(np.abs(xa - ya))) if xa.size else 0.0)
        scale = max(scale, float(np.max(np.abs(xa))) if xa.size else 0.0)
    if worst == 0.0:
        return "identical"
    return f"{worst / max(scale, 1e-30):.1e} rel"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-dense-schedules")
    ap.add_argument("--models", default="fcn,resnet", help="names above, or paths of dense .onnx files")
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    ap.add_argument("--runs", default="whole,tiled,budget",
                    help="budget=2GB: a run with that budget instead of --budget; budget=2GB@phases+tiles: with that "
                    "schedule forced (the session still sizes it to the budget)")
    ap.add_argument("--budget", default="1GB")
    ap.add_argument("--tile", type=int, default=None, help="default: 512 (fcn), 1024 (resnet: the least is 634)")
    ap.add_argument("--json", type=Path, help="write the rows there (appended to the rows already in it)")
    ap.add_argument("--max-whole", default="12GB",
                    help="skip whole runs estimated above this (the row says what they would need)")
    ap.add_argument("--second-run", action="store_true",
                    help="run each image twice in its child and time the second run too (the sessions exist by then, "
                    "as for every image after the first; the peak is over both)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in every child's environment, e.g. GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages "
                    "for glibc's large blocks)")
    ap.add_argument("--budget-env", action="append", default=[], metavar="KEY=VALUE",
                    help="set only in budgeted children's environment, as the onnx-dense script does for budgeted runs "
                    "(GLIBC_TUNABLES=glibc.malloc.hugetlb=1: onnx_dense/_entry.py)")
    ap.add_argument("--repeat", type=int, default=0,
                    help="with --second-run: time this many runs after the first and report the fastest")
    ap.add_argument("--image", choices=("float", "pixels"), default="float",
                    help="pixels: 8-bit pixels read by windows (load_image(..., windows=True)); each run makes the "
                    "input it needs, timed: the whole float input (whole runs), or each tile's window")
    ap.add_argument("--keep", action="store_true",
                    help="keep the outputs (to compare with a whole run made by another invocation)")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    print(f"machine: {machine}; budget {args.budget}" + (f"; children's env {' '.join(args.env)}" if args.env else "")
          + (f"; budgeted children's env {' '.join(args.budget_env)}" if args.budget_env else ""), flush=True)
    for path in args.models.split(","):
        model = build(path, args.workdir)
        name = model.stem if path.endswith(".onnx") else path
        for size in [int(s) for s in args.sizes.split(",")]:
            results = {}
            for kind in args.runs.split(","):
                out = args.workdir / f"out_{name}_{size}_{kind}"
                if kind == "whole" and (need := whole_estimate(model, size)) > parse_memory(args.max_whole):
                    results[kind] = dict(model=name, size=size, kind=kind, skipped=f"not run: needs ~{need / 2**30:.1f} GB (est.)")
                    continue
                before = load()
                env = dict(e.split("=", 1) for e in [*args.env, *(args.budget_env if kind.startswith("budget") else [])])
                r = child(model, size, kind, args.tile or MODELS.get(name, {}).get("tile") or 512, args.budget, out,
                          1 + max(1, args.repeat) if args.second_run else 1, env, args.image)
                r.update(model=name, size=size, kind=kind, load_before=before, load_after=load(), uptime=uptime(),
                         env=env, image=args.image)
                results[kind] = r
            ref = args.workdir / f"out_{name}_{size}_whole.0.npy"
            if not ref.exists():  # no whole run: compare with the tiled one
                ref = args.workdir / f"out_{name}_{size}_tiled.0.npy"
            for kind, r in results.items():
                mine = args.workdir / f"out_{name}_{size}_{kind}.0.npy"
                if "seconds" in r and ref.exists() and mine != ref:
                    r["equal"] = compare(ref, mine) + ("" if ref.name.endswith("whole.0.npy") else " (to tiled)")
                base = results.get("whole", {}).get("seconds")
                if base and "seconds" in r:
                    r["ratio"] = r["seconds"] / base
                base2 = results.get("whole", {}).get("seconds2")
                if base2 and "seconds2" in r:
                    r["ratio2"] = r["seconds2"] / base2
                rows.append(r)
                print(row(r), flush=True)
            if not args.keep:
                for f in args.workdir.glob(f"out_{name}_{size}_*.npy"):
                    f.unlink()
    if args.json:
        old = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
        args.json.write_text(json.dumps({"machine": machine, "budget": args.budget, "tile": args.tile,
                                         "rows": old + rows}, indent=1))
    return 0


def whole_estimate(model: Path, size: int) -> int:
    """The session's own estimate of a whole run's peak (no image made)."""
    from onnx_dense.runtime import DenseSession

    session = DenseSession(str(model), provider="cpu", max_memory="1TB")
    return session._estimator((size, size))(0) - _rss_now() + 150 * 2**20  # a fresh child: ~150 MB before


def _rss_now() -> int:
    from onnx_dense.runtime.dense_session import _rss

    return _rss()


def parse_memory(text: str) -> int:
    from onnx_dense.runtime.schedule import parse_memory as parse

    return parse(text)


def row(r: dict) -> str:
    if "skipped" in r:
        return f"| {r['model']} | {r['size']} | {r['kind']} | - | - | - | - | {r['skipped']} | |"
    if "error" in r:
        return f"| {r['model']} | {r['size']} | {r['kind']} | error: {r['error']} | | | | |"
    mib = 2**20
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    seconds = f"{r['seconds']:.2f}"
    if "seconds2" in r:  # first / second run
        seconds += f" / {r['seconds2']:.2f}"
        ratio += f" / {r['ratio2']:.2f}x" if "ratio2" in r else " / -"
        if r["schedule2"].split(";")[0] != r["schedule"].split(";")[0]:
            r["schedule"] += f"; second run: {r['schedule2']}"
    return (f"| {r['model']} | {r['size']} | {r['kind']} | {seconds} | {ratio} | "
            f"{r['peak'] / mib:,.0f} | {r.get('equal', '-')} | {r['schedule']} | {r['load_before']} |")


if __name__ == "__main__":
    sys.exit(main())
