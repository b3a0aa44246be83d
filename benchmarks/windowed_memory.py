"""Peak resident memory of the process that runs ``onnx-dense run --tile`` against the image's size.

A ``.npy`` image is read window by window and its outputs are stitched into ``.npy`` files on
disk (``onnx_dense/runtime/windowed.py``); any other file is decoded whole and stitched in
memory. For each image side, a fresh child process runs one configuration on a random uint8
RGB image (a ``.npy`` of ``side x side x 3``) and reports the growth of its ``VmHWM`` (peak
RSS) from just before the run, after a warm-up run on a small image with the same tile (so
onnxruntime's arena, sized by the tile, and Ray's first-task costs are not counted):

* ``local``: ``run_images`` with ``tile=`` in the child (one onnxruntime thread);
* ``ray``: ``ray_engine.run_images`` with 2 workers on a local Ray the child starts (its
  workers are other processes: only the driver's memory is measured, which runs no model);
* ``in-memory``: the local run with windowing switched off (the image decoded whole as
  float32, outputs stitched in memory): what the same image cost before.

The model is a toy dense segmentation net (3x3 conv, max-pool, strided conv to 4 classes,
rewritten at output stride 2: outputs are 4 float32 maps at half the image's side), so the
outputs are 4 bytes per input pixel and the float32 input 12. Memory of the driver does not
depend on the model beyond its outputs' size; time does.

    python benchmarks/windowed_memory.py --workdir /tmp/onnx-dense-windowed   # ~4 minutes on 2 cores
    # --sides 3000 6000 12000  --tile 1024  --modes local ray in-memory  --in-memory-max 6000  --json w.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

SEG = """
<ir_version: 9, opset_import: ["" : 20]>
seg (float[1,3,32,32] input) => (float[1,4,8,8] output) <float[8,3,3,3] w1, float[4,8,3,3] w2> {
    c1 = Conv <pads = [1,1,1,1]> (input, w1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    output = Conv <pads = [1,1,1,1], strides = [2,2]> (p1, w2)
}
"""

_CHILD = textwrap.dedent(
    """
    import json, logging, os, shutil, sys, time, types
    from onnx_dense.runtime import DenseSession, batch, ray_engine, run_images, windowed

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    mode, model, image, warm, out, tile = sys.argv[1:]
    tile = int(tile)
    if mode == "ray":
        import ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        go = lambda path, where: ray_engine.run_images(model, [path], where, provider="cpu", workers=2, tile=tile)
    else:
        if mode == "in-memory":  # windowing off: load_image reads the .npy whole, the session stitches in memory
            batch.windowed = types.SimpleNamespace(is_windowed=lambda p: False, write=windowed.write,
                                                   disk_file=windowed.disk_file)
        session = DenseSession(model, provider="cpu", tile=tile, threads=1)
        go = lambda path, where: run_images(model, [path], where, session=session)
    assert go(warm, out + "-warm").ok
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    start = time.perf_counter()
    summary = go(image, out)
    seconds = time.perf_counter() - start
    assert summary.ok, summary.failed
    print(json.dumps({"growth": status("VmHWM") - base, "base": base, "seconds": seconds}))
    """
)


def _prepare(work: Path, sides, tile: int) -> tuple[str, dict[int, Path], Path]:
    import numpy as np
    import onnx
    import onnx.parser

    import onnx_dense

    work.mkdir(parents=True, exist_ok=True)
    dense = work / "seg_dense.onnx"
    if not dense.exists():
        model = onnx.parser.parse_model(SEG)
        rng = np.random.default_rng(0)
        for name, shape in {"w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)}.items():
            model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
        onnx.save(model, str(work / "seg.onnx"))
        onnx_dense.rewrite(work / "seg.onnx", dense, output_stride=2)
    images = {}
    rng = np.random.default_rng(1)
    for side in [*sides, 2 * tile + 100]:
        path = work / f"img{side}.npy"
        if not path.exists():
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(side, side, 3))
            for r in range(0, side, 1024):  # written in bands: the benchmark itself stays small
                array[r:r + 1024] = rng.integers(0, 256, (min(1024, side - r), side, 3), dtype=np.uint8)
            array.flush()
            del array
        images[side] = path
    return str(dense), images, images.pop(2 * tile + 100)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-dense-windowed"))
    parser.add_argument("--sides", type=int, nargs="+", default=[3000, 6000, 12000])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", default=["local", "ray", "in-memory"], choices=["local", "ray", "in-memory"])
    parser.add_argument("--in-memory-max", type=int, default=6000, help="largest side run in-memory")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    model, images, warm = _prepare(args.workdir, args.sides, args.tile)
    import ray

    machine = f"{os.cpu_count()} CPUs ({_cpu_name()}), Python {sys.version.split()[0]}, ray {ray.__version__}"
    print(f"machine: {machine}; load average before {os.getloadavg()[0]:.1f}; tile {args.tile}")
    env = dict(os.environ, PYTHONPATH=str(_ROOT), MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    rows = []
    print("| side | pixels | float32 image | outputs | mode | peak RSS growth | growth / (image + outputs) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for side in args.sides:
        float_image, outputs = side * side * 12, (side // 2) ** 2 * 4 * 4
        for mode in args.modes:
            if mode == "in-memory" and side > args.in_memory_max:
                continue
            out = args.workdir / f"out-{mode}-{side}"
            proc = subprocess.run([sys.executable, "-c", _CHILD, mode, model, str(images[side]), str(warm), str(out),
                                   str(args.tile)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{side} {mode}: failed\n{proc.stderr[-2000:]}")
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            row = dict(side=side, mode=mode, float_image=float_image, outputs=outputs, **result)
            rows.append(row)
            print(f"| {side}x{side} | {side * side / 1e6:.0f} M | {float_image / 1e6:.0f} MB | {outputs / 1e6:.0f} MB | "
                  f"{mode} | {result['growth'] / 1e6:.0f} MB | {result['growth'] / (float_image + outputs):.3f} | "
                  f"{result['seconds']:.1f} |", flush=True)
            for p in out.parent.glob(f"{out.name}*"):
                for f in p.iterdir():
                    f.unlink()
                p.rmdir()
    print(f"load average after {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "tile": args.tile, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
