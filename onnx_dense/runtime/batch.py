"""Run a dense model over image files: what ``onnx-dense run`` does, as a Python function.

``run_images(model, images, out_dir, ...)`` makes one :class:`DenseSession`, and for each
image writes into ``out_dir``:

* ``<stem>.<output>.npy``: the dense output as the model returned it (batch axis included);
* ``<stem>.<output>.png``: the picture a person reads (:func:`onnx_dense.pictures.map_figure`):
  the label map blended over the image with a legend of class names, or a heatmap with a
  colour bar spanning the map's own range;
* ``<stem>.<output>.labels.png``: for label maps, the argmax map as a palette PNG whose pixel
  values are the classes (:func:`onnx_dense.runtime.images.render`), for programs;
* ``<stem>.json``: the image's sizes, and per output its shape, files and grid (the input-pixel
  centre of prediction ``i`` along an axis is ``origin + i * stride``; divide by ``scale`` for
  pixels of the image file when it was resized).

A ``.npy`` image run with a tile is read window by window and its outputs are stitched into
.npy files on disk (:mod:`onnx_dense.runtime.windowed`): memory bounded by a tile, not the image.
Under a memory budget or with tiles every image's input is normalised window by window
(``load_image(..., windows=True)``): a schedule that tiles the image (tiles, the tiled trunk,
phases on tiles) then holds the decoded pixels and one tile's input, never the whole float input.
Every file is written to a temporary name and renamed, so a failure never leaves half a file;
input files are never written (an output path that is an input is an error for that image).
An image that cannot be read or run is reported through ``on_error`` and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import numpy as np

from onnx_dense import pictures
from onnx_dense.errors import DenseError
from onnx_dense.files import refuse_link
from onnx_dense.runtime import images as imglib
from onnx_dense.runtime import dense_session, picture_stream, tiling, windowed
from onnx_dense.runtime.dense_session import DenseMap, DenseSession, PixelGrid
from onnx_dense.runtime.schedule import Schedule


STREAM_PICTURES_ABOVE = 2048 * 2048  # input pixels above which pictures are drawn band by band
# What matplotlib's figure of a map costs above the run, per image pixel (its float blends and
# its RGBA copy): 305 MiB for a 2048x2048 picture (76 bytes a pixel, measured 2026-12-07).
# Under a budget a picture that would not fit is drawn band by band instead.
FIGURE_BYTES_PER_PIXEL = 80


def stream_pictures(session, image) -> bool:
    """Whether ``image``'s pictures are drawn band by band: above :data:`STREAM_PICTURES_ABOVE`
    pixels, or where the session has a memory budget that matplotlib's figure would exceed."""
    pixels = image.size[0] * image.size[1]
    if pixels > STREAM_PICTURES_ABOVE:
        return True
    budget = getattr(session, "max_memory", None)
    if budget is None:
        return False
    return dense_session._rss() + FIGURE_BYTES_PER_PIXEL * pixels > budget


@dataclasses.dataclass
class ImageResult:
    image: str
    files: list[str]
    outputs: dict[str, dict]
    schedule: str | None = None  # what the run did (whole, phases, tiles...), one line


@dataclasses.dataclass
class RunSummary:
    written: list[ImageResult]
    failed: list[tuple[str, str]]  # (image, one-line error)
    provider: str
    providers: list[str]
    skipped: list[str] = dataclasses.field(default_factory=list)  # done by an earlier run (--engine ray)

    @property
    def ok(self) -> bool:
        return not self.failed


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
    on_error: Callable[[str, str], None] | None = None,
    on_done: Callable[[ImageResult], None] | None = None,
    session: DenseSession | None = None,
) -> RunSummary:
    """Run ``model`` (a path or a DenseSession's model) on every file of ``images``; see module doc.

    Errors about the model or the options raise DenseError before any image runs; an error
    about one image goes to ``on_error(image, message)`` and into the summary. ``class_names``:
    a list, ``'a,b,c'`` or a text file with one name per line, for the pictures' legends.
    """
    size = imglib.parse_size(size)
    mean = imglib.parse_floats(mean, "--mean")
    std = imglib.parse_floats(std, "--std")
    if view not in imglib.VIEWS:
        raise DenseError(f"--view '{view}': use one of {', '.join(imglib.VIEWS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DenseError(f"{out}: exists and is not a directory; give a directory for --out")
    if not images:
        raise DenseError("no images given")
    own_session = session is None
    if session is None:
        session = DenseSession(
            model, provider=provider, fp16=fp16, nhwc=nhwc, allow_cpu_nodes=allow_cpu_nodes,
            fixed_shapes=isinstance(size, tuple) and tile is None, tile=tile, max_memory=max_memory,
            schedule=schedule,
        )
    try:
        entry, channels = image_layout(session)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DenseError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
        inputs = [Path(p) for p in images]
        stems = unique_stems(inputs)
        outputs = [o for o in session.output_names]
        summary = RunSummary([], [], session.provider, session.providers)
        for path, stem in zip(inputs, stems):
            try:
                result = _one(session, path, stem, out, outputs, size, mean, std, channels, entry.spatial_axes, view,
                              write_npy, inputs, class_names)
            except DenseError as exc:
                message = str(exc)
                if not message.startswith(str(path)):
                    message = f"{path}: {message}"
                summary.failed.append((str(path), message))
                if on_error:
                    on_error(str(path), message)
                continue
            summary.written.append(result)
            if on_done:
                on_done(result)
        return summary
    finally:
        if own_session:
            session.close()


def image_layout(session: DenseSession):
    """(metadata entry, channels) of the model's image input; DenseError when it is not one 2-D image."""
    name = session.image_input
    if name is None:
        raise DenseError(f"{session.label}: onnx-dense run needs a model with one image input")
    entry = session.info.inputs[name]
    if len(entry.spatial_axes) != 2:
        raise DenseError(
            f"{session.label}: input '{name}' has {len(entry.spatial_axes)} spatial axes; onnx-dense run reads 2-D images"
        )
    shape = session.input_shape(name)
    channel_axes = [a for a in range(1, len(shape)) if a not in entry.spatial_axes]
    if len(shape) != 4 or len(channel_axes) != 1:
        raise DenseError(f"{session.label}: input '{name}' has shape {shape}; onnx-dense run feeds (1, C, H, W) or (1, H, W, C)")
    channels = shape[channel_axes[0]] if isinstance(shape[channel_axes[0]], int) else 3
    return entry, channels


def _one(session, path, stem, out, outputs, size, mean, std, channels, spatial_axes, view, write_npy, inputs,
         class_names=None) -> ImageResult:
    load = dict(size=size, mean=mean, std=std, channels=channels, spatial_axes=spatial_axes,
                dtype=session.input_dtype(session.image_input))
    disk = None
    try:
        if windowed.is_windowed(path) and session.tile is not None and session.schedule in ("auto", "tiles"):
            # read by windows, stitched into .npy files in ``out``: memory bounded by a tile, not the image
            image = windowed.open_image(path, **load)
            disk = windowed.DiskOutputs(out, stem)
            maps, schedule = run_windows(session, image, disk)
        else:
            # with a budget or tiles the input is normalised by windows: tiles never hold it whole
            image = imglib.load_image(path, windows=session.max_memory is not None or session.tile is not None,
                                      **load)
            if session.max_memory is not None and session.rebuilt_outputs:
                # a final upsampling run in bands writes its image-sized outputs to files
                disk = windowed.DiskOutputs(out, stem)
            maps = session.run({session.image_input: image.array}, allocate=disk.allocate if disk else None)
            schedule = session.last_schedule
        check_not_inputs(path, out, planned_names(stem, outputs, view, write_npy), inputs)
        described: dict[str, dict] = {}
        files: list[str] = []
        for filename, write in encode(maps, image, path, stem, outputs, view, write_npy, session.provider, session.tile,
                                      described, class_names, schedule.to_dict() if schedule else None,
                                      stream=stream_pictures(session, image)):
            target = out / filename
            windowed.write(target, write)
            files.append(str(target))
    finally:
        if disk is not None:
            disk.discard()
    return ImageResult(str(path), files, described, schedule.describe() if schedule else None)


def run_windows(session: DenseSession, image, disk) -> tuple[dict, Schedule]:
    """The session's tiled run of a windowed image: each tile read from the file, outputs stitched on disk."""
    name = session.image_input
    entry = session.info.inputs[name]
    check_minimum(image.shape, entry.spatial_axes, session.minimum_input(name), name, session.label)
    outputs = tiling.output_axes(session.info, name, session.output_names)
    crops = tiling.plan_tiles(image.shape, entry.spatial_axes, outputs, session.tile)
    stitcher = tiling.Stitcher(outputs, crops, allocate=disk.allocate)
    for crop in crops:
        stitcher.add(crop, session.run_raw({name: image.window(crop.index)}))
    values = stitcher.result()
    maps = {}
    for out_name in session.output_names:
        value, meta = values[out_name], session.info.outputs.get(out_name)
        maps[out_name] = DenseMap(out_name, value, PixelGrid.of(meta, value.shape) if meta else None, meta)
    return maps, Schedule("tiles", tile=tuple(session.tile), tiles=len(crops))


def check_minimum(shape, spatial_axes, minimum, input_name: str, label) -> None:
    """DenseSession's check of an input's size, for inputs the driver only plans tiles of."""
    fed = tuple(shape[a] for a in spatial_axes)
    if any(n < m for n, m in zip(fed, minimum)):  # below this some kernels divide by a zero size
        raise DenseError(
            f"input '{input_name}' is {'x'.join(map(str, fed))} pixels; {label} needs at least "
            f"{'x'.join(map(str, minimum))} (below that an output has no prediction left)"
        )


def planned_names(stem: str, outputs: Sequence[str], view: str, write_npy: bool) -> list[str]:
    """Every file name an image may get (a picture only where its output can be drawn)."""
    names = []
    for name in outputs:
        if write_npy:
            names.append(f"{stem}.{_safe(name)}.npy")
        if view != "none":
            names += [f"{stem}.{_safe(name)}.png", f"{stem}.{_safe(name)}.labels.png"]
    return names + [f"{stem}.json"]


def check_not_inputs(path, out: Path, names: Sequence[str], inputs: Sequence[Path]) -> None:
    for filename in names:
        target = out / filename
        refuse_link(target, "maps")
        for src in inputs:
            if target.exists() and src.exists() and os.path.samefile(target, src):
                raise DenseError(f"{path}: would write {target}, which is an input file; choose another --out")


def encode(maps, image, path, stem, outputs, view, write_npy, provider, tile,
           described: dict[str, dict], class_names=None, schedule: dict | None = None,
           stream: bool | None = None) -> Iterator[tuple[str, Callable[[IO[bytes]], None]]]:
    """(file name, write(file)) for each file of one image, the JSON last; fills ``described``.

    ``stream``: pictures drawn band by band (default: :func:`stream_pictures` without a budget,
    above :data:`STREAM_PICTURES_ABOVE` pixels), without the figure's title and legend; the JSON's
    ``picture`` says which was drawn (``bands`` or ``figure``).

    Pictures are drawn one at a time as the caller writes them, so only one is held at once;
    the caller decides where the bytes go (a file here, a reply to the driver in the Ray engine).
    """
    banded = stream if stream is not None else stream_pictures(None, image)
    for name in outputs:
        dense = maps[name]
        array = dense.numpy()
        entry: dict = {"shape": list(array.shape), "dtype": str(array.dtype)}
        if dense.grid is not None:
            entry["grid"] = dense.grid.to_dict()
        described[name] = entry
        if write_npy:
            filename = f"{stem}.{_safe(name)}.npy"
            # an output stitched on disk is moved into place, else written
            yield filename, windowed.disk_file(dense.value) or (
                lambda f, a=array: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
            entry["npy"] = filename
        if banded:  # drawn and written band by band
            drawn = picture_stream.picture_writer(dense, image, view)
            if drawn is not None:
                info, write = drawn
                filename = f"{stem}.{_safe(name)}.png"
                entry.update(png=filename, view=info["view"], picture="bands")
                if info["top_class"] is not None:
                    entry["top_class"] = info["top_class"]
                yield filename, write
            del array
            continue
        picture = imglib.render(dense, image, view, draw_heatmap=False)  # matplotlib draws it
        if picture is not None:
            if picture.view == "labels":
                filename = f"{stem}.{_safe(name)}.labels.png"
                yield filename, lambda f, p=picture.image: p.save(f, format="PNG")
                entry["labels_png"] = filename
            filename = f"{stem}.{_safe(name)}.png"
            yield filename, lambda f, d=dense, v=picture.view: pictures.write(
                pictures.map_figure(d, image, v, class_names), f)
            entry.update(png=filename, view=picture.view, picture="figure")
            if picture.top_class is not None:
                entry["top_class"] = picture.top_class
    record = {
        "image": str(path),
        "image_size": list(image.original_size),
        "input_size": list(image.size),
        "scale": list(image.scale),
        "provider": provider,
        "tile": list(tile) if isinstance(tile, (tuple, list)) else tile,
        "schedule": schedule,
        "outputs": described,
    }
    text = _json(record).encode("utf-8")
    yield f"{stem}.json", lambda f: f.write(text)


def _json(record: dict) -> str:
    """Indented JSON with lists of numbers kept on one line."""

    def inline(match: re.Match) -> str:
        return "[" + ", ".join(v.strip() for v in match.group(1).split(",")) + "]"

    return re.sub(r"\[([-+0-9.eE,\s]*)\]", inline, json.dumps(record, indent=2)) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "output"


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, with -2, -3... added where two images share one (a/x.jpg, b/x.png)."""
    used: set[str] = set()
    stems = []
    for p in paths:
        base = _safe(p.stem) or "image"
        stem, n = base, 1
        while stem in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems
