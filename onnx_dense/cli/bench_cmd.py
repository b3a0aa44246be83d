"""``onnx-dense bench ORIGINAL DENSE``: time the dense model against its original and shift-and-stitch."""

from __future__ import annotations

import click

from onnx_dense.cli import options
from onnx_dense.cli.progress import status_line


@click.command("bench")
@click.argument("original", type=options.model_path)
@click.argument("dense", type=options.model_path)
@click.option("--inputs", "inputs", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.npz",
              help="inputs to run (one array per graph input name); default: random at the rewrite's size")
@click.option("--input-shape", "input_shapes", metavar="NAME:D0,D1,...", multiple=True,
              help="run at this size instead of the rewrite's, e.g. input:1,3,512,512 (repeatable)")
@click.option("--repeat", "-n", default=10, show_default=True, help="timed rounds (each runs all three, round-robin)")
@click.option("--warmup", default=1, show_default=True, help="untimed runs of each before the rounds")
@click.option("--threads", default=2, show_default=True, help="onnxruntime intra-op threads (0: its default)")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--no-optimize", "no_optimize", is_flag=True, help="turn onnxruntime's graph optimisations off")
@click.option("--no-stitch", "no_stitch", is_flag=True, help="skip shift-and-stitch (eST^2 passes of the original)")
@click.option("--settle", default=0.2, show_default=True, metavar="SECONDS",
              help="pause before each timed measurement (lets ORT's spinning worker threads go idle)")
@click.option("--cold", is_flag=True, help="no untimed pass of the same model right before each timed one (after the pause)")
@click.option("--spin/--no-spin", "spinning", default=None,
              help="let onnxruntime's worker threads spin-wait between runs, or not  [default: onnxruntime's (spin)]")
@click.option("--profile", is_flag=True, help="also time every node with onnxruntime's profiler")
@click.option("--seed", default=0, show_default=True, help="seed of the random inputs")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--plot", "plot", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.png",
              help="also draw the times as a chart (median bars, every round a dot)")
def bench(original, dense, inputs, input_shapes, repeat, warmup, threads, provider, no_optimize, no_stitch, settle,
          cold, spinning, profile, seed, as_json, plot) -> None:
    """Time DENSE against ORIGINAL and against shift-and-stitch, on the same inputs.

    Shift-and-stitch runs ORIGINAL eST^2 times on shifted crops of the zero-padded input
    and interleaves the outputs into the dense map; it is also compared with DENSE away
    from the borders. Prints median ms, predictions per second, FLOPs and the ratios
    dense/original and shift-and-stitch/dense. Exit 0, or 1 when a check differs.
    Progress is shown only when stderr is a terminal.

    \b
    Example:
      onnx-dense rewrite model.onnx dense.onnx -r 4
      onnx-dense bench   model.onnx dense.onnx --repeat 20 --plot times.png
    """
    import onnxruntime as ort

    from onnx_dense.bench import bench as run_bench

    ort.set_default_logger_severity(3)  # a failing run is reported in our one line, not ORT's log too
    progress = None if as_json else status_line()
    result = run_bench(
        original, dense, inputs=inputs, input_shapes=options.parse_shapes(input_shapes) or None,
        provider=provider, threads=threads or None, optimize=not no_optimize, warmup=warmup, repeat=repeat,
        stitch=not no_stitch, settle=settle, prepass=not cold, spinning=spinning, profile=profile, seed=seed, progress=progress,
    )
    if progress is not None:
        progress(None)
    click.echo(result.to_json() if as_json else result.text())
    if plot:
        from onnx_dense import pictures

        pictures.save(pictures.bench_figure(result), plot)
        if not as_json:
            click.echo(f"wrote {plot}")
    if not result.passed:
        raise click.exceptions.Exit(1)
