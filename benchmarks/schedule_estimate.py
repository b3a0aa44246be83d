"""The memory estimate of a schedule against the measured peak (``runtime/schedule.py``).

For each model, size and schedule, a fresh Python process makes a budgeted ``DenseSession``
(as a run with ``max_memory`` does: no memory arena, sessions made on first use), computes the
session's estimate of the schedule's peak (``_estimator``), runs that schedule on a random
image and reads its peak RSS (``VmHWM``). ``over`` = peak / estimate (must stay below 1);
``need`` = the smallest share of onnxruntime's values (in steps of 0.05) the estimate needs
to cover the peak, to compare with ``schedule.MARGIN``.

Models: those of ``benchmarks/schedules.py`` (built there, in ``--workdir``).

    python benchmarks/schedule_estimate.py --workdir /tmp/onnx-dense-schedules \\
        --cases resnet:2048:whole,resnet:2048:phases1,resnet:4096:phases1@2468,fcn:1024:tiles@512
    # case = model:size:schedule, schedule = whole | phasesD | phasesD@TILE | tiles@TILE
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.schedules import build  # noqa: E402

_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from onnx_dense.runtime import DenseSession
    from onnx_dense.runtime import schedule as sched

    model, size, depth, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) or None
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    session = DenseSession(model, provider="cpu", max_memory="1TB")
    feeds = session._feeds(x)
    margins = [i / 20 for i in range(81)]
    estimates = {m: session._estimator((size, size), margin=m)(depth, tile) for m in margins}
    if tile is None and depth == 0:
        session.run_raw(feeds)
    elif tile is None:
        session._phase_plan(depth).run(feeds)
    else:
        runner = session._phase_plan(depth).run if depth else None
        session._run_tiled(feeds, session.check_tile(tile), None, runner=runner)
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    estimate = estimates[sched.MARGIN]
    need = min([m for m, e in estimates.items() if e >= peak] or [float("inf")])
    print(json.dumps({"estimate": estimate, "peak": peak, "over": peak / estimate, "need": need}))
    """
)


def parse_case(text: str) -> tuple[str, int, int, int]:
    model, size, kind = text.split(":")
    kind, _, tile = kind.partition("@")
    depth = 0 if kind in ("whole", "tiles") else int(kind.removeprefix("phases"))
    return model, int(size), depth, int(tile or 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-dense-schedules"))
    ap.add_argument("--cases", default="resnet:1024:whole,resnet:1024:phases1,fcn:512:whole,fcn:512:phases2")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mib = 2**20
    print("| model | size | schedule | estimate (MiB) | peak (MiB) | over | need |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        name, size, depth, tile = parse_case(case)
        model = build(name, args.workdir)
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(size), str(depth), str(tile)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"| {name} | {size} | {case.split(':')[2]} | error: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]} | | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {size} | {case.split(':')[2]} | {r['estimate'] / mib:,.0f} | {r['peak'] / mib:,.0f} | "
              f"{r['over']:.2f} | {r['need']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
