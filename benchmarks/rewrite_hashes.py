"""Byte-identity check for refactors: sha256 of every rewritten model of the test zoo.

Rewrites every model of the test zoo (samples/zoo.py and samples/zoo_context.py, both torch
exporters) and the foreign graphs (samples/foreign.py, as tests/test_foreign.py builds them)
at output strides 1, 2, 3, 4, 8, 16, 32 with every strategy (dilate, fragments, auto, and
dilate --per-phase-global), and prints one line per case: the sha256 of the serialized dense
model, or the refusal's message. The reachable output strides of each model are listed too.

Run it before and after a change that must not change outputs and diff the two tables:

    python -m benchmarks.rewrite_hashes --cache /tmp/zoo-onnx > before.txt
    ...change...
    python -m benchmarks.rewrite_hashes --cache /tmp/zoo-onnx > after.txt && diff before.txt after.txt

``--cache`` keeps the exported ONNX files so both runs rewrite the very same inputs (the torch
exporters are not guaranteed to be byte-stable across processes).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # samples/ and tests/ are imported from the checkout, not installed
    sys.path.insert(0, str(_ROOT))

import onnx
import onnx_ir as ir

from onnx_dense import api
from onnx_dense.errors import DenseError

STRIDES = (1, 2, 3, 4, 8, 16, 32)
CASES = (("dilate", False), ("fragments", False), ("auto", False), ("dilate", True))


def _zoo(cache: Path):
    from samples import zoo, zoo_context
    from samples.export import EXPORTERS, export_onnx

    for exporter in EXPORTERS:
        for name in [*zoo.ZOO, *zoo.VARIANTS]:
            path = cache / f"{name}_{exporter}.onnx"
            if not path.exists():
                model = zoo.build(name)
                export_onnx(model, model.input_shape, path, exporter=exporter)
            yield f"zoo/{name}/{exporter}", path, {}
        for name in zoo_context.CONTEXT_ZOO:
            path = cache / f"context_{name}_{exporter}.onnx"
            if not path.exists():
                zoo_context.export(zoo_context.build(name), path, exporter=exporter)
            yield f"context/{name}/{exporter}", path, {}


def _foreign(cache: Path):
    from samples import foreign
    from tests.test_foreign import BACKBONE, MODELS

    for name, (builder, kwargs, shapes, *_rest) in MODELS.items():
        path = cache / f"foreign_{name}.onnx"
        if not path.exists():
            onnx.save(foreign.build(builder, **kwargs), str(path))
        opts = {"input_shapes": shapes} if shapes else {}
        yield f"foreign/{name}", path, opts
        if name == "tf_yolo_tiny":
            yield f"foreign/{name}/backbone", path, {"outputs": BACKBONE}


def _one(proto: onnx.ModelProto, **kwargs) -> str:
    try:
        dense = api.rewrite_model(ir.serde.deserialize_model(proto), **kwargs)
    except DenseError as exc:
        return f"refused: {exc}"
    data = ir.serde.serialize_model(dense).SerializeToString()
    return hashlib.sha256(data).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnx-dense-hash-zoo"))
    parser.add_argument("--only", default="", help="substring of the model names to run")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    count = 0
    for source in (_zoo(args.cache), _foreign(args.cache)):
        for label, path, opts in source:
            if args.only not in label:
                continue
            proto = onnx.load(str(path))
            print(f"{label} input {hashlib.sha256(proto.SerializeToString()).hexdigest()}", flush=True)
            for strategy in ("dilate", "fragments"):
                try:
                    reach = api.output_strides(proto, strategy=strategy, **opts)
                    text = " ".join("x".join(map(str, r)) for r in reach)
                except DenseError as exc:
                    text = f"refused: {exc}"
                print(f"{label} reachable {strategy}: {text}", flush=True)
            for stride in STRIDES:
                for strategy, ppg in CASES:
                    result = _one(proto, output_stride=stride, strategy=strategy, per_phase_global=ppg, **opts)
                    tag = strategy + ("+per-phase-global" if ppg else "")
                    print(f"{label} r={stride} {tag} {result}", flush=True)
                    count += 1
    print(f"{count} rewrites", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
