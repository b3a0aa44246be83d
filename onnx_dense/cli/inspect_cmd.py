"""``onnx-dense inspect MODEL``: the per-layer view of a rewrite, without writing anything."""

from __future__ import annotations

import click

from onnx_dense import api
from onnx_dense.cli import options
from onnx_dense.grid import fmt
from onnx_dense.passes.plans import Strategy


@click.command("inspect")
@click.argument("model", type=options.model_path)
@options.output_stride
@options.from_node
@options.input_shape
@options.outputs
@click.option("--strategy", type=click.Choice([s.value for s in Strategy]), default="auto", show_default=True,
              help="analyse as rewrite --strategy would (auto: dilate where allowed, else fragments)")
@click.option("--per-phase-global", is_flag=True, help="analyse as rewrite --per-phase-global would (SE blocks)")
@click.option("--no-final-upsampling", is_flag=True,
              help="segmentation heads: analyse as rewrite --no-final-upsampling would (the score map as the output)")
@click.option("--all", "all_nodes", is_flag=True, help="list every node, not only the spatial ones")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def inspect(model, output_stride, from_node, input_shapes, outputs, strategy, per_phase_global, no_final_upsampling,
            all_nodes, as_json) -> None:
    """Show, per spatial node, what the rewrite at an output stride would change.

    Kernel, stride, dilation and pads before and after, eST, receptive field, output size in
    the original and the dense model, and totals of predictions and FLOPs. Without
    --output-stride it lists the output strides this model can be rewritten to.

    \b
    Example:
      onnx-dense inspect model.onnx              # which output strides can this model reach?
      onnx-dense inspect model.onnx -r 8 --all   # what the rewrite at 8 changes, node by node
    """
    from onnx_dense.inspection import render

    shapes = options.parse_shapes(input_shapes)
    names = options.parse_names(outputs)
    result = api.inspect_model(
        model, output_stride=options.parse_stride(output_stride), from_node=from_node, input_shapes=shapes,
        outputs=names, all_nodes=all_nodes, strategy=strategy, per_phase_global=per_phase_global,
        final_upsampling=not no_final_upsampling,
    )
    reachable = None
    if output_stride is None and from_node is None:
        reachable = api.output_strides(model, outputs=names, input_shapes=shapes)
    if as_json:
        import json

        data = json.loads(result.to_json())
        if reachable is not None:
            data["reachable_output_strides"] = [list(r) for r in reachable]
        click.echo(json.dumps(data, indent=2))
        return
    render(result)
    if reachable is not None:
        click.echo(
            "reachable output strides: " + (", ".join(fmt(r) for r in reachable) or "none")
            + " (rewrite with --output-stride R)"
        )
