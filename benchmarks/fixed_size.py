"""What ``DenseSession(fixed_size=...)`` buys: the dense model's symbolic input dims fixed for ORT.

For each network (built in code, TorchScript export, 224x224) and output stride, the dense
model (dilate and fragments) is loaded twice in ONNX Runtime (CPU EP, default graph
optimisations): as written (symbolic height and width) and with
``add_free_dimension_override_by_name`` for them (what ``fixed_size`` sets). The script prints
the node count of ORT's optimised graph (``optimized_model_filepath``) and the op types whose
count changes (deterministic), then times both sessions in interleaved rounds (each timed
run preceded by an untimed one; wall and CPU time, workers not spin-waiting) and checks that
the outputs agree.

    python benchmarks/fixed_size.py --models mobilenetv2,resnet18 --repeat 20
"""

from __future__ import annotations

import argparse
import collections
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
from onnx_dense.bench.machine import machine_info  # noqa: E402
from onnx_dense.runtime.session import set_spinning  # noqa: E402

MODELS = {"mobilenetv2": ("mobilenetv2", dict(width=32)), "resnet18": ("resnet", dict(width=64))}


def session(path: Path, shape, fixed: bool, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    set_spinning(so, False)
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    if fixed:
        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        for d, v in zip(dims, shape):
            if d.dim_param:
                so.add_free_dimension_override_by_name(d.dim_param, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--strides", default="16,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    from samples import zoo, zoo_context

    print(f"machine: {machine_info()}")
    print("| model | R | strategy | ORT nodes symbolic -> fixed | changed op counts | wall min symbolic / fixed ms "
          "| CPU min symbolic / fixed ms | fixed ÷ symbolic (CPU, median per round) | max abs diff |")
    print("|---|---:|---|---|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            builder, kwargs = MODELS[name]
            model = zoo.build(builder, size=224, **kwargs)
            src = zoo_context.export(model, work / f"{name}.onnx", "torchscript")
            shape = model.input_shape
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            for r in (int(s) for s in args.strides.split(",")):
                for strategy in ("dilate", "fragments"):
                    dst = work / f"{name}_{r}_{strategy}.onnx"
                    onnx_dense.rewrite(src, dst, output_stride=r, strategy=strategy)
                    counts = {}
                    sessions = {}
                    for fixed in (False, True):
                        opt = work / f"opt_{fixed}.onnx"
                        sessions[fixed] = session(dst, shape, fixed, args.threads, opt)
                        counts[fixed] = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
                    changed = {k: f"{counts[False][k]}->{counts[True][k]}" for k in counts[False] | counts[True]
                               if counts[False][k] != counts[True][k]}
                    feed = {sessions[False].get_inputs()[0].name: x}
                    outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
                    wall = {k: [] for k in sessions}
                    cpu = {k: [] for k in sessions}
                    for i in range(args.repeat):
                        for k in ((False, True) if i % 2 else (True, False)):
                            sessions[k].run(None, feed)
                            c0, t0 = time.process_time(), time.perf_counter()
                            sessions[k].run(None, feed)
                            wall[k].append((time.perf_counter() - t0) * 1e3)
                            cpu[k].append((time.process_time() - c0) * 1e3)
                    per_round = statistics.median(a / b for a, b in zip(cpu[True], cpu[False]))
                    print(
                        f"| {name} | {r} | {strategy} | {sum(counts[False].values())} -> {sum(counts[True].values())} | "
                        f"{', '.join(f'{k} {v}' for k, v in sorted(changed.items()))} | "
                        f"{min(wall[False]):.1f} / {min(wall[True]):.1f} | {min(cpu[False]):.1f} / {min(cpu[True]):.1f} | "
                        f"{per_round:.3f} | {float(np.abs(outs[True] - outs[False]).max()):.1e} |", flush=True,
                    )
    print(f"load average at the end: {machine_info()['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
