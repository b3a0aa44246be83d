"""``onnx-dense verify ORIGINAL DENSE``: prove the dense model equivalent, output by output."""

from __future__ import annotations

import click
import onnx

from onnx_dense import api
from onnx_dense.cli import options
from onnx_dense.equivalence import DEFAULT_ATOL, DEFAULT_RTOL


@click.command("verify")
@click.argument("original", type=options.model_path)
@click.argument("dense", type=options.model_path)
@click.option("--inputs", "inputs", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.npz",
              help="inputs to run (one array per graph input name); default: random at the rewrite's size")
@click.option("--seed", default=0, show_default=True, help="seed of the random inputs")
@click.option("--phases", is_flag=True,
              help="also check every off-grid phase against the original run on the shifted input")
@click.option("--max-phases", default=64, show_default=True, help="check at most this many phases (chosen at random)")
@click.option("--rtol", default=DEFAULT_RTOL, show_default=True, help="tolerance relative to max|original|")
@click.option("--atol", default=DEFAULT_ATOL, show_default=True, help="absolute tolerance")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--optimize", is_flag=True, help="let onnxruntime optimise the graphs (off by default: fusions can hide a bug)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--plot", "plot", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.png",
              help="also draw each phase's max difference against the tolerance (with --phases: every phase)")
def verify(original, dense, inputs, seed, phases, max_phases, rtol, atol, provider, optimize, as_json, plot) -> None:
    """Check that DENSE (from `onnx-dense rewrite`) sampled every eST positions equals ORIGINAL.

    Also: every weight of ORIGINAL is in DENSE unchanged, DENSE runs at a larger input, and
    with --phases every other phase equals ORIGINAL run on the shifted input. A SKIP line is
    a check that could not be made (the line says why); it is counted apart, not as passed.
    Exit 0 when every check passes, 1 when any differs, 2 on bad input.

    \b
    Example:
      onnx-dense rewrite model.onnx dense.onnx -r 8
      onnx-dense verify  model.onnx dense.onnx --phases --plot phases.png
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # a size the original refuses is handled and reported, not ORT's log too
    report = api.verify(
        original, dense, inputs=inputs, seed=seed, phases=phases, max_phases=max_phases, rtol=rtol, atol=atol,
        provider=provider, optimize=optimize,
    )
    click.echo(report.to_json() if as_json else report.text())
    if plot:
        from onnx_dense import metadata, pictures

        info = metadata.read(onnx.load(dense, load_external_data=False))
        est = {name: tuple(out.est) for name, out in info.outputs.items()} if info else {}
        pictures.save(pictures.verify_figure(report, est), plot)
        if not as_json:
            click.echo(f"wrote {plot}")
    if not report:
        raise click.exceptions.Exit(1)
