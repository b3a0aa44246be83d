"""Serving a dense model: :class:`DenseSession`, one ONNX Runtime session set up for it.

``DenseSession(model, provider="auto"|"cuda"|"cpu", ...)`` loads a model written by
``onnx-dense rewrite``, reads its metadata, and ``session.run(image)`` returns, per output,
a :class:`DenseMap`: the array (or an ``OrtValue`` left on the device) and the
:class:`PixelGrid` that puts every prediction on the input pixel at the centre of its
receptive field.

Choices, and why:

* Provider. ``auto`` takes CUDA when the installed onnxruntime has the CUDA execution provider
  (the ``onnxruntime-gpu`` wheel), else the CPU. ``cuda`` asked for and absent is an error,
  never a quiet CPU run. A CUDA provider that is present but cannot start (no driver, no
  cuDNN) is an error too, and so is onnxruntime's own retry on the CPU: the session is built
  with ``enable_fallback=0`` and its providers are checked after creation.
* No silent CPU nodes. On CUDA the session option ``session.disable_cpu_ep_fallback=1`` makes
  session creation fail when any node would be assigned to the CPU (an op without a CUDA
  kernel at the model's opset, e.g. MaxPool at opset 22 in onnxruntime 1.31, or the shape
  arithmetic onnxruntime prefers to keep on the CPU). ``allow_cpu_nodes=True`` accepts it.
* Convolution settings (CUDA): ``cudnn_conv_algo_search`` is EXHAUSTIVE when every run has
  the same shape (``fixed_shapes=True``: the search is paid once per shape) and HEURISTIC
  otherwise (images of many sizes, tiles whose last row and column are smaller); DEFAULT
  is never used (reported 4x-50x slower for dilated convolutions).
  ``cudnn_conv_use_max_workspace=1`` lets cuDNN pick the faster algorithms that need memory;
  ``nhwc=True`` sets ``prefer_nhwc=1`` (channels-last kernels, worth measuring on tensor cores).
* fp16 (``fp16=True``): the model is converted with ``onnxruntime.transformers.float16``
  (shipped with onnxruntime) keeping float32 inputs and outputs; ops it knows to be unsafe in
  float16 stay in float32. Results then differ from the float32 model by fp16 round-off
  (about 1e-3 relative), so verify and the tiling proof use float32. A hand-written cast of
  Conv inputs was rejected: the converter already handles the blocked ops, the casts around
  them and the constant padding values (-3.4e38 becomes -65504, still below every activation).
* IOBinding. Inputs are copied to the device once per run as ``OrtValue`` and outputs are
  bound to the session's device, so with ``keep_on_device=True`` nothing comes back to the
  host until you call ``DenseMap.numpy()``.
* Tiling (``tile=``) runs crops of the image with the overlap the receptive field needs and
  stitches them; the result equals the untiled run (see :mod:`onnx_dense.runtime.tiling`).
* Memory budget (``max_memory="2GB"``) or ``schedule="phases"``: each run takes the fastest of
  whole, phase by phase (:mod:`onnx_dense.runtime.phases`: the original's strided layers on
  each phase, no repeated work), phases with the trunk on tiles, and phases on tiles whose
  estimated peak fits
  (:mod:`onnx_dense.runtime.schedule`); ``last_schedule`` says which. Such a session makes the
  whole model's onnxruntime session only when a run needs it, so the weights are held once,
  and runs without onnxruntime's memory arena, so that a run's peak is what it needs. Tiles
  chosen for a budget are the smallest that need no more tiles than the largest that fits.
  An image so small that a phase is shorter than a window (onnxruntime refuses the stage)
  runs whole where that fits. An image read by windows (:class:`~onnx_dense.runtime.windowed.WindowedInput`)
  stays unread where the schedule tiles it; the estimate counts its float input only for the
  schedules that make it whole.
* Graph optimisations are on (``ORT_ENABLE_ALL``) for serving; ``optimize=False`` turns them
  off, as verify does.
* ``spinning=False`` stops onnxruntime's worker threads spin-waiting between runs (its default
  keeps them spinning): worth it when other sessions or processes share a few CPU cores.

Why one module of about 1,300 lines: every way of running (whole, tiles, phases, phases on
tiles) goes through the same feeds, providers, metadata and error wording, and the schedule
chooses among them per run; the parts that stand alone live beside it (``tiling``, ``phases``,
``schedule``, ``session``).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.runtime import final_tail, phases, tiling, windowed
from onnx_dense.runtime import schedule as sched
from onnx_dense.runtime.buffers import StageRunner
from onnx_dense.runtime.schedule import KINDS as SCHEDULES, Schedule, parse_memory
from onnx_dense.runtime.session import cuda_options, preload_cuda, set_spinning

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cuda", "cpu")
_UNSET: Any = object()


def resolve_provider(provider: str = "auto") -> str:
    """'auto' -> 'cuda' when this onnxruntime has the CUDA provider, else 'cpu'; checks the others."""
    provider = (provider or "auto").lower()
    if provider not in PROVIDER_CHOICES:
        raise DenseError(f"unknown provider '{provider}'; use one of {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if provider == "auto":
        return "cuda" if CUDA_EP in available else "cpu"
    if provider == "cuda" and CUDA_EP not in available:
        raise DenseError(
            f"provider 'cuda' was asked for, but the installed onnxruntime {ort.__version__} has no CUDA "
            f"execution provider (it has {', '.join(available)}); install onnxruntime-gpu in place of "
            "onnxruntime (pip uninstall -y onnxruntime && pip install onnxruntime-gpu), or use --provider cpu"
        )
    return provider


# --------------------------------------------------------------------------------------------
# what a run returns
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PixelGrid:
    """Where the predictions of one dense output sit on the input image.

    Along spatial axis ``k`` (height first), prediction ``i`` sees input pixels
    ``rf_start[k] + i*stride[k]`` to ``+ rf_size[k] - 1`` and is centred on
    ``origin[k] + i*stride[k]`` with ``origin = rf_start + (rf_size - 1) / 2``, in pixels of
    the array the model was fed (not of the image file before any resize).
    """

    spatial_axes: tuple[int, ...]  # axes of the output array that are spatial
    shape: tuple[int, ...]  # predictions along each spatial axis
    stride: tuple[int, ...]
    rf_start: tuple[int, ...]
    rf_size: tuple[int, ...]

    @classmethod
    def of(cls, out: metadata.DenseOutput, value_shape: Sequence[int]) -> "PixelGrid":
        shape = tuple(int(value_shape[a]) for a in out.spatial_axes)
        return cls(tuple(out.spatial_axes), shape, tuple(out.stride), tuple(out.rf_start), tuple(out.rf_size))

    @property
    def origin(self) -> tuple[float, ...]:
        """Input-pixel centre of prediction 0 along each spatial axis."""
        return tuple(a + (r - 1) / 2 for a, r in zip(self.rf_start, self.rf_size))

    def centres(self, axis: int | None = None):
        """Centres along one spatial axis (1-D array), or a tuple of them for all axes."""
        if axis is None:
            return tuple(self.centres(k) for k in range(len(self.shape)))
        return self.origin[axis] + self.stride[axis] * np.arange(self.shape[axis], dtype=np.float64)

    def mesh(self) -> tuple[np.ndarray, ...]:
        """One array per spatial axis, each of ``shape``: the centre of every prediction."""
        return tuple(np.meshgrid(*self.centres(), indexing="ij"))

    def pixel(self, index: Sequence[int]) -> tuple[float, ...]:
        """Input-pixel centre of the prediction at ``index`` (one index per spatial axis)."""
        return tuple(o + i * s for o, i, s in zip(self.origin, index, self.stride))

    def nearest(self, coords, axis: int) -> np.ndarray:
        """Index of the prediction centred nearest to input-pixel ``coords`` along ``axis``."""
        idx = np.rint((np.asarray(coords, dtype=np.float64) - self.origin[axis]) / self.stride[axis])
        return np.clip(idx, 0, self.shape[axis] - 1).astype(np.int64)

    def to_dict(self) -> dict:
        return {
            "spatial_axes": list(self.spatial_axes), "shape": list(self.shape), "stride": list(self.stride),
            "origin": list(self.origin), "rf_start": list(self.rf_start), "rf_size": list(self.rf_size),
        }


@dataclasses.dataclass
class DenseMap:
    """One output of a run: ``value`` (numpy, or an OrtValue on the device) and its ``grid``."""

    name: str
    value: Any
    grid: PixelGrid | None  # None for an output with no spatial axes
    info: metadata.DenseOutput | None

    def numpy(self) -> np.ndarray:
        return self.value.numpy() if isinstance(self.value, ort.OrtValue) else np.asarray(self.value)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape() if isinstance(self.value, ort.OrtValue) else self.value.shape)

    @property
    def is_classifier(self) -> bool:
        """The original output had no spatial axes: (N, classes) became (N, classes, H', W')."""
        return bool(self.info and self.info.inserted)


# --------------------------------------------------------------------------------------------
# the session
# --------------------------------------------------------------------------------------------


class DenseSession:
    """An onnxruntime session for a dense model, with the settings convolution-heavy graphs need.

    ``model``: a path, an ``onnx.ModelProto`` or an onnx-ir Model written by ``onnx-dense rewrite``.
    ``tile``: default for :meth:`run`: None (whole image), an int or one int per spatial axis
    (input pixels per tile, overlap included). ``max_memory``: a budget for the process (bytes
    or ``'2GB'``); ``schedule``: ``auto`` (whole, or chosen from the budget), ``whole``,
    ``phases``, ``phases+tiles`` or ``tiles``. ``fixed_size`` (an int or one per spatial axis):
    every run is at that size, so ORT sees static shapes and fuses more (see ``_fix_size``).
    """

    def __init__(
        self,
        model,
        *,
        provider: str = "auto",
        fp16: bool = False,
        nhwc: bool = False,
        fixed_shapes: bool = False,
        conv_algo_search: str | None = None,
        max_workspace: bool = True,
        device_id: int = 0,
        allow_cpu_nodes: bool = False,
        optimize: bool = True,
        threads: int | None = None,
        spinning: bool | None = None,
        tile=None,
        max_memory=None,
        schedule: str = "auto",
        fixed_size=None,
    ) -> None:
        self.provider = resolve_provider(provider)
        self.max_memory = parse_memory(max_memory)
        if schedule not in SCHEDULES:
            raise DenseError(f"schedule '{schedule}': use one of {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self.last_schedule: Schedule | None = None
        self._plan = None  # PhasePlan with sessions, for the depth last used
        self._structure_cache: onnx.ModelProto | None = None
        self._profiles: dict = {}
        self.fp16 = fp16
        self.device_id = int(device_id)
        self._path, self._proto, self.info = _load(model)
        self.label = self._path or "model"
        if nhwc and self.provider != "cuda":
            raise DenseError("nhwc (prefer_nhwc) is an option of the CUDA provider; the CPU provider chooses its own layout")
        so = ort.SessionOptions()
        so.log_severity_level = 4  # errors come back as exceptions, turned into one DenseError line
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        if threads:
            so.intra_op_num_threads = int(threads)
        set_spinning(so, spinning)
        self.fixed_size = self._fix_size(so, fixed_size, tile, max_memory, schedule)
        if self.provider == "cuda":
            if not allow_cpu_nodes:
                so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            options = cuda_options(
                device_id=self.device_id, fixed_shapes=fixed_shapes, conv_algo_search=conv_algo_search,
                max_workspace=max_workspace, nhwc=nhwc,
            )
            providers: list = [(CUDA_EP, options)]
            preload_cuda()
        else:
            providers = [CPU_EP]
        self.provider_options = dict(providers[0][1]) if isinstance(providers[0], tuple) else {}
        self._so, self._providers = so, providers
        self.device = "cuda" if self.provider == "cuda" else "cpu"
        self.session = None
        self._closed = False
        self._options = dict(provider=provider, fp16=fp16, nhwc=nhwc, fixed_shapes=fixed_shapes,
                             conv_algo_search=conv_algo_search, max_workspace=max_workspace, device_id=device_id,
                             allow_cpu_nodes=allow_cpu_nodes, optimize=optimize, threads=threads, spinning=spinning)
        self._split = None  # (body DenseSession, tail session, Split): a rebuilt final upsampling, tiled
        self._bands = None  # final_tail.Bands of that tail, or why it runs whole
        self._rebuilt = final_tail.rebuilt_outputs(self.info)
        if self.max_memory is None and schedule in ("auto", "whole", "tiles") and not (self._rebuilt and tile is not None):
            self._open()  # the whole dense model, as before
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
            self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        else:
            # A budget or phases: the dense model's own session is made only if a run needs it, so
            # the stage sessions do not hold a second copy of the weights beside it.
            _return_freed_memory()
            # Whole runs too without the memory arena: it grows by doubling and keeps what it once
            # held (a ResNet's whole run at 4096 peaked at 855 MiB with it, 710 without)
            so.enable_cpu_mem_arena = False
            graph = self._light_structure().graph
            inits = {t.name for t in graph.initializer}
            inputs = [i for i in graph.input if i.name not in inits]
            self.input_names = [i.name for i in inputs]
            self.output_names = [o.name for o in graph.output]
            self._input_types = {
                i.name: f"tensor({onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()})" for i in inputs
            }
            self._input_dims = {
                i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in i.type.tensor_type.shape.dim]
                for i in inputs
            }
        self.image_input = self._image_input()
        self.tile = self.check_tile(tile) if tile is not None else None

    # -- set-up helpers ---------------------------------------------------------------------

    def _fix_size(self, so, fixed_size, tile, max_memory, schedule) -> tuple[int, ...] | None:
        """``fixed_size`` (an int or one per spatial axis of the image input): every run is at
        that size, so the symbolic spatial dims of the dense model's input are fixed for ORT
        (``add_free_dimension_override_by_name``): shapes become static and ORT folds the shape
        arithmetic and fuses what it cannot prove shape-safe otherwise (residual Add + Relu into
        the Conv)."""
        if fixed_size is None:
            return None
        if tile is not None or max_memory is not None or schedule not in ("auto", "whole"):
            raise DenseError("fixed_size fixes the whole model's input size; it cannot be combined with tile, "
                             "max_memory or a phase schedule")
        graph = self._light_structure().graph
        inputs = [i for i in graph.input if i.name in self.info.inputs]
        if len(inputs) != 1:
            raise DenseError(f"{self.label}: fixed_size needs exactly one image input (found {len(inputs)})")
        value = inputs[0]
        axes = self.info.inputs[value.name].spatial_axes
        sizes = (fixed_size,) * len(axes) if isinstance(fixed_size, int) else tuple(int(v) for v in fixed_size)
        if len(sizes) != len(axes) or any(v < 1 for v in sizes):
            raise DenseError(f"fixed_size {fixed_size!r}: give one positive size per spatial axis ({len(axes)})")
        dims = value.type.tensor_type.shape.dim
        for a, v in zip(axes, sizes):
            d = dims[a]
            if d.dim_param:
                so.add_free_dimension_override_by_name(d.dim_param, v)
            elif d.HasField("dim_value") and d.dim_value != v:
                raise DenseError(f"fixed_size {sizes}: input '{value.name}' axis {a} is fixed at {d.dim_value}")
        return sizes

    def _open(self) -> None:
        """The onnxruntime session of the whole dense model."""
        try:
            self.session = ort.InferenceSession(self._model_bytes_or_path(), self._so, providers=self._providers,
                                                enable_fallback=0)
        except Exception as exc:
            raise DenseError(self._creation_error(exc)) from None
        self._check_providers(self.session)

    def _check_providers(self, session) -> None:
        got = session.get_providers()
        if self.provider == "cuda" and (not got or got[0] != CUDA_EP):
            raise DenseError(
                f"{self.label}: onnxruntime did not start the CUDA provider (session providers: {', '.join(got)}); "
                "check the NVIDIA driver, CUDA and cuDNN libraries, or use --provider cpu"
            )

    def _light_structure(self) -> onnx.ModelProto:
        """The graph with the data of large initializers dropped (names, types and dims kept)."""
        if self._structure_cache is None:
            # Built field by field: a CopyFrom of the whole model and clearing the weights after
            # would keep their memory (protobuf frees a message's arena only with the message).
            full = self._structure()
            light = onnx.ModelProto()
            light.ir_version = full.ir_version
            light.opset_import.extend(full.opset_import)
            light.metadata_props.extend(full.metadata_props)
            g = light.graph
            g.name = full.graph.name
            g.node.extend(full.graph.node)
            g.input.extend(full.graph.input)
            g.output.extend(full.graph.output)
            g.value_info.extend(full.graph.value_info)
            for t in full.graph.initializer:
                if tiling._numel(t.dims) > 64 or t.data_location == onnx.TensorProto.EXTERNAL:
                    stub = g.initializer.add()
                    stub.name, stub.data_type = t.name, t.data_type
                    stub.dims.extend(t.dims)
                    stub.data_location = onnx.TensorProto.EXTERNAL  # marks "no data here" for _light_copy
                else:
                    g.initializer.append(t)
            del full
            self._structure_cache = light
        return self._structure_cache

    def _model_bytes_or_path(self):
        if self.fp16:
            proto = self._full_proto()
            try:
                from onnxruntime.transformers.float16 import convert_float_to_float16
            except ImportError as exc:
                raise DenseError(
                    f"fp16 needs onnxruntime.transformers.float16, which this onnxruntime lacks ({exc}); "
                    "run in float32 or install a full onnxruntime wheel"
                ) from None
            try:
                half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
            except Exception as exc:
                raise DenseError(f"{self.label}: converting to float16 failed: {str(exc).splitlines()[0][:200]}") from None
            return half.SerializeToString()
        if self._path is not None:
            return self._path
        return self._proto.SerializeToString()

    def _full_proto(self) -> onnx.ModelProto:
        """A proto the float16 conversion may change in place (never the caller's)."""
        if self._path is None:
            copy = onnx.ModelProto()
            copy.CopyFrom(self._proto)
            return copy
        return onnx.load(self._path)

    def _structure(self) -> onnx.ModelProto:
        """The graph without external weights loaded (for the tiling check)."""
        if self._proto is not None:
            return self._proto
        return onnx.load(self._path, load_external_data=False)

    def _creation_error(self, exc: Exception) -> str:
        text = " ".join(str(exc).split())
        if "fallback to CPU EP has been explicitly disabled" in text or "assigned to the default CPU EP" in text:
            return (
                f"{self.label}: onnxruntime's CUDA provider would leave some nodes to the CPU (shape arithmetic, or "
                "an op with no CUDA kernel at this opset such as MaxPool-22; keep dense models at opset 19-21); "
                "pass --allow-cpu-nodes (allow_cpu_nodes=True) to accept the copies between devices"
            )
        if "prefer_nhwc" in text:
            return f"{self.label}: this onnxruntime's CUDA provider does not accept prefer_nhwc ({text[:200]}); run without --nhwc"
        return f"{self.label}: onnxruntime cannot create a {self.provider} session: {text[:300]}"

    def _image_input(self) -> str | None:
        names = [n for n in self.input_names if n in self.info.inputs]
        return names[0] if len(names) == 1 else None

    @property
    def providers(self) -> list[str]:
        """The execution providers of the onnxruntime session, in priority order."""
        if self.session is not None:
            return self.session.get_providers()
        if self._plan is not None and self._plan.sessions:
            return self._plan.sessions[0].get_providers()
        return [p[0] if isinstance(p, tuple) else p for p in self._providers]

    def input_dtype(self, name: str) -> np.dtype:
        return _ORT_TYPES.get(self._input_types[name], np.dtype(np.float32))

    def input_shape(self, name: str | None = None) -> list:
        name = name or self.image_input or self.input_names[0]
        if self.session is None:
            return list(self._input_dims[name])
        return next(i.shape for i in self.session.get_inputs() if i.name == name)

    # -- running ----------------------------------------------------------------------------

    def __enter__(self) -> "DenseSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session = None
        self._plan = None
        if self._split is not None:
            self._split[0].close()
            self._split = None
        self._closed = True

    def run(
        self,
        inputs,
        *,
        tile=_UNSET,
        keep_on_device: bool = False,
        progress: Callable[[int, int], None] | None = None,
        schedule: str | None = None,
        allocate: Callable | None = None,
    ) -> dict[str, DenseMap]:
        """Run on ``inputs`` (an array for the image input, or a dict by input name).

        The image may be a :class:`~onnx_dense.runtime.windowed.WindowedInput` (``load_image(...,
        windows=True).array``): a schedule that tiles the image then computes each tile's window
        of it and never the whole float input; ``whole`` and ``phases`` make it whole first.

        Returns a DenseMap per output, in the model's output order. ``tile`` overrides the
        session's default; ``keep_on_device`` leaves outputs as OrtValues where the session runs
        (untiled runs only); ``progress(done, total)`` is called after each tile. ``schedule``
        overrides the session's (see :meth:`choose`); what was done is in ``last_schedule``.
        ``allocate(name, shape, dtype)``: where a rebuilt final upsampling run in bands under a
        budget puts its outputs (``windowed.DiskOutputs.allocate``: files, out of the budget).
        """
        feeds = self._feeds(inputs)
        if self.fixed_size is not None and self.image_input in feeds:
            got = self._image_size(feeds)
            if got != self.fixed_size:
                raise DenseError(f"{self.label}: this session is fixed to size {self.fixed_size} (fixed_size); "
                                 f"got {got}. Make a session without fixed_size for images of several sizes")
        tile = self.tile if tile is _UNSET else tile
        kind = schedule or self.schedule
        if self._rebuilt and (tile is not None or kind in ("phases", "tiled-trunk", "phases+tiles", "tiles")
                              or (kind == "auto" and self.max_memory is not None)):
            if keep_on_device:
                raise DenseError("a rebuilt final upsampling run by tiles or phases is put together on the host; "
                                 "keep_on_device needs an untiled run")
            return self._run_body_and_tail(feeds, tile, progress, schedule, allocate)
        chosen = self.choose(feeds, tile=tile, schedule=schedule)
        self.last_schedule = chosen
        self._use_pattern(chosen.pattern)
        if chosen.kind in ("whole", "phases"):  # these read the image whole
            feeds = {k: np.asarray(v) if isinstance(v, windowed.WindowedInput) else v for k, v in feeds.items()}
        if chosen.kind != "whole" and keep_on_device:
            raise DenseError(f"{chosen.kind} outputs are put together on the host; keep_on_device needs an untiled run")
        if chosen.kind == "whole":
            values = self.run_raw(feeds, keep_on_device=keep_on_device)
        elif chosen.kind == "tiles":
            values = self._run_tiled(feeds, chosen.tile, progress)
        else:
            try:
                values = self._run_phases(chosen, feeds, progress)
            except phases.StageRefused as exc:
                values = self._run_whole_instead(chosen, feeds, exc)
        result = {}
        for name in self.output_names:
            value = values[name]
            out = self.info.outputs.get(name)
            shape = value.shape() if isinstance(value, ort.OrtValue) else value.shape
            grid = PixelGrid.of(out, shape) if out is not None else None
            result[name] = DenseMap(name, value, grid, out)
        return result

    __call__ = run

    def _run_phases(self, chosen: Schedule, feeds, progress) -> dict[str, np.ndarray]:
        plan = self._phase_plan(chosen.depth)
        if chosen.kind == "phases":
            return plan.run(feeds)
        if chosen.kind == "phases+tiles":
            return self._run_tiled(feeds, chosen.tile, progress, runner=plan.run)
        trunk_axes = self._trunk_axes(chosen.depth)
        entry = self.info.inputs[self.image_input]
        return plan.run(feeds, trunk=lambda f: tiling.run_tiled(
            plan.stages[0].run, f, self.image_input, entry.spatial_axes, trunk_axes, chosen.tile, progress, reuse=True))

    def _run_whole_instead(self, chosen: Schedule, feeds, exc: phases.StageRefused) -> dict[str, np.ndarray]:
        """A stage refused on a phase or tile (:class:`~onnx_dense.runtime.phases.StageRefused`),
        mostly of an image so small that it runs whole within the budget. Where the whole run
        does not fit, the shallower splits are tried, deepest first (their phases are larger:
        a VGG head's window fits a phase of 1 level where it did not fit one of 2); where none
        runs, the stage's error stands."""
        estimate = self._estimator(self._image_size(feeds), unread=_unread(feeds)) if self.max_memory is not None else None
        need = estimate(0) if estimate is not None else None
        if need is not None and need > self.max_memory:
            tile = max(chosen.tile) if chosen.tile is not None else None
            for depth in range(chosen.depth - 1, 0, -1):
                shallower = dataclasses.replace(
                    chosen, depth=depth, runs=self._layout(depth).splits,
                    estimate=estimate(depth, tile, trunk=chosen.kind == "tiled-trunk"),
                    instead=f"split at {chosen.depth} eST levels, but onnxruntime refused a stage on a phase or tile "
                            "of this image")
                try:
                    values = self._run_phases(shallower, feeds, None)
                except DenseError:  # refused again (or its trunk does not tile at that depth)
                    continue
                self.last_schedule = shallower
                return values
            raise exc
        self.last_schedule = Schedule("whole", estimate=need, budget=self.max_memory,
                                      instead=f"{chosen.kind} asked for, but onnxruntime refused a stage on a phase "
                                              "or tile of this image")
        return self.run_raw(feeds)

    def _image_size(self, feeds) -> tuple[int, ...]:
        """The image input's spatial size in ``feeds``."""
        return tuple(int(_shape(feeds[self.image_input])[a]) for a in self.info.inputs[self.image_input].spatial_axes)

    @property
    def rebuilt_outputs(self) -> list[str]:
        """Outputs whose final upsampling was rebuilt: a tile of them is not a tile of the run."""
        return list(self._rebuilt)

    def _run_body_and_tail(self, feeds, tile, progress, schedule, allocate=None) -> dict[str, DenseMap]:
        """Tiles or phases of the body up to the score maps, then the rebuilt upsampling on them
        (:mod:`onnx_dense.runtime.final_tail`): whole, or under a budget it does not fit, in
        bands of the score map's rows where that is exact."""
        body, tail, parts = self._body_and_tail()
        plan = self._tail_plan(feeds, body, parts, on_disk=allocate is not None) if self.max_memory is not None else None
        tail_peak = plan.estimate if plan is not None else None
        # Where the final upsampling needs more than the budget, the rest need not be leaner
        # than it: the fastest schedule within its peak.
        body.max_memory = max(self.max_memory, tail_peak) if tail_peak is not None else self.max_memory
        try:
            maps = body.run({k: v for k, v in feeds.items() if k in body.input_names}, tile=tile, progress=progress,
                            schedule=schedule)
        finally:
            body.max_memory = self.max_memory
        chosen = body.last_schedule
        if chosen is not None and chosen.budget is not None:  # the budget given, not the one the body ran under
            chosen = dataclasses.replace(chosen, budget=self.max_memory)
        tail_feeds = {name: (maps[name].numpy() if name in maps else
                             np.array(_shape(feeds[parts.shapes[name]]), np.int64) if name in parts.shapes else
                             np.asarray(feeds[name]))
                      for name in parts.tail_inputs}
        values, bands = None, 0
        try:
            if plan is not None and plan.rows is not None:
                run_bands = final_tail.run_in_channel_groups if plan.bands.by == "channels" else final_tail.run_in_bands
                values = run_bands(tail.run, parts, tail_feeds, plan.bands, plan.rows, allocate)
                length = tail_feeds[plan.bands.score].shape[plan.bands.axis]
                bands = -(-length // plan.rows) if values is not None else 0
            if values is None:
                values = dict(zip(parts.rebuilt, tail.run(parts.rebuilt, tail_feeds)))
        except Exception as exc:
            raise DenseError(f"onnxruntime failed to run the final upsampling of {self.label}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        if chosen is not None:
            chosen = dataclasses.replace(chosen, tail_bands=bands, tail_by=plan.bands.by if bands else "rows")
            if tail_peak is not None and chosen.estimate is not None and tail_peak > chosen.estimate:
                split = (f"in {chosen.tail_split}" if bands else f"whole: {plan.why}" if plan.why else "whole")
                if chosen.estimate > self.max_memory:
                    over = f"the fastest for the rest within the final upsampling's peak (it runs {split})"
                else:
                    over = f"the fastest for the rest, within the budget (the final upsampling runs {split})"
                chosen = dataclasses.replace(chosen, estimate=tail_peak, budget=self.max_memory, tail=True, over=over)
        self.last_schedule = chosen
        result = {}
        for name in self.output_names:
            if name in values:
                out = self.info.outputs[name]
                result[name] = DenseMap(name, values[name], PixelGrid.of(out, values[name].shape), out)
            else:
                result[name] = maps[name]
        return result

    def _tail_plan(self, feeds, body, parts, on_disk: bool = False) -> "_TailPlan | None":
        """The process's peak while the rebuilt final upsampling runs: whole, or where that
        exceeds the budget, in the largest bands that fit (None: no estimate). ``on_disk``:
        bands write the outputs to files (``allocate``), so they do not count."""
        if self.image_input is None:
            return None
        try:
            prof = self._profile(self._image_size(feeds))
        except DenseError:
            return None
        nodes = [([i for i in n.input if i], [o for o in n.output if o], n.op_type) for n in parts.tail.graph.node]
        # the body's sessions, where its run is yet to make them, stay while the tail runs
        made = body.session is not None or body._plan is not None
        base = _rss() + (0 if made else sched.session_bytes(body._weight_bytes(), stages=True))
        fixed, ort_bytes = sched.tail_parts(prof, nodes, body.output_names, parts.rebuilt)
        # run whole, onnxruntime's outputs are the arrays it returns: counted once, in ``fixed``
        # (the FPN sample at 4096, 21 classes: estimated 4.46 GB with them counted 2.5 times,
        # measured 2.35)
        ort_whole = min(ort_bytes, sched.live_peak(prof, nodes, skip=set(body.output_names) | set(parts.rebuilt)))
        whole = base + fixed + int(ort_whole * sched.MARGIN)
        if whole <= self.max_memory:
            return _TailPlan(whole)
        if self._bands is None:
            self._bands = final_tail.bands_of(self.info, parts)
        bands = self._bands
        if isinstance(bands, str):
            return _TailPlan(whole, why=bands)
        length = prof.shapes.get(bands.score, ())[bands.axis:bands.axis + 1]
        if not length:
            return _TailPlan(whole)
        # per row (or channel) of the score map: the tail's values, the band's copy of its
        # score rows and, where the outputs are files, the band's pages of them until they are
        # given back
        banded = ort_bytes * sched.MARGIN + prof.nbytes.get(bands.score, 0)
        if on_disk:
            written = sum(prof.nbytes.get(n, 0) for n in parts.rebuilt)
            fixed -= written
            banded += written
        per_row = banded / max(1, length[0])
        if bands.by == "channels":  # each channel alone: no halo, no pads
            group = max(1, int((self.max_memory - base - fixed) / max(per_row, 1e-9)))
            if group >= length[0]:
                return _TailPlan(whole)
            return _TailPlan(int(base + fixed + per_row * group), bands, group)
        # a band's run holds its own rows, the halo each side, its start rounded down to a
        # multiple of eST and the pads the tail adds at both ends (about 2 eST + 3 rows)
        extra = 2 * final_tail.HALO + 3 * bands.est + 5
        rows = final_tail.band_rows(int((self.max_memory - base - fixed) / max(per_row, 1e-9)) - extra, bands.est)
        rows = max(rows, final_tail.band_rows(MIN_BAND_ROWS, bands.est))
        if rows >= length[0]:
            return _TailPlan(whole)
        return _TailPlan(int(base + fixed + per_row * min(length[0], rows + extra)), bands, rows)

    def _body_and_tail(self):
        if self._split is None:
            parts = final_tail.split(self._full_proto(), self.info)
            self.session = None  # never two copies of the weights in sessions
            body = DenseSession(parts.body, **self._options, max_memory=self.max_memory, schedule=self.schedule)
            body.label = self.label
            try:
                tail = ort.InferenceSession(parts.tail.SerializeToString(), self._so, providers=self._providers)
            except Exception as exc:
                raise DenseError(self._creation_error(exc)) from None
            self._split = (body, tail, parts)
        return self._split

    def run_raw(self, feeds: Mapping[str, Any], *, keep_on_device: bool = False) -> dict[str, Any]:
        """One run through IOBinding: numpy (or OrtValue) feeds in, outputs by name out."""
        if self._closed:
            raise DenseError("the session is closed")
        if self.session is None:
            self._drop_plan()  # never two copies of the weights in sessions
            self._open()
        binding = self.session.io_binding()
        for name in self.input_names:
            value = feeds[name]
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        run_options = ort.RunOptions()
        run_options.log_severity_level = 4
        try:
            self.session.run_with_iobinding(binding, run_options)
        except Exception as exc:
            shapes = ", ".join(f"{k} {list(_shape(v))}" for k, v in feeds.items())
            raise DenseError(
                f"onnxruntime failed to run {self.label} on {shapes}: {' '.join(str(exc).split())[:300]}"
                f"{self._fixed_size_hint(feeds)}"
            ) from None
        values = binding.get_outputs()
        if keep_on_device:
            return dict(zip(self.output_names, values))
        return {name: v.numpy() for name, v in zip(self.output_names, values)}

    def _fixed_size_hint(self, feeds) -> str:
        """Why a run at a size other than the rewrite's may fail: a Resize size baked in at
        export, or a 'fragments' model's classifier head, which reads one phase's final map at
        the export size."""
        heads = self.info.strategy == "fragments" and any(o.inserted for o in self.info.outputs.values())
        if not self.info.fixed_sizes and not heads:
            return ""
        for name, entry in self.info.inputs.items():
            if name in feeds and tuple(int(_shape(feeds[name])[a]) for a in entry.spatial_axes) != tuple(entry.size):
                size = "x".join(map(str, entry.size))
                if self.info.fixed_sizes:
                    return f" (this model runs only at {size}: {'; '.join(self.info.fixed_sizes)})"
                return (f" (a 'fragments' model keeps the original's classifier head, which reads the final map of one "
                        f"phase as at the export size {size}: one prediction per phase, and inputs larger than that "
                        "map allows fail in it; rewrite with --strategy dilate for a head that slides over them)")
        return ""

    def _feeds(self, inputs) -> dict[str, Any]:
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            if len(self.input_names) != 1:
                raise DenseError(
                    f"{self.label} has inputs {', '.join(self.input_names)}; pass a dict of arrays by input name"
                )
            feeds = {self.input_names[0]: inputs}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DenseError(f"no value for model input(s) {', '.join(missing)}")
        unknown = [n for n in feeds if n not in self.input_names]
        if unknown:
            raise DenseError(f"{self.label} has no input(s) named {', '.join(unknown)} (it has {', '.join(self.input_names)})")
        for name, value in list(feeds.items()):
            shape = _shape(value)
            entry = self.info.inputs.get(name)
            if entry is not None and len(shape) > max(entry.spatial_axes):
                size = tuple(shape[a] for a in entry.spatial_axes)
                need = self.minimum_input(name)
                if any(n < m for n, m in zip(size, need)):
                    # below this some kernels divide by a zero size and kill the process (SIGFPE)
                    raise DenseError(
                        f"input '{name}' is {'x'.join(map(str, size))} pixels; {self.label} needs at least "
                        f"{'x'.join(map(str, need))} (below that an output has no prediction left)"
                    )
            if isinstance(value, ort.OrtValue):
                continue
            dtype = self.input_dtype(name)
            if isinstance(value, windowed.WindowedInput) and name == self.image_input and value.dtype == dtype:
                continue  # read by windows where the schedule tiles the image, whole otherwise (run)
            array = np.asarray(value)
            if array.dtype != dtype:
                array = array.astype(dtype)
            feeds[name] = array
        return feeds

    def minimum_input(self, name: str | None = None) -> tuple[int, ...]:
        """Smallest spatial size known to give every output one prediction, per spatial axis.

        At the rewrite's static size ``H0`` an output has ``n0`` dense predictions ``s`` pixels
        apart; ``H0 - (n0 - 1) * s`` leaves one. Conservative: some models run a little below.
        """
        name = name or self.image_input
        entry = self.info.inputs[name]
        need = [1] * len(entry.spatial_axes)
        for out in self.info.outputs.values():
            if out.input != name:
                continue
            for k, (h0, n0, s) in enumerate(zip(entry.size, out.dense_size, out.stride)):
                need[k] = max(need[k], h0 - (n0 - 1) * s)
        return tuple(need)

    # -- schedules ----------------------------------------------------------------------------

    def choose(self, feeds, *, tile=_UNSET, schedule: str | None = None) -> Schedule:
        """The schedule a run of ``feeds`` takes (see :mod:`onnx_dense.runtime.schedule`).

        A tile given (here or to the session) is obeyed as before. Otherwise ``whole`` unless a
        memory budget (``max_memory``) or the ``schedule`` asks for phases: then the schedule
        expected fastest (``cost``: :func:`~onnx_dense.runtime.schedule.relative_time`) whose
        estimated peak fits the budget. When none does, the fastest whose peak,
        above what the process holds before the run, is within :data:`NEAR_LEANEST` of the
        leanest's: tiles far smaller than that save little memory (the outputs stay) for many
        more runs and overlaps. Under a budget, onnxruntime's memory pattern stays on only if the
        schedule also fits with its values counted :data:`~onnx_dense.runtime.schedule.PATTERN_MARGIN` times.
        """
        chosen = self._choose(feeds, tile=tile, schedule=schedule)
        budget = self.max_memory
        if budget is None or chosen.estimate is None:
            return chosen
        if chosen.estimate > budget:  # nothing fits: the least memory
            return dataclasses.replace(chosen, pattern=False)
        with_pattern = self._estimator(self._image_size(feeds), margin=sched.PATTERN_MARGIN, unread=_unread(feeds))(
            chosen.depth, max(chosen.tile) if chosen.tile is not None else None, trunk=chosen.kind == "tiled-trunk")
        return dataclasses.replace(chosen, pattern=with_pattern <= budget)

    def _choose(self, feeds, *, tile=_UNSET, schedule: str | None = None, _budget: int | None = None,
                _trunk_only: bool = False, _base: int | None = None) -> Schedule:
        kind = schedule or self.schedule
        if kind not in SCHEDULES:
            raise DenseError(f"schedule '{kind}': use one of {', '.join(SCHEDULES)}")
        tile = self.tile if tile is _UNSET else tile
        if kind == "tiles" and tile is None:
            raise DenseError("schedule 'tiles' needs a tile size (--tile N)")
        if tile is not None and kind in ("auto", "tiles"):
            return Schedule("tiles", tile=self.check_tile(tile), tiles=self._count_tiles(feeds, self.check_tile(tile)))
        if kind == "whole" or (kind == "auto" and self.max_memory is None):
            return Schedule("whole")
        name = self.image_input
        if name is None:
            raise DenseError(f"{self.label}: phases and budgets need exactly one image input with spatial axes in the metadata")
        size = self._image_size(feeds)
        budget = self.max_memory if _budget is None else _budget
        try:
            depths = range(1, self._max_depth() + 1)
        except DenseError as exc:
            whole_only = self._whole_only()
            if kind in ("phases", "tiled-trunk", "phases+tiles") and whole_only:  # its phases are the whole run
                chosen = self._choose(feeds, tile=None, schedule="whole")
                estimate = self._estimator(size, base=_base, unread=_unread(feeds))(0) if budget is not None else None
                return dataclasses.replace(chosen, estimate=estimate, budget=budget,
                                           instead=f"{kind} asked for, but {whole_only}")
            if kind in ("phases", "tiled-trunk", "phases+tiles"):
                raise
            depths, why = range(0), str(exc)
        else:
            why = ""
        if kind in ("tiled-trunk", "phases+tiles") and self.info.strategy == "fragments" and not _trunk_only:
            try:
                chosen = self._choose(feeds, tile=None, schedule="tiled-trunk", _budget=_budget, _trunk_only=True,
                                      _base=_base)
            except DenseError as exc:  # its trunk does not tile: by phases, and why
                chosen = self._choose(feeds, tile=None, schedule="phases", _budget=_budget, _base=_base)
                why = str(exc).removeprefix(f"{self.label}: ")  # the line names the model already
                return dataclasses.replace(chosen, instead=f"{kind} asked for, but {why}: by phases of its batch "
                                                           "instead")
            if kind == "tiled-trunk":
                return chosen
            return dataclasses.replace(chosen, instead=f"{kind} asked for, but a 'fragments' model is tiled only "
                                                       "before its first moves to the batch (its phases read a zero "
                                                       "extension that depends on the map's size): with its trunk "
                                                       "tiled instead")
        if kind in ("phases", "tiled-trunk", "phases+tiles") and not depths:  # one phase: the whole model
            chosen = self._choose(feeds, tile=None, schedule="auto", _budget=_budget, _base=_base)
            return dataclasses.replace(chosen, instead=f"{kind} asked for, but the rewrite removed no stride: "
                                                       "the one phase is the whole model")
        estimate = self._estimator(size, base=_base, unread=_unread(feeds))
        cost = self._coster(size)
        candidates: list[Schedule] = []
        if kind == "auto":
            candidates.append(Schedule("whole", estimate=estimate(0)))
        if kind in ("auto", "phases"):
            for d in depths:
                candidates.append(Schedule("phases", depth=d, estimate=estimate(d), runs=self._layout(d).splits))
        fitting = [c for c in candidates if budget is None or c.estimate <= budget]
        # whole, or phases with nothing else asked for: no faster schedule (a deeper split moves more)
        if fitting and (budget is None or fitting[0].kind == "whole" or kind == "phases"):
            return dataclasses.replace(fitting[0], budget=budget)
        if kind == "phases":  # asked for phases and nothing fits: the deepest split
            return dataclasses.replace(candidates[-1], budget=budget, over="the deepest split")
        # Under a budget the whole run does not fit: of the phases, the tiled trunk and phases on
        # tiles that fit, the one expected fastest (schedule.relative_time).
        options = [dataclasses.replace(c, cost=cost(c.depth)) for c in fitting]
        trunk = None
        if kind in ("auto", "tiled-trunk"):
            trunk = self._choose_trunk(feeds, size, depths, estimate, budget, cost)
            if trunk is not None:
                trunk = dataclasses.replace(trunk, over="the leanest tiled trunk")
                if kind == "tiled-trunk":
                    return trunk
                if trunk.estimate <= budget:
                    options.append(trunk)
            elif kind == "tiled-trunk":
                raise DenseError(f"{self.label}: cannot tile the trunk ({self._trunk_refusal(depths)})")
        untileable = self._tile_refusal()
        if untileable:
            if kind == "phases+tiles":
                raise DenseError(f"{self.label}: cannot run by phases on tiles ({untileable})")
            if options:
                return dataclasses.replace(min(options, key=lambda o: (o.cost, o.estimate)), budget=budget)
            leanest = min([c for c in [*candidates, trunk] if c is not None], key=lambda c: c.estimate)
            which = "no tiles beyond the trunk" if leanest.kind == "tiled-trunk" else "no tiles"
            if _budget is None and kind == "auto":  # the fastest near the leanest's peak
                near = self._choose(feeds, tile=None, schedule=schedule, _base=estimate.base, _budget=int(
                    estimate.base + (leanest.estimate - estimate.base) * NEAR_LEANEST))
                return dataclasses.replace(near, budget=budget, over=f"the fastest within 5% of the leanest's peak "
                                                                     f"({which}: {untileable})")
            return dataclasses.replace(leanest, budget=budget, over=f"the leanest ({which}: {untileable})")
        # Tiles: per split depth, the largest tile whose estimate fits (then the smallest tile
        # needing as many), costed with the overlap it recomputes.
        rf = max(max(o.rf_size) for o in self.info.outputs.values())
        # tiles under twice the receptive field would mostly recompute their overlap
        lo0 = max(max(self.minimum_tile()), max(self.minimum_input(name)), 2 * rf)
        hi0 = max(size)
        leanest_tiles = None
        for depth in (list(depths) or [0]):
            lo, hi = lo0, hi0
            smallest = estimate(depth, lo)
            if lo >= hi or smallest > (budget or 0):
                if leanest_tiles is None or smallest < leanest_tiles[0]:
                    leanest_tiles = (smallest, depth, lo)
                continue
            while hi - lo > 8:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if estimate(depth, mid) <= budget else (lo, mid)
            lo = self._balanced_tile(feeds, lo0, lo)
            tile = self.check_tile(lo)
            count = self._count_tiles(feeds, tile)
            pixels = count * math.prod(min(t, x) for t, x in zip(tile, size)) / math.prod(size)
            options.append(Schedule("phases+tiles" if depth else "tiles", depth=depth, tile=tile,
                                    estimate=estimate(depth, lo), budget=budget, tiles=count,
                                    runs=self._layout(depth).splits if depth else 1,
                                    cost=cost(depth, pixels=pixels, tile=lo)))
        if options:
            best = min(options, key=lambda o: (o.cost, o.estimate))
            if best.kind == "tiles" and kind != "auto":
                raise DenseError(f"{self.label}: cannot run by phases ({why})")
            return dataclasses.replace(best, budget=budget)
        # nothing fits: the leanest of all, or the fastest near its peak
        lean_est, lean_depth, lean_tile = leanest_tiles
        leanest = min([*candidates, trunk, None], key=lambda c: c.estimate if c else lean_est)
        if _budget is None and budget is not None:  # within 5% above what the process holds already
            floor = leanest.estimate if leanest is not None else lean_est
            near = self._choose(feeds, tile=None, schedule=schedule, _base=estimate.base,
                               _budget=int(estimate.base + (floor - estimate.base) * NEAR_LEANEST))
            return dataclasses.replace(near, budget=budget, over="the fastest within 5% of the leanest's peak")
        if leanest is not None:
            return dataclasses.replace(leanest, budget=budget)
        if lean_depth == 0 and kind != "auto":
            raise DenseError(f"{self.label}: cannot run by phases ({why})")
        tile = self.check_tile(lean_tile)
        return Schedule("phases+tiles" if lean_depth else "tiles", depth=lean_depth, tile=tile, estimate=lean_est,
                        budget=budget, runs=self._layout(lean_depth).splits if lean_depth else 1,
                        tiles=self._count_tiles(feeds, tile))

    def _coster(self, size):
        """``cost(depth, pixels=1, trunk_pixels=1, tile=None)``: a schedule's expected time
        against the whole run's (:func:`~onnx_dense.runtime.schedule.relative_time`)."""
        prof = self._profile(size)

        def cost(depth: int, pixels: float = 1.0, trunk_pixels: float = 1.0, tile: int | None = None) -> float:
            layout = self._layout(depth) if depth else None
            level = max(layout.stages[-1].level) if layout else 1
            side = min(min(size), tile or min(size)) / level
            return sched.relative_time(prof, layout.estimate_stages() if layout else None, side=side, pixels=pixels,
                                       trunk_pixels=trunk_pixels)

        return cost

    def _choose_trunk(self, feeds, size, depths, estimate, budget, cost=None) -> Schedule | None:
        """The tiled trunk that fits ``budget`` and is expected fastest (``cost``, default
        :meth:`_coster`'s): per split depth, the largest trunk tile that fits (then the fewest
        tiles of that count); None if no depth's trunk can be tiled. With nothing fitting, the
        leanest (the deepest split on the smallest tiles)."""
        cost = cost or self._coster(size)
        options = []
        for depth in depths:
            try:
                outputs = self._trunk_axes(depth)
            except DenseError:
                continue
            rank = len(size)
            need = [tiling.minimum_tile_anywhere([o.geometry[k] for o in outputs]) for k in range(rank)]
            rf = max(g.rf_size for o in outputs for g in o.geometry)
            lo0, hi0 = max(*need, 2 * rf), max(size)
            layout = self._layout(depth)

            def fits(t):
                return estimate(depth, t, trunk=True) <= (budget or 0)

            lo, hi = lo0, hi0
            if lo >= hi or not fits(lo):
                options.append((float("inf"), estimate(depth, min(lo, hi), trunk=True), depth, min(lo, hi), layout, outputs))
                continue
            while hi - lo > 8:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            lo = self._balanced_tile(feeds, lo0, lo, outputs)
            count = self._count_tiles(feeds, (lo,) * rank, outputs)
            pixels = count * math.prod(min(lo, x) for x in size) / math.prod(size)
            options.append((cost(depth, trunk_pixels=pixels), estimate(depth, lo, trunk=True), depth, lo, layout,
                            outputs))
        if not options:
            return None
        expected, est, depth, tile, layout, outputs = min(options, key=lambda o: (o[0], o[1]))
        if expected == float("inf"):
            expected, est, depth, tile, layout, outputs = min(options, key=lambda o: o[1])
        tile = (tile,) * len(size)
        return Schedule("tiled-trunk", depth=depth, tile=tile, estimate=est, budget=budget, runs=layout.splits,
                        tiles=self._count_tiles(feeds, tile, outputs), cost=expected)

    def _whole_only(self) -> str:
        """Why this model's phases run in its own graph, so that no schedule but ``whole`` can
        split or tile it ('' where one can)."""
        if self.info.strategy == "fragments":
            batches = self.info.batches
            if batches is None:
                return ("this 'fragments' model was written before onnx-dense recorded how its batch of phases "
                        "splits (rewrite it again to split it)")
            if "refused" in batches:
                return f"this 'fragments' model cannot split its batch of phases: {batches['refused']}"
            return ""
        if self.info.strategy != "dilate":
            return f"a '{self.info.strategy}' model runs its phases in one graph already"
        if self.info.per_phase_global:
            return "this model computes global context per phase, over the whole map"
        return ""

    def _trunk_axes(self, depth: int) -> list:
        """Stage 0's outputs as tiles stitch them; DenseError if the trunk cannot be tiled exactly."""
        def compute():
            layout = self._layout(depth)
            axes = layout.trunk_axes(self.info)  # first: a fragments model's trunk may end in moves
            tiling.check_tileable(self._structure(), self.info, self.image_input, layout.stages[0].nodes)
            return axes

        return self._memo(("trunk", depth), compute)

    def _trunk_refusal(self, depths) -> str:
        for depth in depths:
            try:
                self._trunk_axes(depth)
            except DenseError as exc:
                return str(exc)
        return "no eST level to split at"

    def _estimator(self, size, margin: float = sched.MARGIN, base: int | None = None, unread: int = 0):
        """``estimate(depth, tile=None)``: the process's peak RSS (bytes) expected for a run on an
        image of ``size`` (already in memory, as the feeds are when :meth:`choose` is called)
        split at ``depth`` eST levels (0: the whole dense model), on the whole image or on tiles
        of ``tile`` pixels (see :mod:`~onnx_dense.runtime.schedule`). ``base``: the RSS to start
        from (default: now); a choice made in two steps passes the first step's, so that the
        process's memory moving between them cannot change what the second step picks. ``unread``:
        bytes of an image input read by windows (:class:`~onnx_dense.runtime.windowed.WindowedInput`),
        which a run on the whole image makes whole first."""
        base = _rss() if base is None else base
        prof = self._profile(size)
        weights = self._weight_bytes()

        def estimate(depth: int, tile: int | None = None, trunk: bool = False) -> int:
            if depth:  # sessions of another depth are dropped before the new ones are made
                extra = 0 if self._plan is not None else sched.session_bytes(weights, stages=True)
                stages = self._layout(depth).estimate_stages()
            else:
                extra = 0 if self.session is not None else sched.session_bytes(weights)
                stages = None
            if tile is None:
                if stages is None:
                    return base + unread + extra + sched.whole_peak(prof, margin=margin)
                return base + unread + extra + sched.phases_peak(prof, stages, self.output_names, margin=margin)
            small = prof.scaled(tuple(min(tile, x) for x in size))
            if trunk:
                return base + extra + sched.phases_peak(prof, stages, self.output_names, margin=margin, trunk=small)
            return base + extra + sched.tiles_peak(small, prof, stages, self.output_names, margin=margin)

        estimate.base = base
        return estimate

    def _balanced_tile(self, feeds, smallest: int, largest: int, outputs=None) -> int:
        """The smallest tile side from ``smallest`` to ``largest`` that needs no more tiles than
        ``largest`` does. Tiles are laid from both ends of the image at their full size, so a
        tile larger than its count needs only recomputes more overlap: at 4096 pixels and a
        receptive field of 627, 2 tiles of 2468 per axis compute 1.45x the image's pixels, 2 of
        2362 1.33x. ``outputs``: the maps stitched (default: the model's outputs; the trunk's
        for a tiled trunk)."""
        rank = len(self.info.inputs[self.image_input].spatial_axes)

        def tiles(t: int) -> int:
            if outputs is None:
                return self._count_tiles(feeds, self.check_tile(t))
            return self._count_tiles(feeds, (t,) * rank, outputs)

        count = tiles(largest)
        if tiles(smallest) <= count:
            return smallest
        lo, hi = smallest, largest  # count(lo) > count >= count(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if tiles(mid) <= count else (mid, hi)
        return hi

    def _count_tiles(self, feeds, tile, outputs=None) -> int:
        name = self.image_input
        entry = self.info.inputs[name]
        outputs = outputs or tiling.output_axes(self.info, name, self.output_names)
        count = 1
        for k, axis in enumerate(entry.spatial_axes):
            extent = int(_shape(feeds[name])[axis])
            count *= len(tiling.plan_axis(extent, tile[k], [o.geometry[k] for o in outputs]))
        return count

    def _max_depth(self) -> int:
        if self.fp16:
            raise DenseError("phases run in float32; run fp16 whole or tiled")
        return self._layout(None).depth

    def _layout(self, depth):
        def compute():
            light = self._light_structure()
            layout = phases.layout(light, self.info, self.image_input, depth)
            phases.check_stages(layout, light)  # what building the stages would refuse, refused now
            return layout

        return self._memo(("layout", depth), compute)

    def _memo(self, key, compute):
        """``compute()`` once per ``key``; a DenseError it raised is kept and raised again.

        Kept without its traceback and raised as a fresh copy each time: a traceback holds its
        frames, and through them the caller's, whose locals (a run's feeds and outputs) would
        then live as long as the session (measured: 400 MB kept after a run at 4096 pixels)."""
        if key not in self._profiles:
            try:
                self._profiles[key] = compute()
            except DenseError as exc:
                exc.__traceback__ = exc.__context__ = exc.__cause__ = None
                self._profiles[key] = exc
        value = self._profiles[key]
        if isinstance(value, DenseError):
            fresh = type(value).__new__(type(value))
            fresh.args = value.args
            fresh.__dict__.update(value.__dict__)
            try:
                raise fresh
            finally:  # else this frame, in the traceback, would hold the exception: a cycle
                del fresh
        return value

    def _profile(self, size):
        key = ("profile", tuple(size))
        if key not in self._profiles:
            self._profiles[key] = sched.profile(self._light_structure(), self.info, self.image_input, size)
        return self._profiles[key]

    def _weight_bytes(self) -> int:
        total = 0
        for t in self._light_structure().graph.initializer:
            total += tiling._numel(t.dims) * sched._ITEMSIZE.get(t.data_type, 4)
        return total

    def _phase_plan(self, depth: int):
        """The stage sessions for ``depth`` (made on first use; the whole model's session is dropped)."""
        if self._plan is not None and self._plan.depth == depth:
            return self._plan
        self._plan = None
        self.session = None  # never two copies of the weights in sessions
        layout = phases.layout(self._light_structure(), self.info, self.image_input, depth)
        full = self._full_proto() if self._proto is None else self._proto
        phases.build(layout, full)
        del full
        so = _stage_options(self._so)
        layout.sessions = []
        for stage in layout.stages:
            try:
                session = ort.InferenceSession(stage.model, so, providers=self._providers, enable_fallback=0)
            except Exception as exc:
                raise DenseError(self._creation_error(exc)) from None
            self._check_providers(session)
            stage.model = None
            layout.sessions.append(session)
            stage.run = StageRunner(session, on_error=_stage_refused)
        self._plan = layout
        return layout

    def _drop_plan(self) -> None:
        self._plan = None

    def _use_pattern(self, on: bool) -> None:
        """Sessions with onnxruntime's memory pattern on or off (made again if they differ)."""
        if self._so.enable_mem_pattern == on:
            return
        self._so.enable_mem_pattern = on
        self.session = None
        self._drop_plan()

    def _run_tiled(self, feeds, tile, progress, runner=None) -> dict[str, np.ndarray]:
        name = self.image_input
        if name is None:
            raise DenseError(f"{self.label}: tiling needs exactly one image input with spatial axes in the metadata")
        if any(isinstance(v, ort.OrtValue) for v in feeds.values()):
            raise DenseError("tiling crops numpy inputs; pass arrays, not OrtValues")
        entry = self.info.inputs[name]
        tile = self.check_tile(tile)
        outputs = tiling.output_axes(self.info, name, self.output_names)
        return tiling.run_tiled(
            runner or (lambda f: self.run_raw(f)), feeds, name, entry.spatial_axes, outputs, tile, progress=progress
        )

    def check_tile(self, tile) -> tuple[int, ...]:
        """``tile`` per spatial axis, after checking that this model tiles exactly at that size."""
        name = self.image_input
        if name is None:
            raise DenseError(f"{self.label}: tiling needs exactly one image input with spatial axes in the metadata")
        tile = tiling.parse_tile(tile, len(self.info.inputs[name].spatial_axes))
        if self._rebuilt:  # the body is what is tiled (run_body_and_tail)
            return self._body_and_tail()[0].check_tile(tile)
        self._check_tileable()
        need = self.minimum_tile()
        if any(t < m for t, m in zip(tile, need)):
            raise DenseError(
                f"tile {'x'.join(map(str, tile))} is smaller than this model needs for one exact prediction per tile "
                f"(receptive field and stride); use at least {'x'.join(map(str, need))}"
            )
        return tile

    def _check_tileable(self) -> None:
        """:func:`tiling.check_tileable` on the whole graph (the body's, where the final
        upsampling was rebuilt), once (its DenseError kept)."""
        if self._rebuilt:
            return self._body_and_tail()[0]._check_tileable()
        self._memo(("tileable",), lambda: tiling.check_tileable(self._structure(), self.info, self.image_input))

    def _tile_refusal(self) -> str:
        """Why this model cannot be tiled ('' if it can), as :meth:`check_tile` would say."""
        try:
            self._check_tileable()
            self.minimum_tile()  # outputs without a grid to stitch
        except DenseError as exc:
            return str(exc).replace("; run without --tile", "").replace("; run without tiling", "")
        return ""

    def minimum_tile(self) -> tuple[int, ...]:
        """The smallest tile (per spatial axis) that leaves every output an exact prediction, and
        is no smaller than the model's smallest input (what :meth:`check_tile` accepts)."""
        name = self.image_input
        if name is None:
            raise DenseError(f"{self.label}: tiling needs exactly one image input with spatial axes in the metadata")
        outputs = tiling.output_axes(self.info, name, self.output_names)
        rank = len(self.info.inputs[name].spatial_axes)
        least = self.minimum_input(name)
        return tuple(max(least[k], tiling.minimum_tile([o.geometry[k] for o in outputs])) for k in range(rank))


MIN_BAND_ROWS = 16  # the final upsampling's smallest band of score-map rows (each band is one onnxruntime run)


@dataclasses.dataclass(frozen=True)
class _TailPlan:
    """How the rebuilt final upsampling runs under a budget: its estimated peak, and the bands."""

    estimate: int
    bands: "final_tail.Bands | None" = None
    rows: int | None = None  # score-map rows per band (None: whole)
    why: str | None = None  # why it runs whole over the budget


NEAR_LEANEST = 1.05  # nothing fits the budget: the fastest within 5% of the leanest's peak above the RSS before


def _load(model) -> tuple[str | None, onnx.ModelProto | None, metadata.DenseInfo]:
    """(path, proto, info): a path is loaded only to read its metadata (clear errors for bad files)."""
    if isinstance(model, (str, os.PathLike)):
        from onnx_dense import model_io

        path = str(model)
        ir_model = model_io.load(path)
        info = metadata.read(ir_model)
        del ir_model
        gc.collect()  # the onnx-ir model's reference cycles would keep a copy of the weights alive
        proto = None
    else:
        path = None
        if isinstance(model, onnx.ModelProto):
            proto = model
        elif hasattr(model, "graph") and hasattr(model, "opset_imports"):  # onnx-ir Model
            import onnx_ir as ir

            proto = ir.serde.serialize_model(model)
        else:
            raise DenseError(f"expected a model path, an onnx.ModelProto or an onnx-ir Model, got {type(model).__name__}")
        info = metadata.read(proto)
    if info is None:
        raise DenseError(
            f"{path or 'model'}: no onnx_dense metadata; was it written by `onnx-dense rewrite`? "
            "(run the original model with onnxruntime directly)"
        )
    return path, proto, info


def _stage_options(base: ort.SessionOptions) -> ort.SessionOptions:
    """The whole model's options, without the memory arena (stages would add up their arenas'
    peaks) and without spin-waiting (a stage's idle workers would spin while the next stage runs)."""
    so = ort.SessionOptions()
    so.log_severity_level = base.log_severity_level
    so.graph_optimization_level = base.graph_optimization_level
    if base.intra_op_num_threads:
        so.intra_op_num_threads = base.intra_op_num_threads
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = base.enable_mem_pattern
    set_spinning(so, False)
    for key in ("session.disable_cpu_ep_fallback",):
        value = base.get_session_config_entry(key) if _has_entry(base, key) else None
        if value:
            so.add_session_config_entry(key, value)
    return so


def _has_entry(so: ort.SessionOptions, key: str) -> bool:
    try:
        so.get_session_config_entry(key)
        return True
    except Exception:
        return False


def _stage_refused(exc: Exception, feeds) -> phases.StageRefused:
    shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
    return phases.StageRefused(f"onnxruntime failed to run a stage of the split model on {shapes} (a phase or "
                               f"tile this small can be shorter than a window, or a join's branches can differ "
                               f"in size at it: run it whole): {' '.join(str(exc).split())[:300]}")


def _return_freed_memory() -> None:
    """glibc only: large blocks (>= 128 KiB) from mmap, given back to the system when freed.

    By default glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), so
    the activations of one stage, freed, stay in the heap and the next stage's land beside them:
    measured on the FCN sample by phases, 2.5x the estimated peak and 100 MB kept after the run;
    with a fixed threshold, 1.1x and nothing kept. Set only for sessions given a budget or phases.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    """Resident set size of this process now (bytes); 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _unread(feeds) -> int:
    """Bytes of the inputs in ``feeds`` read by windows, were they made whole."""
    return sum(v.nbytes for v in feeds.values() if isinstance(v, windowed.WindowedInput))


def _shape(value) -> tuple:
    if isinstance(value, ort.OrtValue):
        return tuple(value.shape())
    return tuple(np.shape(value))


_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(bool)": np.dtype(np.bool_),
}
