"""Per-layer view of a rewrite before (or without) doing it: `onnx-dense inspect`.

Runs the normalise and analyse steps only, then reads the plans: kernel, stride,
dilation and pads before and after, eST, receptive field, output size in the original and
in the dense model, and totals of predictions and FLOPs (multiply-adds count 2; Conv,
Gemm/MatMul and pooling only) at the static input size.
"""

from __future__ import annotations

import dataclasses
import json
import math

import onnx_ir as ir

from onnx_dense import model_io
from onnx_dense.grid import GRID, PLAN, Grid, fmt
from onnx_dense.passes.cut import CutAtOutputs
from onnx_dense.passes.plans import ANALYSIS, PHASES, GlobalPlan, HeadConvPlan, SpatialPlan
from onnx_dense.pipeline import (
    RewriteOptions, analyse, analyse_grid, cut_names, final_upsampling_route, normalise, resolve_output_stride,
)
from onnx_dense.runnable import check_dense_sizes, check_model_runs, input_label


@dataclasses.dataclass
class Row:
    name: str
    op: str
    kernel: str
    stride: str
    dilation: str
    pads: str
    est: str
    rf: str
    size: str
    dense_size: str
    flops: int
    dense_flops: int


@dataclasses.dataclass
class Inspection:
    output_stride: tuple[int, ...] | None
    rows: list[Row]
    outputs: list[dict]
    flops: int
    dense_flops: int
    predictions: int
    dense_predictions: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def inspect_model(
    model,
    *,
    output_stride=None,
    from_node: str | None = None,
    input_shapes: dict | None = None,
    outputs=None,
    all_nodes: bool = False,
    strategy: str = "auto",
    per_phase_global: bool = False,
    final_upsampling: bool = True,
) -> Inspection:
    """The per-node view of the rewrite's analysis. ``strategy``, ``per_phase_global`` and
    ``final_upsampling`` as for rewrite ("auto" by default, as rewrite: the dilations where
    every node allows them, else the fragments' plan)."""
    if not isinstance(model, ir.Model):
        model = model_io.load(model)
    options = RewriteOptions(
        output_stride=output_stride, from_node=from_node, outputs=outputs, input_shapes=input_shapes,
        strategy=strategy, per_phase_global=per_phase_global, final_upsampling=final_upsampling,
    )
    check_model_runs(model, input_shapes, outputs)
    at = input_label(model, input_shapes)
    normalise(options)(model)
    stride = None
    if output_stride is not None or from_node is not None:
        stride = resolve_output_stride(model, options)
    blocks = final_upsampling_route(model, stride, options) if stride is not None else {}
    if blocks:  # as the rewrite does: the score maps are made dense, their upsampling rebuilt
        CutAtOutputs(cut_names(model, blocks))(model)
    if stride is None:
        analysis = analyse_grid(model, stride)
    else:
        analyse(model, stride, options)  # auto: dilate where allowed, else fragments (and its phase plan)
        analysis = model.meta[ANALYSIS]
    # fragments: a node runs once per phase its tensor carries, which an upsampling collapses
    # (deeper levels' phases coincide), so its work is not eST^2 times the original's.
    phases = model.meta.get(PHASES)
    if stride is not None:
        check_dense_sizes(
            [(o.name, o.grid.dense_size, o.grid.rf_size) for o in analysis.outputs if o.grid is not None],
            at,
        )
    rows: list[Row] = []
    total = dense_total = 0
    for node in model.graph:
        plan = node.meta.get(PLAN)
        out = node.outputs[0].meta.get(GRID) if node.outputs else None
        inp = node.inputs[0].meta.get(GRID) if node.inputs and node.inputs[0] is not None else None
        flops, dense_flops = _flops(node, plan, inp, out)
        if phases is not None and flops:
            carried = node.inputs[0] if node.op_type == "ConvTranspose" else node.outputs[0]
            dense_flops = flops * math.prod(level.phases for level in phases.layouts.get(carried, ()))
        total += flops
        dense_total += dense_flops
        if plan is None and not all_nodes and not flops:
            continue
        rows.append(_row(node, plan, inp, out, flops, dense_flops))
    outs, preds, dense_preds = [], 0, 0
    for info in analysis.outputs:
        g = info.grid
        if g is None:
            outs.append({"name": info.name, "spatial": False})
            continue
        n, d = math.prod(g.size), math.prod(g.dense_size)
        preds += n
        dense_preds += d
        entry = {
            "name": info.name, "spatial": True, "stride": list(g.stride), "dense_stride": list(g.dense_stride),
            "est": list(g.est), "rf_size": list(g.rf_size), "size": list(g.size), "dense_size": list(g.dense_size),
            "predictions": n, "dense_predictions": d,
        }
        if g.info is not None:  # an upsampled map: its predictions are further apart than its positions
            up = next((node for node in model.graph if (node.name or node.op_type) == g.upsampled_from), None)
            source = up.inputs[0].meta.get(GRID) if up is not None and up.inputs[0] is not None else None
            entry.update(
                information_stride=list(g.info), upsampled_by=g.upsampled_from,
                upsampled_from=up.inputs[0].name if up is not None else None,
                upsampled_factor=[a // b for a, b in zip(source.stride, g.stride)] if source is not None else None,
            )
        rebuilt = [b.output for b in blocks.values() if b.score == info.name]
        if rebuilt:
            entry["final_upsampling_of"] = rebuilt
        outs.append(entry)
    return Inspection(analysis.target, rows, outs, total, dense_total, preds, dense_preds)


def _row(node: ir.Node, plan, inp: Grid | None, out: Grid | None, flops: int, dense_flops: int) -> Row:
    def arrow(before, after):
        return fmt(before) if tuple(before) == tuple(after) else f"{fmt(before)}->{fmt(after)}"

    kernel = stride = dilation = pads = "-"
    if isinstance(plan, SpatialPlan):
        p = plan.params
        kernel = fmt(p.kernel)
        stride = arrow(p.strides, plan.kept)
        dilation = arrow(p.dilations, plan.dilations)
        pads = arrow(p.pads_begin + p.pads_end, plan.pads_begin + plan.pads_end)
    elif isinstance(plan, GlobalPlan):
        kernel = f"global->{fmt(plan.kernel)}"
        dilation = arrow((1,) * len(plan.est), plan.est)
    elif isinstance(plan, HeadConvPlan):
        kernel = f"fc->{fmt(tuple(plan.unflat_shape[a] for a in plan.spatial_axes))}"
        dilation = arrow((1,) * len(plan.est), plan.est)
    est = "-"
    if inp is not None and out is not None and inp.axes is not None and out.axes is not None:
        est = arrow(inp.est, out.est)
    return Row(
        name=node.name or "", op=node.op_type, kernel=kernel, stride=stride, dilation=dilation, pads=pads, est=est,
        rf=fmt(out.rf_size) if out is not None and out.axes is not None else "-",
        size=fmt(out.size) if out is not None and out.axes is not None else "-",
        dense_size=fmt(out.dense_size) if out is not None and out.axes is not None else "-",
        flops=flops, dense_flops=dense_flops,
    )


def _flops(node: ir.Node, plan, inp: Grid | None, out: Grid | None) -> tuple[int, int]:
    """FLOPs of the original and the dense node at the static size (2 per multiply-add)."""
    if out is None or out.axes is None:
        return 0, 0
    batch = 1
    shape = node.outputs[0].shape
    if shape is not None and isinstance(shape.dims[0], int):
        batch = shape.dims[0]
    positions, dense_positions = math.prod(out.size), math.prod(out.dense_size)
    if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1].shape is not None:
        w = node.inputs[1].shape
        per = 2 * math.prod(int(d) for d in w.dims)  # Cout * Cin/g * k...
        if node.op_type == "ConvTranspose" and inp is not None:
            positions, dense_positions = math.prod(inp.size), math.prod(inp.dense_size)
        return batch * per * positions, batch * per * dense_positions
    if node.op_type in ("Gemm", "MatMul") and node.inputs[1] is not None and node.inputs[1].shape is not None:
        per = 2 * math.prod(int(d) for d in node.inputs[1].shape.dims)
        if isinstance(plan, HeadConvPlan) or out.inserted:
            return batch * per, batch * per * dense_positions
        return batch * per * positions, batch * per * dense_positions
    if node.op_type in ("MaxPool", "AveragePool", "LpPool") and isinstance(plan, SpatialPlan):
        channels = _channels(node)
        per = channels * math.prod(plan.params.kernel)
        return batch * per * positions, batch * per * dense_positions
    if isinstance(plan, GlobalPlan) or node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        channels = _channels(node)
        per = channels * (math.prod(inp.size) if inp is not None and inp.axes is not None else 1)
        return batch * per, batch * per * dense_positions
    return 0, 0


def _channels(node: ir.Node) -> int:
    shape = node.inputs[0].shape
    if shape is None or len(shape.dims) < 2 or not isinstance(shape.dims[1], int):
        return 1
    return int(shape.dims[1])


def _si(value: float) -> str:
    """FLOPs with an SI prefix: 1.2G, 35.0M, 812k."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def render(result: Inspection, console=None) -> None:
    """Print the table and the totals with rich (wide enough not to wrap when piped)."""
    import shutil

    from rich.console import Console
    from rich.table import Table

    if console is None:
        width = max(shutil.get_terminal_size((160, 24)).columns, 160)
        console = Console(width=width, soft_wrap=True)
    title = "onnx-dense inspect" + (f" (output stride {fmt(result.output_stride)})" if result.output_stride else "")
    table = Table(title=title, show_lines=False)
    for col in ("node", "op", "kernel", "stride", "dilation", "pads", "eST", "RF", "size", "dense size", "FLOPs", "dense"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("FLOPs", "dense") else "left")
    for r in result.rows:
        table.add_row(
            r.name, r.op, r.kernel, r.stride, r.dilation, r.pads, r.est, r.rf, r.size, r.dense_size,
            _si(r.flops), _si(r.dense_flops),
        )
    console.print(table)
    for o in result.outputs:
        if not o["spatial"]:
            console.print(f"output {o['name']}: no spatial axes")
            continue
        if o.get("information_stride"):
            factor = f" x{fmt(o['upsampled_factor'])}" if o.get("upsampled_factor") else ""
            console.print(
                f"output {o['name']}: grid stride {fmt(o['stride'])}, predictions every {fmt(o['information_stride'])} px, "
                f"upsampled{factor} from '{o['upsampled_from']}' by '{o['upsampled_by']}'"
            )
        if o.get("final_upsampling_of"):
            console.print(
                f"output {o['name']}: the score map that the final upsampling of "
                f"{', '.join(repr(n) for n in o['final_upsampling_of'])} reads, rebuilt on its dense form"
            )
        console.print(
            f"output {o['name']}: stride {fmt(o['stride'])} -> dense grid stride {fmt(o['dense_stride'])} (eST "
            f"{fmt(o['est'])}), receptive field {fmt(o['rf_size'])}, predictions {o['predictions']} -> "
            f"{o['dense_predictions']}"
        )
    ratio = result.dense_flops / result.flops if result.flops else float("nan")
    gain = result.dense_predictions / result.predictions if result.predictions else float("nan")
    console.print(
        f"total: {_si(result.flops)}FLOPs -> {_si(result.dense_flops)}FLOPs dense ({ratio:.2f}x) for "
        f"{result.predictions} -> {result.dense_predictions} predictions ({gain:.1f}x)"
    )
