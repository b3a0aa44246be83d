"""``onnx-dense rewrite IN OUT``: write the dense equivalent of a model."""

from __future__ import annotations

import time

import click

from onnx_dense import api, metadata
from onnx_dense.cli import options
from onnx_dense.grid import GRID, fmt
from onnx_dense.passes.plans import DEFAULT_STRATEGY, Strategy


@click.command("rewrite")
@click.argument("src", metavar="IN", type=options.model_path)
@click.argument("dst", metavar="OUT", type=options.model_path)
@options.output_stride
@options.from_node
@options.input_shape
@options.outputs
@click.option(
    "--strategy", type=click.Choice([s.value for s in Strategy]), default=DEFAULT_STRATEGY.value, show_default=True,
    help="dilate: one dilated graph; fragments: the original ops per phase on the batch axis (exact for SE blocks, "
    "InstanceNorm, upsampling); auto: dilate where every node allows it, else fragments",
)
@click.option("--per-phase-global", is_flag=True,
              help="dilate: global context in the dense region (SE blocks) as exact per-phase means")
@click.option("--rederive-sizes", is_flag=True,
              help="Resize sizes baked in at export: take them at run time from the tensor of that size")
@click.option("--no-final-upsampling", is_flag=True,
              help="segmentation heads: output the dense score map before the final upsampling (a prediction every R "
              "pixels) instead of the upsampling rebuilt on it")
@click.option("--tune", is_flag=True, help="with --strategy auto: build every strategy the model allows, keep the fastest")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="where --tune measures")
@click.option("--quiet", "-q", is_flag=True, help="print nothing on success")
def rewrite(src, dst, output_stride, from_node, input_shapes, outputs, strategy, per_phase_global, rederive_sizes,
            no_final_upsampling, tune, provider, quiet) -> None:
    """Rewrite the CNN in IN into its dense equivalent and write it to OUT.

    Give the output stride with -r/--output-stride R, or the node whose stride becomes 1
    with --from NODE: one of the two is required (without either, the error lists the
    strides this model can reach; `onnx-dense inspect IN` shows them too).

    Strided Conv/pooling nodes whose input already sits at the requested output stride get
    stride 1; every later window gets dilations and pads multiplied by the equivalent stride
    (eST) (--strategy dilate), or the removed strides' phases run as a batch through the
    original ops (--strategy fragments). OUT sampled every eST positions equals IN's output.
    OUT is written atomically; IN is never modified.

    \b
    Example:
      onnx-dense rewrite model.onnx dense.onnx -r 8       # a prediction every 8 input pixels
      onnx-dense rewrite model.onnx dense.onnx --from pool4
    """
    start = time.perf_counter()
    model = api.rewrite(
        src, dst,
        output_stride=options.parse_stride(output_stride),
        from_node=from_node,
        outputs=options.parse_names(outputs),
        input_shapes=options.parse_shapes(input_shapes),
        strategy=strategy,
        per_phase_global=per_phase_global,
        rederive_sizes=rederive_sizes,
        final_upsampling=not no_final_upsampling,
        tune=tune,
        provider=provider,
    )
    if quiet:
        return
    info = metadata.read(model)
    how = info.strategy + (" with per-phase global context" if info.per_phase_global else "")
    click.echo(f"wrote {dst} ({time.perf_counter() - start:.1f} s, strategy {how})")
    if info.tuning:
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in info.tuning["median_ms"].items())
        click.echo(f"  tuned on {info.tuning['provider']}: {times} (median)")
    grids = {v.name: v.meta.get(GRID) for v in model.graph.outputs}
    for out in info.outputs.values():
        if out.upsampling:
            up = out.upsampling
            click.echo(
                f"  output '{out.name}': the final upsampling rebuilt on the dense score map '{up['score']}': a "
                f"prediction every {fmt(up['information_stride'])} input pixels, upsampled x{fmt(up['factor'])} "
                f"({up['kind']}, {up['mode']}) to the original's size {fmt(out.size)}"
                + (" (the input's, at any input size)" if up.get("sized_by") is not None else "")
            )
            continue
        grid = grids.get(out.name)
        if grid is not None and grid.info is not None and grid.info != grid.stride and all(e == 1 for e in out.est):
            # an upsampled map left as it is (the stride asked for is its score map's own)
            factor = tuple(i // s for i, s in zip(grid.info, grid.stride))
            click.echo(
                f"  output '{out.name}': a prediction every {fmt(grid.info)} input pixels, upsampled x{fmt(factor)} by "
                f"'{grid.upsampled_from}' to every {fmt(out.stride)} (as the original), receptive field {fmt(out.rf_size)}"
            )
            continue
        click.echo(
            f"  output '{out.name}': eST {fmt(out.est)}, a prediction every {fmt(out.stride)} input pixels "
            f"(original: every {fmt(out.original_stride)}), receptive field {fmt(out.rf_size)}"
        )
    for name in (o.name for o in model.graph.outputs):
        if name not in info.outputs:
            click.echo(f"  output '{name}': no spatial axes, unchanged")
    for note in model.meta.get("onnx_dense.size_notes", []):
        click.echo(f"  {note}")
    if all(v == 1 for out in info.outputs.values() for v in out.est):
        click.echo("  nothing to densify: the output stride asked for is the model's own (eST 1), "
                   "so the model written computes what the original does")
