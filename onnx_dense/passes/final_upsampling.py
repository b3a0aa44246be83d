"""Rebuild the final upsampling of a segmentation head on the dense score map (after finalise).

The pipeline cut the model at the score map T of each output whose final block is fixed
(passes/analysis/final_upsampling.py) and made everything up to T dense at stride R. This pass
appends, per such output, the block rebuilt on the dense T (onnx_dense/interpolation.py):

* Resize (not align_corners): Pad T (edge) -> Resize by m, asymmetric, same mode and
  nearest_mode -> Slice (start, n pixels): output pixel y reads the dense map at
  (y - offset) / m, clamped, as the original read T at (y - offset) / s. A half-pixel offset:
  Resize half_pixel by m where the offset allows it (an even m; nearest rounds the same
  coordinate, never at a tie), else asymmetric by 2m and every other pixel (that map is four
  times the output's: the largest of a run at 4096).
* Resize align_corners: Slice T to the positions the original's first..last span
  (e (L - 1) + 1) -> Resize align_corners to n pixels.
* Bilinear ConvTranspose: Pad T (zeros) -> ConvTranspose of the bilinear kernel for m, one per
  channel, the original's bias -> Slice.
* Then the block's per-position ops (Sigmoid, Softmax over channels, ArgMax, ...), copied.

n, the output's length per axis, is the original's at the input size of the run, computed in
the graph: the input's size where the original's Resize took it there (``sized_by``), else
s L plus what the block adds (crops, a ConvTranspose's kernel), L = ceil(D / e) being the
original's T length (phase 0 of the dense T, of length D, is the original's T). The end pad
leaves room for any input size; what lies past n is cropped. So the model runs at any input
size and its output has the original's size there: an image-sized map stays image-sized at
333x301, not 8 times T's 42x38.

The output keeps its name and its place among the outputs; T stays an output too
(appended), so ``verify`` compares it on the subgrid and the phases, and the output against
the numpy form of the rebuilt block.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnx_dense import metadata
from onnx_dense.interpolation import axis_plan, half_pixel_fits
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.final_upsampling import FinalUpsampling, bilinear_kernel


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
        needs_positions = block.sized_by is None or (block.align_corners and any(v > 1 for v in entry.est))
        positions = self._score_positions(editor, nodes, block, entry, score, base) if needs_positions else None
        lengths = self._lengths(editor, nodes, block, entry, positions, base)
        if block.kind == "resize" and block.align_corners:
            # the span of the original's first..last positions: e (L - 1) + 1, L = ceil(D / e)
            e = list(entry.est)
            x = score
            if any(v > 1 for v in e):
                starts = editor.const(nodes, np.zeros(len(axes), np.int64), base=f"{base}_starts")
                ends = editor.op(nodes, "Add", [
                    editor.op(nodes, "Mul", [positions, editor.const(nodes, np.array(e, np.int64), base=f"{base}_est")],
                              base=f"{base}_span_mul"),
                    editor.const(nodes, np.array([1 - v for v in e], np.int64), base=f"{base}_span_plus"),
                ], base=f"{base}_span_ends")
                ax = editor.const(nodes, np.array(axes, np.int64), base=f"{base}_axes")
                x = editor.op(nodes, "Slice", [score, starts, ends, ax], base=f"{base}_span")
            # sizes: T's dims, the spatial ones replaced by the lengths (Gathers and a Concat, ops
            # the trainer's torch interpreter runs too)
            shape = editor.op(nodes, "Shape", [score], base=f"{base}_shape")
            pieces = []
            for a in range(rank):
                source, index = (lengths, axes.index(a)) if a in axes else (shape, a)
                at = editor.const(nodes, np.array([index], np.int64), base=f"{base}_dim{a}")
                pieces.append(editor.op(nodes, "Gather", [source, at], {"axis": 0}, base=f"{base}_size{a}"))
            sizes = editor.op(nodes, "Concat", pieces, {"axis": 0}, base=f"{base}_sizes")
            roi, scales = self._roi_scales(editor, nodes, base, opset)
            y = editor.op(
                nodes, "Resize", [x, roi, scales, sizes],
                {"mode": block.mode, "coordinate_transformation_mode": "align_corners", "nearest_mode": block.nearest_mode,
                 **self._cubic(block)},
                base=f"{base}_resize",
            )
            return self._tail(editor, nodes, block, y, base)
        step, half = 1, False
        if block.kind == "resize" and any(o != int(o) for o in block.offset):
            # half_pixel by m where it fits every axis; else asymmetric by 2m, every other pixel
            half = all(half_pixel_fits(m[k], block.offset[k]) for k in range(len(axes)))
            step = 1 if half else 2
        plans = [
            axis_plan(block.kind, m[k], block.offset[k], entry.dense_size[k], block.out_size[k], block.odd_kernel[k], step,
                      half_pixel=half)
            for k in range(len(axes))
        ]
        begin, end = [0] * rank, [0] * rank
        for k, a in enumerate(axes):
            # past the static size's need, what another size's may be: e positions (its dense
            # map can end a phase short of e L) and e more for the output's last s = e m pixels
            begin[a], end[a] = plans[k].pad_begin, plans[k].pad_end + 2 * entry.est[k] + 1
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
                 "nearest_mode": block.nearest_mode, **self._cubic(block)},
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
        steps_array = np.array([p.step for p in plans], np.int64)
        ends = editor.op(nodes, "Add", [  # start + step (n - 1) + 1 for an output of n pixels
            editor.op(nodes, "Mul", [lengths, editor.const(nodes, steps_array, base=f"{base}_step")], base=f"{base}_end_mul"),
            editor.const(nodes, np.array([p.start - p.step + 1 for p in plans], np.int64), base=f"{base}_end_plus"),
        ], base=f"{base}_ends")
        ax = editor.const(nodes, np.array(axes, np.int64), base=f"{base}_axes")
        steps = editor.const(nodes, steps_array, base=f"{base}_steps")
        y = editor.op(nodes, "Slice", [up, starts, ends, ax, steps], base=f"{base}_crop")
        return self._tail(editor, nodes, block, y, base)

    def _score_positions(self, editor, nodes, block, entry, score, base) -> ir.Value:
        """L per spatial axis, the original's T length at this input size: ceil(D / e) of the
        dense T's D (its phase 0 is the original's T)."""
        e = np.array(entry.est, np.int64)
        shape = editor.op(nodes, "Shape", [score], base=f"{base}_score_shape")
        dense = editor.op(nodes, "Gather", [shape, editor.const(nodes, np.array(block.axes, np.int64), base=f"{base}_score_axes")],
                          {"axis": 0}, base=f"{base}_score_dims")
        up = editor.op(nodes, "Add", [dense, editor.const(nodes, e - 1, base=f"{base}_est_less")], base=f"{base}_score_ceil")
        return editor.op(nodes, "Div", [up, editor.const(nodes, e, base=f"{base}_est_div")], base=f"{base}_score_positions")

    def _lengths(self, editor, nodes, block, entry, positions, base) -> ir.Value:
        """The output's length per spatial axis at this input size, as the original's: the
        input's (``sized_by``), else s L plus the static size's difference."""
        if block.sized_by is not None:
            source = next(v for v in editor.graph.inputs if v.name == entry.input)
            shape = editor.op(nodes, "Shape", [source], base=f"{base}_input_shape")
            index = editor.const(nodes, np.array(block.sized_by, np.int64), base=f"{base}_input_axes")
            return editor.op(nodes, "Gather", [shape, index], {"axis": 0}, base=f"{base}_lengths")
        scaled = editor.op(nodes, "Mul", [positions, editor.const(nodes, np.array(block.factor, np.int64), base=f"{base}_s")],
                           base=f"{base}_scaled")
        return editor.op(nodes, "Add", [scaled, editor.const(nodes, np.array(block.size_offset, np.int64), base=f"{base}_c")],
                         base=f"{base}_lengths")

    @staticmethod
    def _cubic(block: FinalUpsampling) -> dict:
        return {"cubic_coeff_a": float(block.cubic_a)} if block.mode == "cubic" else {}

    def _roi_scales(self, editor, nodes, base, opset):
        if opset >= 13:
            return None, None
        empty = editor.const(nodes, np.zeros(0, np.float32), base=f"{base}_empty")
        return empty, empty

    def _tail(self, editor, nodes, block: FinalUpsampling, y: ir.Value, base: str) -> ir.Value:
        for n, args in zip(block.tail, block.tail_args):
            inputs = [y]
            for array in args:  # Clip's bounds, Squeeze's axes: constants read before the cut
                inputs.append(None if array is None else editor.const(nodes, array, base=f"{base}_{n.op_type.lower()}_arg"))
            attrs = {a.name: a.value for a in n.attributes.values()}
            y = editor.op(nodes, n.op_type, inputs, attrs, base=f"{base}_{n.op_type.lower()}")
        return y
