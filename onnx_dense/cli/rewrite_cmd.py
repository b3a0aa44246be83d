"""``onnx-dense rewrite IN OUT``: write the dense equivalent of a model."""

from __future__ import annotations

import time

import click

from onnx_dense import api, metadata
from onnx_dense.cli import options
from onnx_dense.grid import fmt


@click.command("rewrite")
@click.argument("src", type=options.model_path)
@click.argument("dst", type=options.model_path)
@options.output_stride
@options.from_node
@options.input_shape
@options.outputs
@click.option("--quiet", "-q", is_flag=True, help="print nothing on success")
def rewrite(src, dst, output_stride, from_node, input_shapes, outputs, quiet) -> None:
    """Rewrite the CNN in SRC into its dense equivalent and write it to DST.

    Strided Conv/pooling nodes whose input already sits at the requested output stride get
    stride 1; every later window gets dilations and pads multiplied by the equivalent stride
    (eST). DST sampled every eST positions equals SRC's output. DST is written atomically;
    SRC is never modified.
    """
    start = time.perf_counter()
    model = api.rewrite(
        src, dst,
        output_stride=options.parse_stride(output_stride),
        from_node=from_node,
        outputs=options.parse_names(outputs),
        input_shapes=options.parse_shapes(input_shapes),
    )
    if quiet:
        return
    info = metadata.read(model)
    click.echo(f"wrote {dst} ({time.perf_counter() - start:.1f} s)")
    for out in info.outputs.values():
        click.echo(
            f"  output '{out.name}': eST {fmt(out.est)}, a prediction every {fmt(out.stride)} input pixels "
            f"(original: every {fmt(out.original_stride)}), receptive field {fmt(out.rf_size)}"
        )
    for name in (o.name for o in model.graph.outputs):
        if name not in info.outputs:
            click.echo(f"  output '{name}': no spatial axes, unchanged")
