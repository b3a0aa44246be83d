"""The picture of a dense map, drawn and written band by band (bounded memory for huge images).

:func:`onnx_dense.runtime.images.render` draws the whole picture in memory: for an 8000x8000
image that is several full-size arrays (int64 labels, float64 heat, float RGB blends), about
5 GB. Here the same picture is drawn a band of rows at a time and each band is compressed
into the PNG as soon as it is drawn, so memory is a band's worth whatever the image size.
Pixels are the same as :func:`render`'s (tests/test_phases.py decodes both and compares).

The PNG is written with the standard library's zlib, because Pillow can only save a whole
image at once (it has no row-by-row writer); the format needed is small: signature, IHDR,
PLTE for label maps, IDAT chunks of one zlib stream of filter-0 rows, IEND (PNG spec 1.2).
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Iterator

import numpy as np

from onnx_dense.runtime import images as imglib
from onnx_dense.runtime import windowed

# Scores per band: ~2M (a few tens of MB of temporaries). Counted in scores, not pixels: a band
# of 2M pixels of 21 class maps took copies of 21 x 2M scores (176 MB, twice: the band and
# numpy's argmax).
BAND_PIXELS = 1 << 21


def write_picture(path, dense, image, view: str = "auto", alpha: float = 0.5) -> dict | None:
    """Draw ``dense`` over ``image`` as :func:`images.render` would and write it to ``path``.

    Returns ``{"view", "top_class", "classes"}`` (None when the output cannot be drawn).
    """
    drawn = picture_writer(dense, image, view, alpha)
    if drawn is None:
        return None
    imglib.write_atomic(path, drawn[1])
    return drawn[0]


def picture_writer(dense, image, view: str = "auto", alpha: float = 0.5):
    """``(info, write(f))``: what :func:`write_picture` returns, known before any band is
    drawn, and the function that draws and writes the PNG band by band into the open file
    ``f`` (the run's writers, local or Ray, decide where the bytes go). None when the output
    cannot be drawn."""
    plan = _plan(dense, image, view)
    if plan is None:
        return None
    kind, scores, extra = plan
    height, width = image.size
    rows_per_band = imglib.rows_per_band(width * scores.shape[0], BAND_PIXELS)
    grid = dense.grid
    cols = grid.nearest(np.arange(width), 1)

    def bands() -> Iterator[np.ndarray]:
        for r0 in range(0, height, rows_per_band):
            r1 = min(height, r0 + rows_per_band)
            rows = grid.nearest(np.arange(r0, r1), 0)
            lo, hi = int(rows.min()), int(rows.max()) + 1
            part = np.array(scores[:, lo:hi, :])
            windowed.release(scores)  # a map stitched on disk: read pages leave this process
            if kind == "labels":
                labels = imglib.class_argmax(part)[(rows - lo)[:, None], cols[None, :]]
                if extra["classes"] <= 256:
                    yield labels.astype(np.uint8)
                else:
                    yield imglib.palette(extra["classes"])[labels]
            else:
                heat = _heat(part, extra)[(rows - lo)[:, None], cols[None, :]]
                colours = imglib.colormap(heat)
                grey = image.rgb[r0:r1].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
                blended = (1 - alpha) * grey[..., None] + alpha * colours.astype(np.float32)
                yield np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    palette = imglib.palette(256) if kind == "labels" and extra["classes"] <= 256 else None
    info = {"view": kind, "top_class": extra.get("top"), "classes": extra["classes"]}
    return info, lambda f: write_png(f, width, height, bands(), palette)


def _plan(dense, image, view: str):
    if view not in imglib.VIEWS:
        from onnx_dense.errors import DenseError

        raise DenseError(f"--view '{view}': use one of {', '.join(imglib.VIEWS)}")
    grid = dense.grid
    if view == "none" or grid is None or len(grid.spatial_axes) != 2:
        return None
    scores = imglib._scores(dense.numpy(), grid.spatial_axes)  # a view: (C, h', w')
    if scores is None:
        return None
    classes = scores.shape[0]
    if view == "auto":
        view = "heatmap" if dense.is_classifier or classes == 1 else "labels"
    extra: dict = {"classes": classes}
    if view == "heatmap":
        chunks = imglib.row_chunks(scores, BAND_PIXELS)
        if classes == 1:
            lo, hi = np.inf, -np.inf
            for rows in chunks:
                part = np.asarray(scores[0, rows], dtype=np.float64)
                lo, hi = min(lo, float(np.min(part))), max(hi, float(np.max(part)))
                windowed.release(scores)
            extra.update(lo=lo, hi=hi)
        else:
            # render's test "already probabilities", over the whole map, then the top class's mean
            extra["given"], extra["top"] = imglib.top_class(scores, chunks, after=lambda: windowed.release(scores))
    return view, scores, extra


def _heat(part: np.ndarray, extra: dict) -> np.ndarray:
    if extra["classes"] == 1:
        values = part[0].astype(np.float64)
        lo, hi = extra["lo"], extra["hi"]
        return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return imglib._softmax(part, extra["given"])[extra["top"]]


def write_png(f: BinaryIO, width: int, height: int, bands: Iterator[np.ndarray], palette: np.ndarray | None) -> None:
    """8-bit PNG from bands of rows: (rows, width) palette indices, or (rows, width, 3) RGB."""

    def chunk(kind: bytes, data: bytes) -> None:
        f.write(struct.pack(">I", len(data)) + kind + data)
        f.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    f.write(b"\x89PNG\r\n\x1a\n")
    colour_type = 3 if palette is not None else 2
    chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
    if palette is not None:
        chunk(b"PLTE", np.ascontiguousarray(palette, dtype=np.uint8).tobytes())
    z = zlib.compressobj(6)
    written = 0
    for band in bands:
        rows = band.reshape(band.shape[0], -1)
        data = np.zeros((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)  # filter byte 0 (none) per row
        data[:, 1:] = rows
        out = z.compress(data.tobytes())
        if out:
            chunk(b"IDAT", out)
        written += band.shape[0]
    chunk(b"IDAT", z.flush())
    chunk(b"IEND", b"")
    if written != height:
        raise RuntimeError(f"wrote {written} rows of a {height}-row picture (a bug in the banding)")
