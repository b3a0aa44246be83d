"""``--tune``: build every strategy the model allows and keep the fastest on the chosen provider.

Candidates, in order: ``dilate``; ``dilate+per-phase-global`` (only when plain dilation is
refused, since otherwise no global context sits in the dense region and it would be the same
graph); ``fragments``. Each is built from a fresh copy of the model, run in ONNX Runtime with
its default graph optimisations (what a user deploys) at the analysis size on random inputs,
``warmup`` runs then ``repeat`` timed runs; the median decides. The chosen model's metadata
records every candidate's median (``tuning``), so the choice can be audited.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import onnx
import onnx_ir as ir

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.passes.plans import Strategy
from onnx_dense.pipeline import RewriteOptions, densify

# (label, strategy, per_phase_global)
CANDIDATES = (
    ("dilate", Strategy.DILATE, False),
    ("dilate+per-phase-global", Strategy.DILATE, True),
    ("fragments", Strategy.FRAGMENTS, False),
)


def build(
    proto: onnx.ModelProto, options: RewriteOptions, strategy: Strategy | str, per_phase_global: bool = False
) -> ir.Model:
    """``densify`` of a fresh copy of ``proto`` with the given strategy."""
    model = ir.serde.deserialize_model(proto)
    return densify(model, dataclasses.replace(options, strategy=strategy, per_phase_global=per_phase_global))


def time_model(
    model: ir.Model | onnx.ModelProto, *, provider: str = "cpu", threads: int | None = None, warmup: int = 2,
    repeat: int = 5, seed: int = 0,
) -> list[float]:
    """Seconds per run of a dense model at its analysis size (ORT default optimisations)."""
    from onnx_dense.equivalence import make_inputs
    from onnx_dense.runtime.session import OrtRunner

    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    feeds = make_inputs(proto, metadata.read(proto), seed)
    with OrtRunner(proto, provider=provider, optimize=True, threads=threads) as run:
        feeds = {k: feeds[k] for k in run.input_names}
        for _ in range(warmup):
            run(feeds)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run(feeds)
            times.append(time.perf_counter() - start)
    return times


def rewrite_tuned(
    model: ir.Model | onnx.ModelProto, options: RewriteOptions, *, provider: str = "cpu", threads: int | None = None,
    repeat: int = 5,
) -> ir.Model:
    """The fastest of the strategies the model allows, with the timings in its metadata."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    built: dict[str, ir.Model] = {}
    errors: dict[str, DenseError] = {}
    for label, strategy, pg in CANDIDATES:
        if pg and "dilate" in built:
            continue
        try:
            built[label] = build(proto, options, strategy, pg)
        except DenseError as exc:
            errors[label] = exc
    if not built:
        raise errors.get("fragments") or next(iter(errors.values()))
    timings = {}
    for label, candidate in built.items():
        timings[label] = statistics.median(time_model(candidate, provider=provider, threads=threads, repeat=repeat)) * 1e3
    chosen = min(timings, key=timings.get)
    result = built[chosen]
    info = metadata.read(result)
    tuning = {
        "provider": provider,
        "median_ms": {k: round(v, 3) for k, v in timings.items()},
        "chosen": chosen,
        "refused": {k: str(v) for k, v in errors.items()},
    }
    result.metadata_props[metadata.KEY] = dataclasses.replace(info, tuning=tuning).to_json()
    return result
