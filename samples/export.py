"""Export a PyTorch module to ONNX with either torch exporter, quietly.

``export_onnx(module, shape_or_tensor, path, exporter="torchscript"|"dynamo")``

* ``"torchscript"``: ``torch.onnx.export(..., dynamo=False)`` (legacy
  TorchScript-based exporter).
* ``"dynamo"``: ``torch.onnx.export(..., dynamo=True)`` (torch.export based,
  the default exporter since torch 2.9), with its onnxscript optimiser on
  (the torch default).

By default both exporters fold eval-mode BatchNorm into the preceding Conv
(the TorchScript exporter in its eval peephole pass, the dynamo exporter in
onnxscript's rewrite rules).  ``keep_batchnorm=True`` keeps
``BatchNormalization`` nodes instead (TorchScript: ``training=PRESERVE`` on an
eval-mode module; dynamo: the same optimiser pipeline minus the
BatchNorm-fusion rules).

The exporters' progress prints, deprecation warnings and "torchvision is not
installed" log lines are silenced unless ``verbose=True``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["EXPORTERS", "export_onnx"]

EXPORTERS = ("torchscript", "dynamo")

# Protobuf's hard limit is 2 GiB; stay clearly below it.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@contextlib.contextmanager
def _quiet(enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


@contextlib.contextmanager
def _without_batchnorm_fusion() -> Iterator[None]:
    """Temporarily drop onnxscript's BatchNorm->Conv/Gemm fusion rules from
    the default rewrite rules used by the dynamo exporter's optimiser."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    saved = rewriter._DEFAULT_REWRITE_RULES
    bn_rules = set(map(id, _fuse_batchnorm.rules.rules))
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in bn_rules)
    if len(rewriter._DEFAULT_REWRITE_RULES) == len(saved):  # pragma: no cover - onnxscript changed
        rewriter._DEFAULT_REWRITE_RULES = saved
        raise RuntimeError("could not locate onnxscript's BatchNorm fusion rules")
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


_torchscript_symbolics_registered = False


def _register_torchscript_symbolics() -> None:
    """Map the zoo's custom ops to ONNX ops for the TorchScript exporter."""
    global _torchscript_symbolics_registered
    if _torchscript_symbolics_registered:
        return
    import samples.zoo  # noqa: F401  (defines torch.ops.onnx_dense_samples.*)
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "i", "f", "f", "f")
    def lrn(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)

    torch.onnx.register_custom_op_symbolic("onnx_dense_samples::lrn", lrn, 1)
    _torchscript_symbolics_registered = True


def _dynamo_translation_table() -> dict:
    """Map the zoo's custom ops to ONNX ops for the dynamo exporter."""
    import samples.zoo  # noqa: F401
    from onnxscript import opset18 as op

    def lrn(x, size: int, alpha: float, beta: float, k: float):
        return op.LRN(x, size=size, alpha=alpha, beta=beta, bias=k)

    return {torch.ops.onnx_dense_samples.lrn.default: lrn}


def _example(module: nn.Module, input_shape_or_tensor) -> torch.Tensor:
    if isinstance(input_shape_or_tensor, torch.Tensor):
        return input_shape_or_tensor
    if input_shape_or_tensor is None:
        input_shape_or_tensor = getattr(module, "input_shape", None)
        if input_shape_or_tensor is None:
            raise ValueError("no input shape given and module has no `input_shape`")
    shape = tuple(int(d) for d in input_shape_or_tensor)
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g)


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def export_onnx(
    module: nn.Module,
    input_shape_or_tensor: Sequence[int] | torch.Tensor | None,
    path: str | os.PathLike,
    exporter: str = "torchscript",
    opset: int | None = None,
    dynamic_batch: bool = False,
    input_name: str = "input",
    output_name: str = "output",
    *,
    keep_batchnorm: bool = False,
    verbose: bool = False,
) -> Path:
    """Export ``module`` (single tensor in, single tensor out) to ``path``.

    ``input_shape_or_tensor``: an example tensor, a shape (a seeded ``randn``
    is used), or ``None`` for the module's ``input_shape`` attribute (zoo
    models have one).  ``opset=None`` uses the exporter's default (20 for
    both in torch 2.13).  ``dynamic_batch=True`` makes axis 0 of input and
    output symbolic, named ``"batch"`` in both exporters.  Models bigger than
    ~1.8 GB are written with external data (``<path>.data``).

    Returns ``Path(path)``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "dynamo" and opset is not None and opset < 18:
        # torch silently emits opset 18 instead, and onnx's version converter
        # cannot downgrade these graphs (ReduceMean-18, Pad-18, ...).
        raise ValueError(f"the dynamo exporter supports opset >= 18 only (got {opset}); use exporter='torchscript'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    x = _example(module, input_shape_or_tensor)
    big = _param_bytes(module) > _EXTERNAL_DATA_THRESHOLD
    try:
        with _quiet(not verbose), torch.no_grad():
            if exporter == "torchscript":
                _register_torchscript_symbolics()
                kwargs = {}
                if dynamic_batch:
                    kwargs["dynamic_axes"] = {input_name: {0: "batch"}, output_name: {0: "batch"}}
                if keep_batchnorm:
                    # PRESERVE on an eval-mode module = eval semantics without
                    # the Conv+BN fusion of the eval peephole pass.
                    kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
                torch.onnx.export(
                    module,
                    (x,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    verbose=False,
                    **kwargs,
                )
            else:
                kwargs = {}
                if dynamic_batch:
                    if x.shape[0] == 1:
                        # torch.export specialises size-1 dims; trace with 2.
                        x = torch.cat([x, x], 0)
                    kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
                ctx = _without_batchnorm_fusion() if keep_batchnorm else contextlib.nullcontext()
                with ctx:
                    torch.onnx.export(
                        module,
                        (x,),
                        str(path),
                        dynamo=True,
                        opset_version=opset,
                        input_names=[input_name],
                        output_names=[output_name],
                        external_data=big,
                        custom_translation_table=_dynamo_translation_table(),
                        verbose=False,
                        **kwargs,
                    )
    finally:
        module.train(was_training)
    return path
