"""Python API mirroring the command line: rewrite, verify, inspect."""

from __future__ import annotations

import os
from typing import Sequence

import onnx
import onnx_ir as ir

from onnx_dense import metadata, model_io
from onnx_dense.passes.plans import DEFAULT_STRATEGY, Strategy
from onnx_dense.runnable import check_dense_sizes, check_model_runs, input_label
from onnx_dense.pipeline import RewriteOptions, densify, normalise, reachable_output_strides


def rewrite_model(
    model: ir.Model | onnx.ModelProto,
    *,
    output_stride: int | Sequence[int] | None = None,
    from_node: str | None = None,
    outputs: Sequence[str] | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    strategy: Strategy | str = DEFAULT_STRATEGY,
    per_phase_global: bool = False,
    final_upsampling: bool = True,
    tune: bool = False,
    provider: str = "cpu",
    rederive_sizes: bool = False,
) -> ir.Model:
    """Return the dense equivalent of ``model`` (an onnx-ir Model is modified in place).

    ``output_stride``: one int (every spatial axis) or one per spatial axis. ``strategy``
    (:class:`~onnx_dense.passes.plans.Strategy` or its name): "auto" (the default, as in the
    CLI: dilate where the analysis allows it, else fragments), "dilate" or "fragments";
    ``per_phase_global``: dilate SE blocks as per-phase means; ``tune`` (with "auto"):
    build every strategy the model allows and keep the fastest on ``provider``;
    ``rederive_sizes``: Resize sizes baked in at export are taken at run time from the tensor
    of that size (passes/rederive_sizes.py; ``model.meta["onnx_dense.size_notes"]`` says what
    was baked and what was re-derived). ``final_upsampling`` False (``--no-final-upsampling``):
    a segmentation head's output is the dense score map its final upsampling reads, not the
    upsampling rebuilt on it.
    """
    options = RewriteOptions(
        output_stride=output_stride,
        from_node=from_node,
        outputs=outputs,
        input_shapes={k: tuple(v) for k, v in (input_shapes or {}).items()},
        strategy=strategy,
        per_phase_global=per_phase_global,
        rederive_sizes=rederive_sizes,
        final_upsampling=final_upsampling,
    )
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    model_io.negative_dims_unknown(model)
    check_model_runs(model, options.input_shapes, options.outputs)
    at = input_label(model, options.input_shapes)
    if tune:
        from onnx_dense.errors import DenseError
        from onnx_dense.strategies import rewrite_tuned

        if strategy != Strategy.AUTO:
            raise DenseError(f"--tune chooses the strategy; it needs --strategy auto, not {strategy}")
        return _check_dense_sizes(rewrite_tuned(model, options, provider=provider), at)
    return _check_dense_sizes(densify(model, options), at)


def _check_dense_sizes(model: ir.Model, at: str) -> ir.Model:
    """Refuse a dense model whose output would have no position at the size it was computed at."""
    info = metadata.read(model)
    if info is not None:
        check_dense_sizes([(o.name, o.dense_size, o.rf_size) for o in info.outputs.values()], at)
    return model


def output_strides(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    *,
    outputs: Sequence[str] | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    strategy: Strategy | str = DEFAULT_STRATEGY,
) -> list[tuple[int, ...]]:
    """The output strides ``rewrite`` accepts for this model with ``strategy`` ("auto", the
    default: those of the more permissive fragments): ``(r,)`` for the same on every spatial
    axis; one value per axis (``(3, 2)``) where the model's stride differs per axis."""
    if isinstance(model, (str, os.PathLike)):
        model = model_io.load(model)
    elif isinstance(model, onnx.ModelProto):
        model = model_io.negative_dims_unknown(ir.serde.deserialize_model(model))
    options = RewriteOptions(outputs=outputs, input_shapes={k: tuple(v) for k, v in (input_shapes or {}).items()})
    check_model_runs(model, options.input_shapes, options.outputs)
    normalise(options)(model)
    return reachable_output_strides(model, "fragments" if strategy == "auto" else strategy)


def rewrite(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    **kwargs,
) -> ir.Model:
    """Read ``src``, write its dense equivalent to ``dst`` atomically, return the dense model."""
    model = model_io.load(src)
    options = dict(kwargs)
    result = rewrite_model(model, **options)
    model_io.save(result, dst, inputs=(src,))
    return result


def verify(original, dense, **kwargs):
    from onnx_dense.equivalence import verify as _verify

    return _verify(original, dense, **kwargs)


def inspect_model(model, **kwargs):
    from onnx_dense.inspection import inspect_model as _inspect

    return _inspect(model, **kwargs)
