"""Images in, pictures out: reading with Pillow, normalising, and drawing dense maps.

* :func:`load_image` reads a file (EXIF orientation applied), converts it to RGB or grayscale
  as the model's input wants, optionally resizes it (``size``: shorter side, or exact
  ``(height, width)``), scales pixels to [0, 1] and normalises with ``mean``/``std`` per
  channel. Every way a file can be unreadable is one :class:`DenseError` line naming it.
  Grayscale images of more than 8 bits (16-bit PNG, TIFF) are scaled by their bit depth,
  not clipped at 255. Pillow's decompression-bomb warning is not printed: an image is read up to
  twice Pillow's ``MAX_IMAGE_PIXELS`` (about 179 million pixels) and refused in one line above.
* :func:`render` turns one dense output into a PNG a person can look at, drawn at the size
  of the array the model was fed: each pixel shows the prediction whose receptive field is
  centred nearest to it (the output's :class:`PixelGrid`). Segmentation-like outputs (several
  channels, positions in the original too) become an argmax label map (a palette PNG whose
  pixel values are the class indices); classifier outputs (the original had no spatial axes)
  become the top class's probability as a heatmap over the image (drawn in grey); single-channel outputs a
  heatmap of their values.
* :func:`write_atomic` writes through a temporary file in the same folder and renames it,
  so no reader ever sees half a file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from onnx_dense.errors import DenseError
from onnx_dense.files import atomic_output
from onnx_dense.runtime import windowed

VIEWS = ("auto", "labels", "heatmap", "none")


def parse_size(text) -> int | tuple[int, int] | None:
    """None, ``512`` (shorter side) or ``'480x640'`` / ``(480, 640)`` (height x width)."""
    if text is None:
        return None
    if isinstance(text, (int, np.integer)):
        values: tuple[int, ...] = (int(text),)
    elif isinstance(text, str):
        parts = [p for p in text.lower().replace("x", ",").split(",") if p.strip()]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            values = ()
    else:
        values = tuple(int(v) for v in text)
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise DenseError(f"--size '{text}': expected N (shorter side) or HEIGHTxWIDTH such as 480x640")
    return values[0] if len(values) == 1 else (values[0], values[1])


def parse_floats(text, option: str) -> tuple[float, ...]:
    """``'0.485,0.456,0.406'`` or a number or a sequence -> a tuple of floats."""
    if isinstance(text, (int, float)):
        return (float(text),)
    if isinstance(text, str):
        try:
            values = tuple(float(p) for p in text.split(",") if p.strip())
        except ValueError:
            values = ()
    else:
        values = tuple(float(v) for v in text)
    if not values:
        raise DenseError(f"{option} '{text}': expected one number or one per channel, e.g. 0.485,0.456,0.406")
    return values


@dataclasses.dataclass
class ImageInput:
    """One image ready for a model: ``array`` (batch 1, in the model's layout) and what it came from."""

    path: str
    array: np.ndarray  # or a windowed.WindowedInput (load_image(..., windows=True))
    original_size: tuple[int, int]  # (height, width) of the file
    size: tuple[int, int]  # (height, width) fed to the model
    rgb: np.ndarray  # (height, width, 3) uint8 of what was fed, for drawing over

    @property
    def scale(self) -> tuple[float, float]:
        """Model-input pixels per file pixel, per axis: divide grid centres by it to get file pixels."""
        return (self.size[0] / self.original_size[0], self.size[1] / self.original_size[1])


def load_image(
    path: str | os.PathLike,
    *,
    size=None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    channels: int = 3,
    spatial_axes: Sequence[int] = (2, 3),
    dtype=np.float32,
    data: bytes | None = None,
    windows: bool = False,
) -> ImageInput:
    """Read ``path`` into a (1, C, H, W) array (or the layout ``spatial_axes`` says), see module doc.

    ``data``: the file's bytes, read elsewhere (a Ray worker gets them from the driver); ``path``
    then only names the image in messages and in the result. ``windows``: ``array`` is a
    :class:`windowed.WindowedInput` normalised window by window (:class:`PixelsImage`, or a
    .npy file's :class:`windowed.NpyImage`), not the float array: what a run under a memory
    budget reads, so that a schedule on tiles never holds the whole input.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    size = parse_size(size)
    if windowed.is_windowed(p):  # a .npy array, read whole here (tiled runs read it by windows)
        npy = windowed.open_image(p, size=size, mean=mean, std=std, channels=channels, spatial_axes=spatial_axes,
                                  dtype=dtype, data=data)
        if windows:
            return ImageInput(npy.path, npy, npy.original_size, npy.size, npy.rgb)
        return npy.load()
    if channels not in (1, 3):
        raise DenseError(f"the model's input has {channels} channels; images are read as RGB (3) or grayscale (1)")
    mean_v = _per_channel(parse_floats(mean, "--mean"), channels, "--mean")
    std_v = _per_channel(parse_floats(std, "--std"), channels, "--std")
    if any(s == 0 for s in std_v):
        raise DenseError("--std: a standard deviation of 0 would divide by zero")
    if data is None and not p.exists():
        raise DenseError(f"{p}: no such file")
    if data is None and p.is_dir():
        raise DenseError(f"{p}: is a directory, expected an image file")
    try:
        with warnings.catch_warnings():
            # up to twice Pillow's MAX_IMAGE_PIXELS an image is read without its two-line warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p if data is None else io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                original = (img.height, img.width)
                deep = _deep_gray(img)
                rgb = None if deep is not None else img if img.mode == "RGB" else img.convert("RGB")
    except UnidentifiedImageError:
        raise DenseError(f"{p}: not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise DenseError(
            f"{p}: too many pixels to read safely ({_first_line(exc)}); shrink the image or cut it into parts first"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DenseError(f"{p}: cannot be decoded ({_first_line(exc)})") from None
    del img  # only rgb (or deep) is needed now: each copy of the decoded image is 3 bytes a pixel
    if original[0] < 1 or original[1] < 1:
        raise DenseError(f"{p}: the image is empty")
    target = _target_size(original, size)
    if deep is not None:  # 16-bit (or float) grayscale, already scaled to [0, 1] by its bit depth
        if target != original:
            deep = np.asarray(Image.fromarray(deep, mode="F").resize((target[1], target[0]), Image.Resampling.BILINEAR))
        pixels, scale = deep[..., None], None
        rgb_array = np.repeat((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8), 3, axis=2)
    else:
        if target != original:
            rgb = rgb.resize((target[1], target[0]), Image.Resampling.BILINEAR)
        rgb_array = np.asarray(rgb, dtype=np.uint8)
        pixels = np.asarray(rgb.convert("L"), dtype=np.uint8)[..., None] if channels == 1 else rgb_array
        scale = 255.0
        del rgb
    if windows:
        _fed_shape(1, 1, channels, tuple(spatial_axes))  # the layout's one line now, not at the first window
        array = PixelsImage(pixels, scale, mean_v, std_v, channels, tuple(spatial_axes), np.dtype(dtype))
    else:
        array = normalised(pixels, scale, mean_v, std_v, channels, tuple(spatial_axes), dtype)
    return ImageInput(str(p), array, original, target, rgb_array)


BAND_VALUES = 2**20  # values of the image a band of rows of :func:`normalised` holds in float32


def normalised(pixels: np.ndarray, scale: float | None, mean, std, channels: int, spatial_axes: tuple[int, ...],
               dtype, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 1 or C) pixels -> the model's input (batch 1, its layout, ``dtype``): divided by
    ``scale`` (None: already in [0, 1]), minus ``mean``, over ``std`` per channel, in float32,
    a band of rows at a time into the one array returned. Why bands: the whole formula held the
    image in float32 up to four times (its temporaries, the layout's copy): reading an 8000x8000
    PNG (a 732 MiB input) peaked at 2,989 MiB. Same values, bit for bit (the same float32
    operations, element by element). ``out``: the array to write into (of the input's shape and
    ``dtype``), instead of a new one."""
    height, width = pixels.shape[:2]
    shape = _fed_shape(height, width, channels, spatial_axes)
    array = np.empty(shape, dtype) if out is None else out
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise ValueError(f"normalised: out is {array.dtype} {array.shape}, the window {np.dtype(dtype)} {shape}")
    mean32 = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
    std32 = np.broadcast_to(np.asarray(std, np.float32), (channels,))
    if spatial_axes == (2, 3):  # a channel's rows at a time: contiguous writes, not a scatter through a transpose
        rows = rows_per_band(width, BAND_VALUES)
        for r0 in range(0, height, rows):
            for c in range(channels):
                band = pixels[r0:r0 + rows, :, c if pixels.shape[2] == channels else 0].astype(np.float32)
                if scale is not None:
                    band /= scale
                band -= mean32[c]
                band /= std32[c]
                array[0, c, r0:r0 + rows] = band
        return array
    hwc = array[0]
    rows = rows_per_band(width * channels, BAND_VALUES)
    for r0 in range(0, height, rows):
        band = pixels[r0:r0 + rows].astype(np.float32)
        if band.shape[2] != channels:  # one grey channel fed to an RGB model
            band = np.repeat(band, channels, axis=2)
        if scale is not None:
            band /= scale
        band -= mean32
        band /= std32
        hwc[r0:r0 + rows] = band
    return array


def _fed_shape(height: int, width: int, channels: int, spatial_axes: tuple[int, ...]) -> tuple[int, ...]:
    if tuple(spatial_axes) == (2, 3):
        return (1, channels, height, width)
    if tuple(spatial_axes) == (1, 2):
        return (1, height, width, channels)
    raise DenseError(f"the model's input has spatial axes {list(spatial_axes)}; images fit (2, 3) (NCHW) or "
                     "(1, 2) (NHWC)")


@dataclasses.dataclass(eq=False)
class PixelsImage(windowed.WindowedInput):
    """The model's input of a decoded image, normalised window by window (``load_image(...,
    windows=True)``): it holds only the pixels (uint8 RGB, shared with the picture's background,
    or grey), and a window's values are :func:`normalised`'s of those pixels, bit for bit."""

    pixels: np.ndarray  # (H, W, 1 or C)
    scale: float | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    spatial_axes: tuple[int, int]
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return _fed_shape(self.pixels.shape[0], self.pixels.shape[1], self.channels, self.spatial_axes)

    def window(self, index, out: np.ndarray | None = None) -> np.ndarray:
        rows, cols = index[self.spatial_axes[0]], index[self.spatial_axes[1]]
        return normalised(self.pixels[rows, cols], self.scale, self.mean, self.std, self.channels,
                          self.spatial_axes, self.dtype, out)


def _deep_gray(img) -> np.ndarray | None:
    """A grayscale image of more than 8 bits as float32 in [0, 1], scaled by its bit depth; None otherwise.

    Pillow's convert("RGB") clips such images at 255 instead of scaling them (a 16-bit PNG came
    out 99.6% white). Modes "I;16*" are 16-bit; "I" (32-bit integers, what older Pillow gives a
    16-bit PNG) is taken as 16-bit when its values fit, else as 32-bit; "F" is used as it is.
    48-bit RGB PNGs are already read as 8-bit RGB, correctly scaled.
    """
    if img.mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.size == 0 or values.max() <= 65535 else 2.0**31 - 1
        return (values / top).astype(np.float32)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    return None


def _per_channel(values: tuple[float, ...], channels: int, option: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise DenseError(f"{option}: {len(values)} values for a model with {channels} input channels")
    return values


def _target_size(original: tuple[int, int], size) -> tuple[int, int]:
    if size is None:
        return original
    if isinstance(size, tuple):
        return size
    h, w = original
    short = min(h, w)
    return (max(1, round(h * size / short)), max(1, round(w * size / short)))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rendering:
    image: object  # PIL.Image.Image (None: a heatmap not drawn, see render)
    view: str  # "labels" or "heatmap"
    top_class: int | None = None  # heatmap of a classifier: the class drawn
    classes: int = 1


def render(dense, image: ImageInput, view: str = "auto", alpha: float = 0.5,
           draw_heatmap: bool = True) -> Rendering | None:
    """The PNG of one DenseMap over ``image`` (None when the output cannot be drawn in 2-D).

    ``draw_heatmap=False``: a heatmap's view and class only (``picture`` None), for callers that
    draw it another way (``onnx-dense run`` draws it with matplotlib).
    """
    from PIL import Image

    if view not in VIEWS:
        raise DenseError(f"--view '{view}': use one of {', '.join(VIEWS)}")
    grid = dense.grid
    if view == "none" or grid is None or len(grid.spatial_axes) != 2:
        return None
    value = dense.numpy()
    scores = _scores(value, grid.spatial_axes)  # (C, h', w') of the first image in the batch
    if scores is None:
        return None
    classes = scores.shape[0]
    if view == "auto":
        view = "heatmap" if dense.is_classifier or classes == 1 else "labels"
    rows = grid.nearest(np.arange(image.size[0]), 0)
    cols = grid.nearest(np.arange(image.size[1]), 1)
    if view == "labels":
        labels = class_argmax(scores)[rows[:, None], cols[None, :]]
        if classes <= 256:
            picture = Image.fromarray(labels.astype(np.uint8), mode="P")
            picture.putpalette(palette(256).reshape(-1).tolist())
        else:
            picture = Image.fromarray(palette(classes)[labels], mode="RGB")
        return Rendering(picture, "labels", None, classes)
    top = None
    if classes == 1:
        values = scores[0].astype(np.float64)
        lo, hi = float(np.min(values)), float(np.max(values))
        heat = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    else:
        top, heat = top_class_heat(scores)
    if not draw_heatmap:
        return Rendering(None, "heatmap", top, classes)
    heat = heat[rows[:, None], cols[None, :]]
    colours = colormap(heat)
    grey = image.rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # keeps the heat readable
    blended = (1 - alpha) * grey[..., None] + alpha * colours.astype(np.float32)
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")
    return Rendering(picture, "heatmap", top, classes)


ARGMAX_CHUNK = 1 << 22  # scores per chunk of rows: numpy's argmax over the first axis copies what it reads


def class_argmax(scores: np.ndarray) -> np.ndarray:
    """``np.argmax(scores, axis=0)`` of (C, h, w) scores, a chunk of rows at a time: over any
    axis but the last, numpy copies the whole array with that axis moved last (+352 MiB for
    21 classes at 2048x2048, the largest part of ``onnx-dense run``'s peak under a budget)."""
    if scores.ndim < 2:
        return np.argmax(scores, axis=0)
    out = np.empty(scores.shape[1:], np.intp)
    for rows in row_chunks(scores):
        out[rows] = np.argmax(scores[:, rows], axis=0)
    return out


def top_class_heat(scores: np.ndarray) -> tuple[int, np.ndarray]:
    """(the class whose probability is highest on average, its probability map) of (C, h, w)
    scores (:func:`top_class`), a chunk of rows at a time: the whole map's probabilities in
    float64 are twice the scores, times the copies softmax makes."""
    chunks = row_chunks(scores)
    given, top = top_class(scores, chunks)
    heat = np.empty(scores.shape[1:], np.float64)
    for rows in chunks:
        heat[rows] = _softmax(scores[:, rows], given)[top]
    return top, heat


def top_class(scores: np.ndarray, chunks: Sequence[slice], after: Callable[[], None] = lambda: None) -> tuple[bool, int]:
    """(whether the (C, h, w) scores already are probabilities: in [0, 1] and summing to 1
    everywhere; the class whose probability, a softmax over the classes otherwise, is highest
    on average), read ``chunks`` (slices of rows) at a time; ``after()`` runs after each chunk
    is read (a map on disk gives its pages back there)."""
    lo, hi, sums = np.inf, -np.inf, True
    for rows in chunks:
        part = np.asarray(scores[:, rows], dtype=np.float64)
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        sums = sums and bool(np.allclose(part.sum(axis=0), 1, atol=1e-3))
        after()
    given = lo >= 0 and hi <= 1 and sums
    classes = scores.shape[0]
    total = np.zeros(classes, dtype=np.float64)
    for rows in chunks:
        total += _softmax(np.asarray(scores[:, rows]), given).reshape(classes, -1).sum(axis=1)
        after()
    return given, int(np.argmax(total / max(1, int(np.prod(scores.shape[1:])))))


def rows_per_band(row_values: int, values: int) -> int:
    """Rows of a band of about ``values`` values, ``row_values`` to a row (at least one)."""
    return max(1, values // max(1, row_values))


def row_chunks(scores: np.ndarray, values: int | None = None) -> list[slice]:
    """Slices of rows (axis 1) of (C, h, ...) scores, about ``values`` scores each (default
    :data:`ARGMAX_CHUNK`)."""
    row_values = scores.shape[0] * int(np.prod(scores.shape[2:]))
    step = rows_per_band(row_values, ARGMAX_CHUNK if values is None else values)
    return [slice(r, r + step) for r in range(0, scores.shape[1], step)]


def _softmax(part: np.ndarray, given: bool) -> np.ndarray:
    """Probabilities over the first axis, in float64 (``given``: the scores already are)."""
    s = part.astype(np.float64)
    if given:
        return s
    s = s - s.max(axis=0, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=0, keepdims=True)


def _scores(value: np.ndarray, spatial_axes: Sequence[int]) -> np.ndarray | None:
    """(C, *spatial) from the first batch item; axes other than batch and spatial are channels."""
    if value.ndim < 3:
        return None
    first = value[0]
    spatial = [a - 1 for a in spatial_axes]
    others = [a for a in range(first.ndim) if a not in spatial]
    if len(others) > 1:
        return None
    moved = np.moveaxis(first, [*others, *spatial], list(range(first.ndim)))
    return moved if others else moved[None]


def palette(n: int) -> np.ndarray:
    """The Pascal VOC colour map: (n, 3) uint8, class 0 black, then well separated colours."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


_ANCHORS = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 along an inferno-like ramp (dark = low, yellow = high)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_ANCHORS) - 1)
    t = (v - lo)[..., None]
    return np.rint(_ANCHORS[lo] * (1 - t) + _ANCHORS[hi] * t).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, write: Callable[[object], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it into place."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_npy(path, array: np.ndarray) -> None:
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def save_png(path, picture) -> None:
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def save_text(path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
