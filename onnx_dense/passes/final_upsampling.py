"""Rebuild the final upsampling of a segmentation head on the dense score map (after finalise).

The pipeline cut the model at the score map T of each output whose final block is fixed
(passes/analysis/final_upsampling.py) and made everything up to T dense at stride R. This pass
appends, per such output, the block rebuilt on the dense T (onnx_dense/interpolation.py):

* Resize (not align_corners): Pad T (edge) -> Resize by m, asymmetric, same mode and
  nearest_mode -> Slice (start, tail dropped): output pixel y reads the dense map at
  (y - offset) / m, clamped, as the original read T at (y - offset) / s. A half-pixel offset:
  linear Resize half_pixel by m where the offset allows it (an even m), else asymmetric by 2m
  and every other pixel (that map is four times the output's: the largest of a run at 4096).
* Resize align_corners: Slice T to the positions the original's first..last span -> Resize
  align_corners to m times T's size (sizes from Shape(T)).
* Bilinear ConvTranspose: Pad T (zeros) -> ConvTranspose of the bilinear kernel for m, one per
  channel, the original's bias -> Slice.
* Then the block's per-position ops (Sigmoid, Softmax over channels, ArgMax, ...), copied.

The output keeps its name, its size and its place among the outputs; T stays an output too
(appended), so ``verify`` compares it on the subgrid and the phases, and the output against
the numpy form of the rebuilt block. Every shape the nodes read is relative (pads, a crop from
the end, scales), so the model runs at any input size, as the original does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnx_dense import metadata
from onnx_dense.interpolation import axis_plan, half_pixel_fits
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.final_upsampling import FinalUpsampling, bilinear_kernel

INT64_MAX = np.iinfo(np.int64).max


class RebuildFinalUpsampling(ir.passes.InPlacePass):
    def __init__(self, blocks: dict[str, FinalUpsampling], originals: dict[str, tuple], rf: dict[str, tuple]) -> None:
        super().__init__()
        self.blocks = blocks
        self.originals = originals  # output name -> (type, shape) of the original output
        self.rf = rf  # output name -> (rf_size, rf_start) of the original output

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        info = metadata.read(model)
        editor = _ir.Editor(graph)
        opset = _ir.opset(model)
        outputs = {}
        for block in self.blocks.values():
            entry = info.outputs[block.score]
            score = next(v for v in graph.outputs if v.name == block.score)
            nodes: list[ir.Node] = []
            y = self.build(editor, nodes, block, entry, score, opset)
            for n in nodes:
                graph.append(n)
            index = next(i for i, v in enumerate(graph.outputs) if v is score)
            graph.outputs[index] = y
            y.name = block.output
            otype, oshape = self.originals[block.output]
            y.type = otype
            dims = list(oshape.dims) if oshape is not None else None
            if dims is not None:
                for k, a in enumerate(block.out_axes):
                    dims[a] = ir.SymbolicDim(f"{block.output}_{('height', 'width', 's2')[k] if k < 3 else k}")
                y.shape = ir.Shape(dims)
            graph.outputs.append(score)
            m = tuple(s // e for s, e in zip(block.factor, entry.est))
            # Output pixel i is the image's pixel i (its grid's stride S_o: position i covers
            # pixels i*S_o..): centre the (conservative) receptive field there.
            rf_size, _ = self.rf[block.output]
            rf_size = tuple(r + 1 - r % 2 for r in rf_size)
            rf_start = tuple(round((so - 1) / 2 - (r - 1) / 2) for so, r in zip(block.out_stride, rf_size))
            outputs[block.output] = metadata.DenseOutput(
                name=block.output, spatial_axes=tuple(block.out_axes), est=(1,) * len(block.axes),
                stride=tuple(block.out_stride), original_stride=tuple(block.out_stride), rf_size=tuple(rf_size),
                rf_start=tuple(rf_start), inserted=False, input=entry.input, size=tuple(block.out_size),
                dense_size=tuple(block.out_size),
                upsampling={**block.description(entry.est), "information_stride": [
                    os * mm for os, mm in zip(block.out_stride, m)]},
            )
        ordered = {}
        for v in graph.outputs:
            if v.name in outputs:
                ordered[v.name] = outputs[v.name]
            elif v.name in info.outputs:
                ordered[v.name] = info.outputs[v.name]
        info = dataclasses.replace(info, outputs=ordered)
        model.metadata_props[metadata.KEY] = info.to_json()
        return ir.passes.PassResult(model, True)

    def build(self, editor, nodes, block: FinalUpsampling, entry: metadata.DenseOutput, score: ir.Value, opset: int):
        rank = score.shape.rank() if score.shape is not None else 4
        axes = list(block.axes)
        m = [s // e for s, e in zip(block.factor, entry.est)]
        base = f"{block.score}_upsampled"
        fdtype = _ir.numpy_dtype(score)
        if block.kind == "resize" and block.align_corners:
            e = list(entry.est)
            x = score
            if any(v > 1 for v in e):
                starts = editor.const(nodes, np.zeros(len(axes), np.int64), base=f"{base}_starts")
                ends = editor.const(
                    nodes, np.array([-(v - 1) if v > 1 else INT64_MAX for v in e], np.int64), base=f"{base}_ends"
                )
                ax = editor.const(nodes, np.array(axes, np.int64), base=f"{base}_axes")
                x = editor.op(nodes, "Slice", [score, starts, ends, ax], base=f"{base}_span")
            shape = editor.op(nodes, "Shape", [score], base=f"{base}_shape")
            mult = np.ones(rank, np.int64)
            for k, a in enumerate(axes):
                mult[a] = m[k]
            mult_v = editor.const(nodes, mult, base=f"{base}_factor")
            sizes = editor.op(nodes, "Mul", [shape, mult_v], base=f"{base}_sizes")
            roi, scales = self._roi_scales(editor, nodes, base, opset)
            y = editor.op(
                nodes, "Resize", [x, roi, scales, sizes],
                {"mode": block.mode, "coordinate_transformation_mode": "align_corners", "nearest_mode": block.nearest_mode},
                base=f"{base}_resize",
            )
            return self._tail(editor, nodes, block, y, base)
        step, half = 1, False
        if block.kind == "resize" and any(o != int(o) for o in block.offset):
            # linear: half_pixel by m where it fits every axis; else asymmetric by 2m, every other pixel
            half = block.mode == "linear" and all(half_pixel_fits(m[k], block.offset[k]) for k in range(len(axes)))
            step = 1 if half else 2
        plans = [
            axis_plan(block.kind, m[k], block.offset[k], entry.dense_size[k], block.out_size[k], block.odd_kernel[k], step,
                      half_pixel=half)
            for k in range(len(axes))
        ]
        begin, end = [0] * rank, [0] * rank
        for k, a in enumerate(axes):
            begin[a], end[a] = plans[k].pad_begin, plans[k].pad_end
        x = score
        if any(begin) or any(end):
            pads = editor.const(nodes, np.array(begin + end, np.int64), base=f"{base}_pads")
            if block.kind == "resize":
                x = editor.op(nodes, "Pad", [score, pads], {"mode": "edge"}, base=f"{base}_pad")
            else:
                fill = editor.const(nodes, np.array(0, fdtype), base=f"{base}_fill")
                x = editor.op(nodes, "Pad", [score, pads, fill], {"mode": "constant"}, base=f"{base}_pad")
        if block.kind == "resize":
            scale = np.ones(rank, np.float32)
            for k, a in enumerate(axes):
                scale[a] = plans[k].factor
            roi, _ = self._roi_scales(editor, nodes, base, opset)
            scales = editor.const(nodes, scale, base=f"{base}_scales")
            up = editor.op(
                nodes, "Resize", [x, roi, scales],
                {"mode": block.mode, "coordinate_transformation_mode": "half_pixel" if half else "asymmetric",
                 "nearest_mode": block.nearest_mode},
                base=f"{base}_resize",
            )
        else:
            channels = len(block.bias) if block.bias else None
            if channels is None:
                channels = int(score.shape.dims[1]) if score.shape is not None and isinstance(score.shape.dims[1], int) else None
            if channels is None:
                raise ValueError("channels of the score map unknown")
            kernel = np.ones(())
            for k in range(len(axes)):
                kernel = np.multiply.outer(kernel, bilinear_kernel(plans[k].kernel, m[k]))
            weight = np.broadcast_to(kernel, (channels, 1, *kernel.shape)).astype(fdtype)
            w = editor.const(nodes, np.ascontiguousarray(weight), base=f"{base}_weight")
            inputs = [x, w]
            if block.bias:
                inputs.append(editor.const(nodes, np.array(block.bias, fdtype), base=f"{base}_bias"))
            up = editor.op(
                nodes, "ConvTranspose", inputs,
                {"strides": m, "kernel_shape": [p.kernel for p in plans], "group": channels},
                base=f"{base}_transpose",
            )
        starts = editor.const(nodes, np.array([p.start for p in plans], np.int64), base=f"{base}_starts")
        ends = editor.const(
            nodes, np.array([-p.tail if p.tail else INT64_MAX for p in plans], np.int64), base=f"{base}_ends"
        )
        ax = editor.const(nodes, np.array(axes, np.int64), base=f"{base}_axes")
        steps = editor.const(nodes, np.array([p.step for p in plans], np.int64), base=f"{base}_steps")
        y = editor.op(nodes, "Slice", [up, starts, ends, ax, steps], base=f"{base}_crop")
        return self._tail(editor, nodes, block, y, base)

    def _roi_scales(self, editor, nodes, base, opset):
        if opset >= 13:
            return None, None
        empty = editor.const(nodes, np.zeros(0, np.float32), base=f"{base}_empty")
        return empty, empty

    def _tail(self, editor, nodes, block: FinalUpsampling, y: ir.Value, base: str) -> ir.Value:
        for n in block.tail:
            inputs = [y]
            for v in n.inputs[1:]:  # Clip's bounds: constants, copied (the cut removed their producers)
                array = _ir.const_array(v) if v is not None else None
                inputs.append(None if array is None else editor.const(nodes, array, base=f"{base}_{n.op_type.lower()}_arg"))
            attrs = {a.name: a.value for a in n.attributes.values()}
            y = editor.op(nodes, n.op_type, inputs, attrs, base=f"{base}_{n.op_type.lower()}")
        return y
