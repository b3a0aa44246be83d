"""``onnx-dense run --engine ray`` against the single-process run: images per second per worker count.

The model is the FCN sample (``samples.zoo``, random weights) rewritten at output stride 4;
the images are random 256x256 PNGs, and one large image is run with ``--tile``. Every
configuration runs the same files, written in full (.npy, .png, .json), in rounds that
alternate the configurations, so that ratios are taken side by side under the same load:

* ``local``: ``run_images`` in this process, onnxruntime's default threads (the CPU's cores);
* ``local-1t``: the same with one thread (``DenseSession(threads=1)``): what one Ray worker computes;
* ``ray-1``, ``ray-2``: ``ray_engine.run_images`` with 1 and 2 workers of one CPU each, on a
  local Ray started once by this script (``ray.init``: its start is reported, not counted).

A Ray run's time is split where its workers report ready (``on_ready``): before, the fixed
cost of a run (starting the worker actors, each importing onnx-dense and onnxruntime and
opening its session); after, the images. Images per second are ``--images`` over the second
part (for the local runs: over the whole call, which includes opening one session).
``ray-1`` against ``local-1t`` is the same one-thread compute, but split over two processes
(the worker decodes, runs, draws and encodes; the driver reads and writes files), so on two
cores it can be faster. Ray's own cost per image is therefore also measured alone: a worker
that does nothing gets the bytes of one image and answers with as many bytes as its result
files, one task at a time, as the engine sends them.

    python benchmarks/ray_scaling.py --workdir /tmp/onnx-dense-ray     # ~3 minutes on 2 cores
    # --images 24  --rounds 2  --big 1536 --tile 512  --json ray.json

The load average (``os.getloadavg``) is printed before and after: on a shared machine the
absolute numbers move with it, the ratios within one round much less.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _prepare(work: Path, n: int, size: int, big: int) -> tuple[str, list[str], str]:
    import numpy as np
    from PIL import Image

    import onnx_dense

    work.mkdir(parents=True, exist_ok=True)
    original = work / "fcn.onnx"
    if not original.exists():
        subprocess.run([sys.executable, "-m", "samples.make_samples", str(work), "--models", "fcn"], check=True,
                       cwd=_ROOT, stdout=subprocess.DEVNULL)
    dense = work / "fcn_dense.onnx"
    if not dense.exists():
        onnx_dense.rewrite(original, dense, output_stride=4)
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        path = work / f"img{i:03d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    large = work / f"big{big}.png"
    if not large.exists():
        Image.fromarray(rng.integers(0, 256, (big, big, 3), dtype=np.uint8)).save(large)
    return str(dense), images, str(large)


def _timed(fn) -> tuple[float, float]:
    """(seconds to start, seconds to run): a Ray run reports when its workers are ready."""
    t = time.perf_counter()
    ready = []
    summary = fn(lambda _n: ready.append(time.perf_counter()))
    end = time.perf_counter()
    assert summary.ok, summary.failed
    start = (ready[0] - t) if ready else 0.0
    return start, end - t - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-dense-ray"))
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--big", type=int, default=1536, help="side of the large image (0: none)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import ray

    from onnx_dense.runtime import DenseSession, ray_engine, run_images

    dense, images, large = _prepare(args.workdir, args.images, args.size, args.big)
    out = args.workdir / "out"
    load_before = os.getloadavg()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray_start = time.perf_counter() - t

    def local(threads):
        def go(files, tile, on_ready):
            session = DenseSession(dense, provider="cpu", threads=threads, spinning=False if threads else None, tile=tile)
            return run_images(dense, files, out, session=session)
        return go

    def on_ray(workers):
        def go(files, tile, on_ready):
            return ray_engine.run_images(dense, files, out, provider="cpu", tile=tile, workers=workers, resume=False,
                                         on_ready=on_ready)
        return go

    configs = {"local": local(None), "local-1t": local(1), "ray-1": on_ray(1), "ray-2": on_ray(2)}
    times: dict[str, dict[str, list]] = {name: {"N": [], "big": []} for name in configs}
    for r in range(args.rounds):
        for name, go in configs.items():
            for key, files, tile in (("N", images, None), ("big", [large], args.tile)):
                if key == "big" and not args.big:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                times[name][key].append(_timed(lambda ready: go(files, tile, ready)))
            print(f"round {r + 1} {name}: " + ", ".join(
                f"{k} start {v[-1][0]:.2f} s + run {v[-1][1]:.2f} s" for k, v in times[name].items() if v),
                file=sys.stderr, flush=True)
    one = args.workdir / "out_one"  # the result files of one image, for their size
    shutil.rmtree(one, ignore_errors=True)
    run_images(dense, images[:1], one, provider="cpu")
    echo = _echo_round_trip(ray, images[0], one, tasks=4 * args.images)
    ray.shutdown()
    load_after = os.getloadavg()

    n = args.images
    rows = {}
    for name, t_ in times.items():
        run_n = statistics.median(t for _, t in t_["N"])
        rows[name] = {"per_image": run_n / n, "images_per_s": n / run_n,
                      "start": statistics.median(s for s, _ in t_["N"] + t_["big"]),
                      "big": statistics.median(t for _, t in t_["big"]) if t_["big"] else None}
    machine = f"{os.cpu_count()} CPUs ({_cpu_name()}), Python {sys.version.split()[0]}, ray {ray.__version__}"
    print(f"\nmachine: {machine}; {n} images of {args.size}x{args.size}, FCN sample at output stride 4, "
          f"{args.rounds} rounds, medians")
    print(f"load average (1, 5, 15 min): before {_load(load_before)}, after {_load(load_after)}; "
          f"local Ray start {ray_start:.1f} s (once, not counted)\n")
    base = rows["local"]["per_image"]
    print("| run | images/s | ms per image | vs local | workers' start per run (s) | "
          f"one {args.big}x{args.big} image, --tile {args.tile} (s) |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        big = f"{row['big']:.2f}" if row["big"] is not None else "-"
        print(f"| {name} | {row['images_per_s']:.1f} | {1000 * row['per_image']:.1f} | "
              f"{base / row['per_image']:.2f}x | {row['start']:.1f} | {big} |")
    overhead = rows["ray-1"]["per_image"] - rows["local-1t"]["per_image"]
    print(f"\nRay's overhead per image (ray-1 minus local-1t): {1000 * overhead:.1f} ms "
          f"({100 * overhead / rows['local-1t']['per_image']:.0f}% of one image's one-thread run); "
          f"ray-2 / ray-1 throughput: {rows['ray-1']['per_image'] / rows['ray-2']['per_image']:.2f}x")
    print(f"Ray's own round trip per task, one task at a time to one worker that does nothing: "
          f"{1000 * echo['per_task']:.1f} ms ({echo['in_bytes'] / 1024:.0f} KiB out, {echo['out_bytes'] / 1024:.0f} KiB back, "
          f"the bytes of one image and of its result files)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "load_before": load_before, "load_after": load_after,
                                         "ray_start_s": ray_start, "rows": rows, "times": times, "echo": echo,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0


def _echo_round_trip(ray, image: str, results: Path, tasks: int) -> dict:
    """Seconds per task of a worker that only answers: what Ray adds to each image, without the image's work."""

    class Echo:
        def answer(self, data: bytes, size: int) -> bytes:
            return bytes(size)

    data = Path(image).read_bytes()
    stem = Path(image).stem
    size = sum(p.stat().st_size for p in results.glob(f"{stem}.*"))
    actor = ray.remote(Echo).options(num_cpus=1).remote()
    ray.get(actor.answer.remote(data, size))
    t = time.perf_counter()
    for _ in range(tasks):
        ray.get(actor.answer.remote(data, size))
    per_task = (time.perf_counter() - t) / tasks
    ray.kill(actor)
    return {"per_task": per_task, "in_bytes": len(data), "out_bytes": size, "tasks": tasks}


def _load(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
