"""Huge images in bounded memory: inputs read window by window, tiled outputs stitched on disk.

A tiled run (``--tile``) of an image file decodes the whole image as float32 and stitches every
output in memory: a 100k x 100k RGB image is 120 GB of float32 before any output. Here
neither is held:

* **Input by windows.** A ``.npy`` image (:class:`NpyImage`) is opened with
  ``np.load(mmap_mode="r")`` and each tile reads only its own window, converted to float32 and
  normalised (``--mean``/``--std``) as :func:`images.load_image` converts a whole image, value
  for value. Accepted arrays: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C 1 or 3 (a
  trailing axis of 1 or 3 is taken as channels first); uint8 is scaled by 1/255, uint16 by
  1/65535, float is taken as already in [0, 1] (Pillow's conventions for 8-bit, 16-bit and
  float images). ``--size`` needs the whole image and is refused for a windowed input. Without
  ``--tile`` a .npy image is read whole, as any image file is.
* **Outputs on disk.** :class:`DiskOutputs` gives the :class:`tiling.Stitcher` (and, under a
  budget, a final upsampling run in bands: ``final_tail.run_in_bands``) ``.npy`` files
  opened with ``np.lib.format.open_memmap`` under temporary names in the output folder; the
  finished file is renamed into place (:class:`Move`: atomic, as every other write), and the
  picture is drawn band by band from the mapping (:mod:`picture_stream`).
* **Pages given back.** Pages of a file mapping that a process touched count in its resident
  memory until unmapped; :func:`release` drops them (``madvise(MADV_DONTNEED)``: for a shared
  file mapping the data stays in the file and the page cache, writes included), so the
  driver's resident memory stays at about one tile's and one picture band's worth.

Only ``.npy`` is windowed; other files are read whole. Pillow is no way to read windows:
``Image.crop`` of a 512x512 window of a lazily opened, uncompressed 6000x6000 TIFF loads the
whole image (measured: peak RSS +147 MB for 108 MB of pixels, Pillow 13.0.0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from onnx_dense.errors import DenseError

SUFFIXES = (".npy",)


def is_windowed(path) -> bool:
    """Whether ``path`` is an image read window by window (a ``.npy`` array)."""
    return Path(path).suffix.lower() in SUFFIXES


def release(array) -> None:
    """Give back the resident pages of the file mapping behind ``array`` (a no-op for other arrays)."""
    base = array
    for _ in range(16):
        if base is None or isinstance(base, mmap.mmap):
            break
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(ValueError, OSError):  # a closed mapping: nothing resident
            base.madvise(mmap.MADV_DONTNEED)


# --------------------------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------------------------


class WindowedInput:
    """An image input computed window by window from what it was read from.

    ``x[index]`` (slices of the fed array's axes, steps of 1) computes only that window, and
    ``np.asarray(x)`` the whole input. :class:`~onnx_dense.runtime.dense_session.DenseSession`
    keeps such an input unread where its schedule reads the image by tiles (the tiled trunk,
    phases on tiles, tiles), so under a budget the float input never exists whole: an
    8000x8000 RGB image is 192 MB of pixels and 768 MB as the float32 input. Subclasses give
    ``shape``, ``dtype``, ``spatial_axes`` and ``window(index, out)`` (``out``: an array of the
    window's shape to write into)."""

    ndim = 4

    @property
    def nbytes(self) -> int:
        """Bytes of the whole input, as a schedule that reads it whole makes it."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, index, out: np.ndarray | None = None) -> np.ndarray:
        """``x[index]``, written into ``out`` where given (its shape must be the window's)."""
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        if len(index) != self.ndim or any(not isinstance(s, slice) or s.step not in (None, 1) for s in index):
            raise TypeError(f"an image read by windows takes {self.ndim} slices of step 1, not {index!r}")
        window = tuple(index[a] if a in self.spatial_axes else slice(None) for a in range(self.ndim))
        rest = tuple(slice(None) if a in self.spatial_axes else index[a] for a in range(self.ndim))
        if all(s == slice(None) for s in rest):
            return self.window(window, out)
        part = self.window(window)[rest]  # a batch or channel slice: of the window's whole channels
        if out is None:
            return part
        out[...] = part
        return out

    def __getitem__(self, index) -> np.ndarray:
        return self.read(index)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.window((slice(None),) * self.ndim)
        return whole if dtype is None else whole.astype(dtype, copy=False)


@dataclasses.dataclass
class NpyImage(WindowedInput):
    """A .npy image, read by windows; duck-types :class:`images.ImageInput` for the writers.

    ``shape`` is the shape of the array fed to the model (batch 1, the model's layout);
    ``window(index)`` the fed array's ``[index]``; ``rgb`` the uint8 picture background (rows
    read on demand when the picture is drawn band by band).
    """

    path: str
    height: int
    width: int
    layout: str  # "hw", "hwc" or "chw" (of the file)
    file_dtype: np.dtype
    mean: np.ndarray
    std: np.ndarray
    channels: int  # the model's
    spatial_axes: tuple[int, int]
    dtype: np.dtype  # the model's input
    data: np.ndarray | None = None  # the array, when given in memory instead of by path
    batch: bool = False  # the file's array has a leading axis of 1 (a model input saved as is)

    @property
    def original_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    size = original_size

    @property
    def scale(self) -> tuple[float, float]:
        return (1.0, 1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = [1, 0, 0, 0]
        channel_axis = next(a for a in (1, 2, 3) if a not in self.spatial_axes)
        shape[channel_axis] = self.channels
        shape[self.spatial_axes[0]], shape[self.spatial_axes[1]] = self.height, self.width
        return tuple(shape)

    def window(self, index: Sequence[slice], out: np.ndarray | None = None) -> np.ndarray:
        """``whole_input[index]`` (an index of the fed array's shape), computed from its window only."""
        rows, cols = index[self.spatial_axes[0]], index[self.spatial_axes[1]]
        from onnx_dense.runtime.images import normalised

        # batch and channel axes are whole in a tile's index (tiling.plan_tiles)
        return normalised(self._pixels(rows, cols), None, self.mean, self.std, self.channels,
                          tuple(self.spatial_axes), self.dtype, out)

    def rgb_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the picture background, (rows, W, 3) uint8, as load_image makes it."""
        raw = self._raw(slice(r0, r1), slice(None))
        if raw.dtype == np.uint8:
            return raw if raw.shape[2] == 3 else np.repeat(raw, 3, axis=2)
        deep = self._deep(raw)
        rgb = (np.clip(deep, 0, 1) * 255 + 0.5).astype(np.uint8)
        return rgb if rgb.shape[2] == 3 else np.repeat(rgb, 3, axis=2)

    @property
    def rgb(self):
        from onnx_dense.runtime.batch import STREAM_PICTURES_ABOVE

        if self.height * self.width > STREAM_PICTURES_ABOVE:  # drawn band by band: read rows as needed
            return _Rows(self)
        return self.rgb_rows(0, self.height)

    def load(self):
        """The whole image as an :class:`images.ImageInput` (an untiled run)."""
        from onnx_dense.runtime.images import ImageInput

        whole = tuple(slice(None) for _ in range(4))
        return ImageInput(self.path, self.window(whole), self.original_size, self.size, self.rgb_rows(0, self.height))

    # -- reading ----------------------------------------------------------------------------

    def _raw(self, rows: slice, cols: slice) -> np.ndarray:
        """(h, w, C) of the file's values (a copy), without reading the rest of the file."""
        array = self.data if self.data is not None else _open(self.path)
        try:
            if self.batch:
                array = array[0]
            if self.layout == "hw":
                part = np.array(array[rows, cols])[..., None]
            elif self.layout == "hwc":
                part = np.array(array[rows, cols, :])
            else:
                part = np.array(array[:, rows, cols]).transpose(1, 2, 0)
        finally:
            if self.data is None:
                release(array)
                del array
        return np.ascontiguousarray(part)

    def _deep(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype == np.uint16:
            return raw.astype(np.float32) / 65535.0
        return raw.astype(np.float32)

    def _pixels(self, rows: slice, cols: slice) -> np.ndarray:
        """(h, w, channels) float32 in [0, 1] as load_image computes them, before mean and std."""
        raw = self._raw(rows, cols)
        if raw.dtype == np.uint8:
            rgb = raw if raw.shape[2] == 3 else np.repeat(raw, 3, axis=2)  # Pillow's L -> RGB
            if self.channels == 1:
                from PIL import Image

                return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.float32)[..., None] / 255.0
            return rgb.astype(np.float32) / 255.0
        deep = self._deep(raw)
        if deep.shape[2] == 1 and self.channels == 3:
            return np.repeat(deep, 3, axis=2)
        return deep


class _Rows:
    """``image.rgb[r0:r1]`` for a windowed image: rows read from the file when drawn."""

    def __init__(self, image: NpyImage) -> None:
        self.image = image
        self.shape = (image.height, image.width, 3)

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a windowed image's rgb is read by row ranges (rgb[r0:r1])")
        r0, r1, _ = key.indices(self.image.height)
        return self.image.rgb_rows(r0, r1)


def _open(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def open_image(path, *, size=None, mean=(0.0,), std=(1.0,), channels: int = 3, spatial_axes=(2, 3),
               dtype=np.float32, data: bytes | None = None) -> NpyImage:
    """A .npy image ready to be read by windows; one DenseError line for anything it cannot be."""
    import io

    from onnx_dense.runtime.images import _per_channel, parse_floats

    p = Path(path)
    if size is not None:
        raise DenseError(f"{p}: --size needs the whole image decoded; a .npy image is fed at its own size "
                         "(resize the array first, or leave --size out)")
    if channels not in (1, 3):
        raise DenseError(f"the model's input has {channels} channels; images are read as RGB (3) or grayscale (1)")
    mean_v = _per_channel(parse_floats(mean, "--mean"), channels, "--mean")
    std_v = _per_channel(parse_floats(std, "--std"), channels, "--std")
    if any(s == 0 for s in std_v):
        raise DenseError("--std: a standard deviation of 0 would divide by zero")
    if tuple(spatial_axes) not in ((2, 3), (1, 2)):
        raise DenseError(f"the model's input has spatial axes {list(spatial_axes)}; images fit (2, 3) (NCHW) or (1, 2) (NHWC)")
    array = None
    try:
        if data is not None:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            header = array
        else:
            if not p.exists():
                raise DenseError(f"{p}: no such file")
            if p.is_dir():
                raise DenseError(f"{p}: is a directory, expected an image file")
            header = _open(str(p))
    except DenseError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DenseError(f"{p}: not a .npy array numpy can read ({text})") from None
    shape, kind = tuple(header.shape), header.dtype
    del header
    if kind != np.uint8 and kind != np.uint16 and kind.kind != "f":
        raise DenseError(f"{p}: a .npy image of {kind} values; give uint8 (0-255), uint16 (0-65535) or float (0-1)")
    batch = len(shape) == 4 and shape[0] == 1  # (1, C, H, W) or (1, H, W, C): a model's input saved as is
    if batch:
        shape = shape[1:]
    if len(shape) == 2:
        layout, file_channels = "hw", 1
    elif len(shape) == 3 and shape[2] in (1, 3):
        layout, file_channels = "hwc", shape[2]
    elif len(shape) == 3 and shape[0] in (1, 3):
        layout, file_channels = "chw", shape[0]
    else:
        raise DenseError(f"{p}: a .npy image of shape {(1,) * batch + shape}; give (H, W), (H, W, C) or (C, H, W) "
                         "with C 1 or 3 (or one of those with a leading axis of 1)")
    height, width = (shape[1], shape[2]) if layout == "chw" else (shape[0], shape[1])
    if height < 1 or width < 1:
        raise DenseError(f"{p}: the image is empty")
    if kind != np.uint8 and file_channels == 3 and channels == 1:
        raise DenseError(f"{p}: a 3-channel {kind} .npy image for a model with 1 input channel; give one channel")
    return NpyImage(str(p), int(height), int(width), layout, kind, np.asarray(mean_v, np.float32),
                    np.asarray(std_v, np.float32), channels, tuple(spatial_axes), np.dtype(dtype), array, batch)


def signature(path) -> tuple[int, int]:
    """(size, mtime in ns) of a file: a worker on another machine checks that it reads the same file."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


class DiskOutputs:
    """Temporary .npy files in ``folder`` for one image's stitched outputs (``allocate`` is the
    Stitcher's); :meth:`discard` removes those not moved into place."""

    def __init__(self, folder, stem: str) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.paths: list[str] = []

    def allocate(self, name: str, shape, dtype) -> np.ndarray:
        from onnx_dense.files import _umask
        from onnx_dense.runtime.batch import _safe

        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.stem}.{_safe(name)}.npy.", suffix=".tmp", dir=self.folder)
            os.close(fd)
            self.paths.append(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        except OSError as exc:
            raise DenseError(f"{self.folder}: could not write the stitched output '{name}' "
                             f"({exc.strerror or exc})") from None

    def discard(self) -> None:
        for tmp in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.paths = []


class Move:
    """The writer of a stitched output that already is its .npy file on disk: moved, not copied.

    Called with an open file (a writer that only knows ``write(f)``), it copies the bytes.
    """

    def __init__(self, array: np.memmap) -> None:
        self.array = array
        self.source = str(array.filename)

    def into(self, target) -> None:
        from onnx_dense.files import refuse_link

        self.array.flush()
        refuse_link(target, "maps")
        try:
            os.replace(self.source, target)
        except OSError as exc:
            raise DenseError(f"{target}: could not write the file ({exc.strerror or exc})") from None

    def __call__(self, f) -> None:
        import shutil

        self.array.flush()
        with open(self.source, "rb") as src:
            shutil.copyfileobj(src, f, 16 << 20)


def disk_file(value) -> Move | None:
    """A :class:`Move` when ``value`` is a whole .npy file mapped in memory (what DiskOutputs made)."""
    if isinstance(value, np.memmap) and getattr(value, "filename", None) and value.offset == _header_size(value):
        return Move(value)
    return None


def _header_size(value: np.memmap) -> int:
    with open(value.filename, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
        return f.tell()


def write(target, writer) -> None:
    """Write one result file: move a stitched .npy into place, or write through a temporary file."""
    if isinstance(writer, Move):
        writer.into(target)
    else:
        from onnx_dense.runtime.images import write_atomic

        write_atomic(target, writer)
