"""``onnx-dense run --engine ray``: the local run's maps, pictures and JSON, computed by Ray actors.

Ray is an optional extra (``pip install 'onnx-dense[ray]'``); only this module imports it, and
only when a run asks for it. ``run_images(...)`` takes the arguments of
:func:`onnx_dense.runtime.batch.run_images` plus ``address`` (an existing cluster; None starts a
local one), ``workers`` and ``cpus_per_worker``, and returns the same :class:`RunSummary`.

What runs where:

* The driver (the process you start) opens the model once on the CPU to check it and the
  options (a bad model or --tile is one line before any worker starts), skips the images
  already done (``<stem>.json`` is written last and names the image, so a rerun resumes after a
  crash), reads each image file, and writes every result file itself, through the same atomic
  writes as the local run. Workers therefore need no shared file system, and a worker that dies
  mid-image leaves no half-written or temporary file behind.
* Each Ray actor holds one :class:`DenseSession` (one onnxruntime session per worker, created
  once; the model's bytes go to the cluster once). Without ``--tile`` a task is one
  image: its file's bytes go out, the worker decodes, runs, draws and encodes with the code of
  the local run (:func:`batch.encode`), and the bytes of its .npy/.png/.json come back.
  ``--max-memory`` (and ``--schedule``) apply to each worker's session as to the local one:
  it picks each image's schedule within the budget, and the line per image says which; a
  picture is drawn band by band where its figure would not fit (:func:`batch.stream_pictures`),
  but the encoded files come back in memory, so the budget does not bound them. With
  ``--tile`` the driver decodes the image and cuts the tiles :func:`tiling.plan_tiles` plans
  (overlap by the receptive field); the tiles of all images go to the workers as one stream, so
  a single huge image keeps every worker busy, and :class:`tiling.Stitcher` puts them back as
  they return, in any order. The stitched map is then drawn and written on the driver.
* A ``.npy`` image with ``--tile`` (:mod:`windowed`) is never decoded on the driver: a task is
  the file's absolute path, its (size, mtime) and the tile's window, and the worker reads and
  normalises the window itself. A worker that does not see the same file (another machine
  without shared storage) answers ``NOT_HERE``; the driver then reads that window and every
  later one and sends the pixels. Outputs are stitched into .npy files on the driver's disk
  and moved into place, so the driver's memory is a tile's, whatever the image's size.
* Failures. A bad image (unreadable, too small) is one line and the others go on. A worker
  process that dies (killed, out of memory, a crash in a kernel) is restarted by Ray
  (``max_restarts``) and the tasks it held run again there (``max_task_retries``): a retried
  task gives the same bytes under the same names, so nothing is lost or written twice. An image
  that kills its worker every time fails, after the retries, with one line.

Why actors and ``ray.wait`` rather than Ray Data's ``map_batches`` or ``ray.util.ActorPool``:
results must be written by the driver as they come, per image, with per-image errors; Ray Data
fails the whole dataset on a task error by default and would carry tiles of many shapes as
Arrow tensor columns, and ActorPool's ``get_next_unordered`` cannot say which task failed. Each
actor gets one task at a time (a task queued behind one that kills the actor would be retried,
and fail, with it); placement, transfer, restarts and retries are Ray's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from onnx_dense.errors import DenseError
from onnx_dense.runtime import batch, images as imglib, tiling, windowed
from onnx_dense.runtime.batch import ImageResult, RunSummary
from onnx_dense.runtime.dense_session import DenseMap, DenseSession, PixelGrid
from onnx_dense.runtime.schedule import Schedule

INSTALL_HINT = "--engine ray needs Ray, which is not installed: pip install 'onnx-dense[ray]' (or pip install ray)"
#: Test hook, read by the driver and handed to the workers: ``LABEL@MARKER`` makes the worker that
#: gets the task LABEL (an image's file name, or ``name#k`` for its tile k) kill its own process,
#: once: it first creates the file MARKER, and does nothing when MARKER exists. ``LABEL`` alone:
#: every time (an image that always crashes its worker).
FAULT_ENV = "ONNX_DENSE_RAY_FAULT"
_DEPTH = 1  # tasks given to an actor at a time: a task queued behind one that kills the actor would share its retries
_INLINE_MODEL = 64 * 1024  # bytes; a smaller model travels inside the actors' creation tasks
_TASK_RETRIES = 3  # re-runs of a task whose worker died, before its image fails
NOT_HERE = "not-here"  # a worker's reply: the windowed image's file is not (the same file) on its machine


def import_ray():
    """The ``ray`` module, or a DenseError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DenseError(INSTALL_HINT) from None
    return ray


# --------------------------------------------------------------------------------------------
# the worker (a Ray actor; the class is made remote when a run starts, so importing this
# module does not import ray)
# --------------------------------------------------------------------------------------------


class _Worker:
    """One DenseSession, serving whole images (bytes in, file bytes out) and tiles (array in, arrays out)."""

    def __init__(self, model, label, provider, fp16, nhwc, allow_cpu_nodes, fixed_shapes, tile, threads,
                 load, fault, max_memory=None, schedule="auto"):
        import onnx
        import ray

        kind, model = model
        if kind == "holder":  # the run's model holder, asked again after each restart
            model = ray.get(ray.get_actor(model).get.remote())
        if isinstance(model, bytes):
            model = onnx.load_from_string(model)
        self.session = DenseSession(
            model, provider=provider, fp16=fp16, nhwc=nhwc, allow_cpu_nodes=allow_cpu_nodes,
            fixed_shapes=fixed_shapes, threads=threads, spinning=False, tile=tile, max_memory=max_memory,
            schedule=schedule,
        )
        self.session.label = label
        self.load = load  # keyword arguments of load_image
        self.fault = fault

    def ready(self) -> str:
        return self.session.provider

    def image(self, label: str, path: str, stem: str, data: bytes, outputs, view, write_npy, class_names=None):
        self._maybe_die(label)
        try:
            image = imglib.load_image(path, data=data, dtype=self.session.input_dtype(self.session.image_input),
                                      windows=self.session.max_memory is not None, **self.load)
            maps = self.session.run({self.session.image_input: image.array})
            schedule = self.session.last_schedule
            described: dict = {}
            files = []
            for filename, write in batch.encode(maps, image, path, stem, outputs, view, write_npy,
                                                self.session.provider, self.session.tile, described, class_names,
                                                schedule.to_dict() if schedule else None,
                                                stream=batch.stream_pictures(self.session, image)):
                buffer = io.BytesIO()
                write(buffer)
                files.append((filename, buffer.getvalue()))
            return files, described, None, schedule.describe() if schedule else None
        except DenseError as exc:
            return None, None, str(exc), None
        except Exception as exc:  # a bug: one line for this image, the run goes on
            return None, None, _internal(exc), None

    def tile(self, label: str, array: np.ndarray):
        self._maybe_die(label)
        try:
            return self.session.run_raw({self.session.image_input: array}), None
        except DenseError as exc:
            return None, str(exc)
        except Exception as exc:
            return None, _internal(exc)

    def window(self, label: str, path: str, signature, index):
        """A tile this worker reads itself from a windowed image at ``path`` (the driver's file when
        ``signature`` matches; else ``(None, NOT_HERE)`` and the driver sends the pixels)."""
        self._maybe_die(label)
        try:
            if windowed.signature(path) != tuple(signature):
                return None, NOT_HERE
        except OSError:
            return None, NOT_HERE
        try:
            load = dict(self.load, dtype=self.session.input_dtype(self.session.image_input))
            array = windowed.open_image(path, **load).window(index)
            return self.session.run_raw({self.session.image_input: array}), None
        except DenseError as exc:
            return None, str(exc)
        except Exception as exc:
            return None, _internal(exc)

    def _maybe_die(self, label: str) -> None:
        target, _, marker = (self.fault or "").partition("@")
        if target != label:
            return
        if marker:
            try:
                with open(marker, "x"):
                    pass
            except FileExistsError:
                return
        os._exit(1)


def _holder_class():
    """A class made here, so that Ray ships it by value and its process need not import onnx_dense."""

    class ModelHolder:
        def __init__(self, payload):
            self.payload = payload

        def get(self):
            return self.payload

    return ModelHolder


def _internal(exc: Exception) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"internal error in a Ray worker: {type(exc).__name__}: {text} (a bug in onnx-dense; please report it)"


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Image:
    path: Path
    stem: str
    tiles: int = 1
    reported: float = 0.0  # of this image, given to on_progress so far
    image: imglib.ImageInput | windowed.NpyImage | None = None
    stitcher: tiling.Stitcher | None = None
    disk: windowed.DiskOutputs | None = None  # a windowed image's outputs, stitched on disk
    failed: bool = False

    def drop(self) -> None:
        """Let go of the image and its partial outputs (their temporary files too)."""
        self.image = self.stitcher = None
        if self.disk is not None:
            self.disk.discard()


def run_images(
    model,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    size=None,
    mean=(0.0,),
    std=(1.0,),
    provider: str = "auto",
    tile=None,
    max_memory=None,
    schedule: str = "auto",
    fp16: bool = False,
    nhwc: bool = False,
    allow_cpu_nodes: bool = False,
    view: str = "auto",
    class_names=None,
    write_npy: bool = True,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    resume: bool = True,
    on_error: Callable[[str, str], None] | None = None,
    on_done: Callable[[ImageResult], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run ``model`` (a path) on ``images`` with Ray workers; see the module doc.

    ``on_progress(images)`` is called with the fraction of an image each finished task was
    (1 for a whole image, 1/n for one of its n tiles); ``on_skip(image)`` for each image a
    previous run finished; ``on_ready(workers)`` once the workers have opened the model (what
    comes before is the cost of starting them).
    """
    ray = import_ray()
    if not isinstance(model, (str, os.PathLike)):
        raise DenseError("--engine ray takes the model as a file path")
    size = imglib.parse_size(size)
    mean = imglib.parse_floats(mean, "--mean")
    std = imglib.parse_floats(std, "--std")
    if view not in imglib.VIEWS:
        raise DenseError(f"--view '{view}': use one of {', '.join(imglib.VIEWS)}")
    if workers is not None and workers < 1:
        raise DenseError(f"--workers {workers}: use at least 1")
    if cpus_per_worker < 1:
        raise DenseError(f"--cpus-per-worker {cpus_per_worker}: use at least 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DenseError(f"{out}: exists and is not a directory; give a directory for --out")
    if not images:
        raise DenseError("no images given")
    # The driver's own session only plans: it checks the model, the input layout and the tile.
    with DenseSession(model, provider="cpu", tile=tile, max_memory=max_memory, schedule=schedule) as planner:
        entry, channels = batch.image_layout(planner)
        outputs = list(planner.output_names)
        tile_v = planner.tile
        if tile_v and planner.rebuilt_outputs:
            raise DenseError(
                f"{model}: output '{planner.rebuilt_outputs[0]}' is a final upsampling rebuilt on the whole score map, "
                "which a worker's tile cannot compute; run it with --tile without --engine ray (the local run tiles the "
                "model up to the score map), or with --engine ray without --tile"
            )
        axes = tiling.output_axes(planner.info, planner.image_input, outputs) if tile_v else None
        dense_outputs = {name: planner.info.outputs.get(name) for name in outputs}
        input_name = planner.image_input
        dtype = planner.input_dtype(input_name)
        minimum = planner.minimum_input(planner.image_input)
    load = dict(size=size, mean=mean, std=std, channels=channels, spatial_axes=tuple(entry.spatial_axes))
    out.mkdir(parents=True, exist_ok=True)
    inputs = [Path(p) for p in images]
    summary = RunSummary([], [], "ray", [])
    todo = []
    for path, stem in zip(inputs, batch.unique_stems(inputs)):
        if resume and _finished(out, stem, path):
            summary.skipped.append(str(path))
            if on_skip:
                on_skip(str(path))
        else:
            todo.append(_Image(path, stem))
    if not todo:
        return summary

    def advance(item: _Image, amount: float | None = None) -> None:
        """Report progress: ``amount`` of an image, or what is left of it once it is done."""
        amount = 1.0 - item.reported if amount is None else min(amount, 1.0 - item.reported)
        item.reported += amount
        if on_progress and amount > 0:
            on_progress(amount)

    def fail(item: _Image, message: str) -> None:
        if item.failed:
            return
        item.failed = True
        item.drop()
        if not message.startswith(str(item.path)):
            message = f"{item.path}: {message}"
        summary.failed.append((str(item.path), message))
        if on_error:
            on_error(str(item.path), message)
        advance(item)

    def finish(item: _Image, files: Sequence[tuple[str, Callable]], described: dict, chosen: str | None = None) -> None:
        try:
            batch.check_not_inputs(item.path, out, [name for name, _ in files], inputs)
            written = []
            for filename, write in files:
                windowed.write(out / filename, write)
                written.append(str(out / filename))
        except DenseError as exc:
            fail(item, str(exc))
            return
        result = ImageResult(str(item.path), written, described, chosen)
        summary.written.append(result)
        if on_done:
            on_done(result)
        advance(item)

    def tasks() -> Iterator[tuple]:
        """(item, method name, label, args) for each task, reading or decoding images only as needed."""
        for item in todo:
            try:
                if tile_v is not None and windowed.is_windowed(item.path):
                    # read by windows (by the workers themselves where they see the file), stitched on disk
                    item.image = windowed.open_image(item.path, dtype=dtype, **load)
                    item.disk = windowed.DiskOutputs(out, item.stem)
                    where = (str(item.path.resolve()), windowed.signature(item.path))
                    shape, x = item.image.shape, None
                else:
                    data = _read(item.path)
                    if tile_v is None:
                        yield item, "image", item.path.name, (str(item.path), item.stem, data, outputs, view, write_npy, class_names)
                        continue
                    # the pixels held, each tile's input normalised when it is shipped
                    item.image = imglib.load_image(item.path, data=data, dtype=dtype, windows=True, **load)
                    del data
                    x = item.image.array
                    shape = x.shape
                # the local run's check (DenseSession._feeds)
                batch.check_minimum(shape, entry.spatial_axes, minimum, input_name, model)
                crops = tiling.plan_tiles(shape, entry.spatial_axes, axes, tile_v)
            except DenseError as exc:
                fail(item, str(exc))
                continue
            allocate = item.disk.allocate if item.disk else None
            item.tiles, item.stitcher = len(crops), tiling.Stitcher(axes, crops, allocate=allocate)
            for crop in crops:
                if item.failed:
                    break
                label = f"{item.path.name}#{crop.number}"
                if x is not None:
                    yield item, "tile", label, (crop, x[crop.index])
                else:
                    yield item, "window", label, (crop, where)

    with _cluster(ray, address, workers, cpus_per_worker, provider) as (n_workers, use_gpu):
        # A large model's bytes live in one named holder actor for the run, and a worker restarted by Ray
        # fetches them again from it (Ray warns about ObjectRefs or actor handles among a restartable
        # actor's arguments); a small model, or the path of one with external weights, goes in the task.
        payload, holder = _model_payload(model), None
        if isinstance(payload, bytes) and len(payload) > _INLINE_MODEL:
            source = ("holder", f"onnx-dense-model-{uuid.uuid4().hex}")
            holder = ray.remote(_holder_class()).options(num_cpus=0, name=source[1]).remote(payload)
        else:
            source = ("value", payload)
        del payload
        remote = ray.remote(_Worker).options(
            num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=-1, max_task_retries=_TASK_RETRIES,
        )
        fault = os.environ.get(FAULT_ENV)
        fixed_shapes = isinstance(size, tuple) and tile_v is None
        actors = [
            remote.remote(source, str(model), provider, fp16, nhwc, allow_cpu_nodes, fixed_shapes, tile_v,
                          cpus_per_worker, load, fault, planner.max_memory, schedule)
            for _ in range(n_workers)
        ]
        try:
            try:
                worker_provider = ray.get([a.ready.remote() for a in actors])[0]
            except ray.exceptions.RayError as exc:
                raise DenseError(f"the Ray workers could not open {model}: {_cause(exc)}") from None
            summary.provider = f"ray, {n_workers} worker{'s' if n_workers != 1 else ''}, {worker_provider}"
            summary.providers = [worker_provider]
            if on_ready:
                on_ready(n_workers)

            stream = tasks()
            inflight: dict = {}
            again: list = []  # window tasks whose worker could not read the file: their pixels go out
            ship_pixels = False  # set once a worker could not read a windowed image's file

            def submit(actor) -> None:
                for item, method, label, args in itertools.chain(_drain(again), stream):
                    if item.failed:
                        continue
                    if method == "image":
                        ref = actor.image.remote(label, *args)
                    elif method == "window" and not ship_pixels:
                        crop, (path, signature) = args
                        ref = actor.window.remote(label, path, signature, crop.index)
                        args = (crop, label)
                    else:
                        crop = args[0]
                        array = args[1] if method == "tile" else item.image.window(crop.index)
                        method = "tile"
                        ref = actor.tile.remote(label, array)
                        args = (crop, label)
                    inflight[ref] = (item, method, args, actor)
                    return

            for _ in range(_DEPTH):
                for actor in actors:
                    submit(actor)
            while inflight:
                [ref], _ = ray.wait(list(inflight), num_returns=1)
                item, method, args, actor = inflight.pop(ref)
                try:
                    reply = ray.get(ref)
                except ray.exceptions.RayActorError:
                    reply = None
                    fail(item, f"the Ray worker running it died {_TASK_RETRIES + 1} times (killed, out of memory, or a crash "
                               "in a kernel); the other images went on")
                except ray.exceptions.RayError as exc:
                    reply = None
                    fail(item, f"Ray could not run it: {_cause(exc)}")
                if reply is not None and not item.failed:
                    if method == "image":
                        files, described, error, chosen = reply
                        if error:
                            fail(item, error)
                        else:
                            finish(item, [(name, _writer(data)) for name, data in files], described, chosen)
                    else:
                        values, error = reply
                        crop, label = args
                        if error == NOT_HERE:  # not on shared storage: the driver reads the window
                            ship_pixels = True
                            again.append((item, "tile", label, (crop, item.image.window(crop.index))))
                        elif error:
                            fail(item, error)
                        else:
                            item.stitcher.add(crop, values)
                            if item.stitcher.remaining:
                                advance(item, 1.0 / item.tiles)
                            else:
                                _finish_tiled(item, outputs, dense_outputs, view, write_npy, class_names, worker_provider, tile_v,
                                              finish, fail)
                submit(actor)
        finally:  # a cluster the caller started stays up: give its CPUs back
            for actor in [*actors, holder] if holder else actors:
                ray.kill(actor)
            for item in todo:  # an interrupted run leaves no temporary file behind
                if item.disk is not None:
                    item.disk.discard()
    order = {str(p): i for i, p in enumerate(inputs)}
    summary.written.sort(key=lambda r: order[r.image])
    summary.failed.sort(key=lambda f: order[f[0]])
    return summary


def _finish_tiled(item, outputs, dense_outputs, view, write_npy, class_names, provider, tile, finish, fail) -> None:
    stitched = item.stitcher.result()
    maps = {}
    for name in outputs:
        value, meta = stitched[name], dense_outputs[name]
        maps[name] = DenseMap(name, value, PixelGrid.of(meta, value.shape) if meta else None, meta)
    described: dict = {}
    try:
        schedule = Schedule("tiles", tile=tuple(tile), tiles=item.tiles)  # what the local run records
        files = list(batch.encode(maps, item.image, item.path, item.stem, outputs, view, write_npy, provider, tile,
                                  described, class_names, schedule.to_dict()))
        finish(item, files, described, schedule.describe())
    except DenseError as exc:
        fail(item, str(exc))
    item.drop()


def _drain(items: list) -> Iterator:
    while items:
        yield items.pop(0)


def _writer(data: bytes):
    return lambda f: f.write(data)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        imglib.load_image(path)  # raises the local run's one line (no such file, a directory...)
        raise DenseError(f"{path}: cannot be read") from None


def _finished(out: Path, stem: str, path: Path) -> bool:
    """A previous run wrote this image: its JSON (written last) names it and lists files that exist."""
    record_path = out / f"{stem}.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("image") != str(path):
        return False
    for entry in (record.get("outputs") or {}).values():
        for key in ("npy", "png"):
            if key in entry and not (out / entry[key]).is_file():
                return False
    return True


def _model_payload(model) -> bytes | str:
    """The model's bytes for the object store, or its absolute path when its weights are external files
    (which the workers must then see at the same path)."""
    import onnx

    path = Path(model)
    proto = onnx.load(str(path), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    return str(path.resolve()) if external else path.read_bytes()


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = " ".join(str(cause).split())
    # A DenseError raised in a worker's constructor: keep its own line.
    marker = "DenseError: "
    if marker in text:
        text = text.split(marker, 1)[1]
    return text[:300] or type(exc).__name__


@contextlib.contextmanager
def _cluster(ray, address, workers, cpus_per_worker, provider):
    """Connect to ``address`` or start a local Ray (stopped afterwards); yields (workers, one GPU each?).

    Workers: ``workers``, or one per GPU of the cluster when they run on GPUs (``--provider cuda``, or
    ``auto`` on a cluster with GPUs), else one per ``cpus_per_worker`` CPUs.
    """
    started = False
    if address:
        _check_reachable(address)
    if not ray.is_initialized():  # else: the caller's Ray (a test's, a notebook's) is used as it is
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if address is None:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, (workers or 1) * cpus_per_worker)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise DenseError(f"could not start or reach {where}: {' '.join(str(exc).split())[:300]}") from None
        started = True
    try:
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        use_gpu = provider == "cuda" or (provider == "auto" and gpus > 0)
        n = workers or max(1, gpus if use_gpu else cpus // cpus_per_worker)
        if n * cpus_per_worker > cpus or (use_gpu and n > gpus):
            have = f"{cpus} CPUs" + (f" and {gpus} GPUs" if use_gpu else "")
            raise DenseError(
                f"{n} worker{'s' if n != 1 else ''} with {cpus_per_worker} CPU{'s' if cpus_per_worker > 1 else ''}"
                f"{' and a GPU' if use_gpu else ''} each do{'es' if n == 1 else ''} not fit in the Ray cluster ({have}); "
                "lower --workers or --cpus-per-worker"
            )
        yield n, use_gpu
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """One line now for an address nobody answers at (ray.init would retry it for minutes, noisily)."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise DenseError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); give the address "
            "`ray start --head` printed, or leave --address out to start a local Ray"
        ) from None
