"""Run a dense model over image files: what ``onnx-dense run`` does, as a Python function.

``run_images(model, images, out_dir, ...)`` makes one :class:`DenseSession`, and for each
image writes into ``out_dir``:

* ``<stem>.<output>.npy``: the dense output as the model returned it (batch axis included);
* ``<stem>.<output>.png``: the picture of it (:func:`onnx_dense.runtime.images.render`);
* ``<stem>.json``: the image's sizes, and per output its shape, files and grid (the input-pixel
  centre of prediction ``i`` along an axis is ``origin + i * stride``; divide by ``scale`` for
  pixels of the image file when it was resized).

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
from typing import Callable, Sequence

from onnx_dense.errors import DenseError
from onnx_dense.runtime import images as imglib
from onnx_dense.runtime import picture_stream
from onnx_dense.runtime.dense_session import DenseSession


STREAM_PICTURES_ABOVE = 2048 * 2048  # input pixels above which pictures are drawn band by band


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
    write_npy: bool = True,
    on_error: Callable[[str, str], None] | None = None,
    on_done: Callable[[ImageResult], None] | None = None,
    session: DenseSession | None = None,
) -> RunSummary:
    """Run ``model`` (a path or a DenseSession's model) on every file of ``images``; see module doc.

    Errors about the model or the options raise DenseError before any image runs; an error
    about one image goes to ``on_error(image, message)`` and into the summary.
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
        out.mkdir(parents=True, exist_ok=True)
        inputs = [Path(p) for p in images]
        stems = _unique_stems(inputs)
        outputs = [o for o in session.output_names]
        summary = RunSummary([], [], session.provider, session.providers)
        for path, stem in zip(inputs, stems):
            try:
                result = _one(session, path, stem, out, outputs, size, mean, std, channels, entry.spatial_axes, view,
                              write_npy, inputs)
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


def _one(session, path, stem, out, outputs, size, mean, std, channels, spatial_axes, view, write_npy, inputs) -> ImageResult:
    image = imglib.load_image(
        path, size=size, mean=mean, std=std, channels=channels, spatial_axes=spatial_axes,
        dtype=session.input_dtype(session.image_input),
    )
    maps = session.run({session.image_input: image.array})
    suffix = {name: _safe(name) for name in outputs}
    planned = []
    for name in outputs:
        if write_npy:
            planned.append(out / f"{stem}.{suffix[name]}.npy")
        if view != "none":
            planned.append(out / f"{stem}.{suffix[name]}.png")
    planned.append(out / f"{stem}.json")
    for target in planned:
        for src in inputs:
            if target.exists() and src.exists() and os.path.samefile(target, src):
                raise DenseError(f"{path}: would write {target}, which is an input file; choose another --out")
    files: list[str] = []
    described: dict[str, dict] = {}
    for name in outputs:
        dense = maps[name]
        array = dense.numpy()
        entry: dict = {"shape": list(array.shape), "dtype": str(array.dtype)}
        if dense.grid is not None:
            entry["grid"] = dense.grid.to_dict()
        if write_npy:
            target = out / f"{stem}.{suffix[name]}.npy"
            imglib.save_npy(target, array)
            files.append(str(target))
            entry["npy"] = target.name
        if image.size[0] * image.size[1] > STREAM_PICTURES_ABOVE:  # drawn and written band by band
            target = out / f"{stem}.{suffix[name]}.png"
            drawn = picture_stream.write_picture(target, dense, image, view)
            if drawn is not None:
                files.append(str(target))
                entry.update(png=target.name, view=drawn["view"])
                if drawn["top_class"] is not None:
                    entry["top_class"] = drawn["top_class"]
            del array
            described[name] = entry
            continue
        picture = imglib.render(dense, image, view)
        if picture is not None:
            target = out / f"{stem}.{suffix[name]}.png"
            imglib.save_png(target, picture.image)
            files.append(str(target))
            entry.update(png=target.name, view=picture.view)
            if picture.top_class is not None:
                entry["top_class"] = picture.top_class
        described[name] = entry
    record = {
        "image": str(path),
        "image_size": list(image.original_size),
        "input_size": list(image.size),
        "scale": list(image.scale),
        "provider": session.provider,
        "tile": list(session.tile) if isinstance(session.tile, (tuple, list)) else session.tile,
        "schedule": session.last_schedule.to_dict() if session.last_schedule else None,
        "outputs": described,
    }
    target = out / f"{stem}.json"
    imglib.save_text(target, _json(record))
    files.append(str(target))
    return ImageResult(str(path), files, described, session.last_schedule.describe() if session.last_schedule else None)


def _json(record: dict) -> str:
    """Indented JSON with lists of numbers kept on one line."""

    def inline(match: re.Match) -> str:
        return "[" + ", ".join(v.strip() for v in match.group(1).split(",")) + "]"

    return re.sub(r"\[([-+0-9.eE,\s]*)\]", inline, json.dumps(record, indent=2)) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "output"


def _unique_stems(paths: Sequence[Path]) -> list[str]:
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
