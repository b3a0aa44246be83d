"""``onnx-dense export-dpoa ORIGINAL TRAINED OUT``: the trained weights back in the original.

TRAINED is a checkpoint from ``onnx-dense train`` (.pt; reading it needs PyTorch) or a trained
dense ONNX model. OUT is ORIGINAL with nothing changed but its initializers' values.
"""

from __future__ import annotations

import click

from onnx_dense.cli import options


@click.command("export-dpoa")
@click.argument("original", type=options.model_path)
@click.argument("trained", type=options.model_path)
@click.argument("out", type=options.model_path)
@click.option("--dense", "dense", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="the dense model TRAINED was trained from (default: the one the checkpoint records)")
@click.option("--dense-out", "dense_out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="also write the trained dense model here")
@click.option("--verify", "check", is_flag=True,
              help="then check OUT against the trained dense model, as `onnx-dense verify` does")
@click.option("--quiet", "-q", is_flag=True, help="print nothing on success")
def export_dpoa(original, trained, out, dense, dense_out, check, quiet) -> None:
    """Write OUT: ORIGINAL with the weights trained on its dense model (dpoa).

    Same nodes, attributes, names, opset and metadata as ORIGINAL; only initializer values
    change. Refuses weights whose names or shapes do not fit ORIGINAL. ORIGINAL is never
    written to. TRAINED is a checkpoint from `onnx-dense train` (.pt) or a trained dense .onnx.

    \b
    Example:
      onnx-dense export-dpoa model.onnx checkpoints/last.pt model_dpoa.onnx --verify --dense-out trained.onnx
    """
    from onnx_dense.train.dpoa import export_dpoa as run_export

    result = run_export(original, trained, out, dense=dense, dense_out=dense_out)
    if not quiet:
        click.echo(
            f"wrote {result.out}: {result.replaced} weights from {trained} ({result.changed} differ from {original})"
        )
        if result.dense_out is not None:
            click.echo(f"wrote {result.dense_out}: the trained dense model")
    if check:
        reference = result.dense_out
        if reference is None and str(trained).lower().endswith(".onnx"):
            reference = trained
        if reference is None:
            from onnx_dense.errors import DenseError

            raise DenseError("--verify needs the trained dense model: add --dense-out PATH or pass a trained .onnx")
        from onnx_dense import api

        report = api.verify(out, reference)
        if not quiet or not report:
            click.echo(report.text())
        if not report:
            raise click.exceptions.Exit(1)
