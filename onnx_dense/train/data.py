"""Training data for ``onnx-dense train``: a folder of images and labels, an .npz, or arrays.

Formats (a problem with any of them is a one-line :class:`DenseError` naming the file):

**A folder** ``DIR``::

    DIR/images/NAME.png|.jpg|.jpeg|.bmp|.tif|.tiff|.webp   the inputs (any size; RGB or grayscale)
    DIR/labels/NAME.png                                    segmentation: one label map per image
    DIR/labels.csv                                         classification / regression

* Images are read with Pillow, converted to RGB (a 3-channel model) or grayscale (1 channel),
  scaled to [0, 1] and then normalised per channel with ``mean``/``std`` when given.
* Segmentation labels are PNGs with the same stem and the same width and height as their image;
  each pixel holds a class index (mode ``L``, ``P``, whose palette indices are the classes as in
  Pascal VOC, or ``I``/``I;16``); ``ignore_index`` (255) marks pixels that are not scored.
* ``labels.csv`` has one line per image, ``NAME,VALUE[,VALUE...]`` (NAME with or without its
  extension; a first line that does not parse is taken as a header): classification, one class
  index; regression, one or more targets in [-1, 1] (the loss compares them with a tanh).

**An .npz** with arrays ``images``, float, shape ``(N, C, *spatial)`` (used as given, then
normalised with ``mean``/``std`` when given), and ``labels``: segmentation, integer
``(N, *spatial)``; classification, integer ``(N,)``; regression, float ``(N,)`` or ``(N, D)``
in [-1, 1].

**Arrays**, from Python: ``data=(images, labels)`` with the same shapes as the .npz.

Images in one batch must share a size: with images of several sizes, use ``batch_size=1``.
This module needs numpy and Pillow only (no torch).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from onnx_dense.errors import DenseError

TASKS = ("segmentation", "classification", "regression")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FORMAT_HINT = "see 'Training and dpoa' in the README for the data format"


def check_task(task: str) -> str:
    if task not in TASKS:
        raise DenseError(f"unknown task '{task}'; use one of {', '.join(TASKS)}")
    return task


@dataclasses.dataclass
class Dataset:
    """Items are ``(image float32 (C, *spatial), label)``; images are read lazily from folders."""

    task: str
    source: str
    names: list[str]
    images: np.ndarray | None = None  # (N, C, *spatial) when held in memory
    labels: np.ndarray | None = None  # in-memory labels (npz, arrays, labels.csv)
    image_paths: list[Path] | None = None
    label_paths: list[Path] | None = None
    channels: int | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    num_classes: int | None = None
    ignore_index: int = 255
    sizes: set[tuple[int, ...]] = dataclasses.field(default_factory=set)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        if self.images is not None:
            image = np.asarray(self.images[i], dtype=np.float32)
        else:
            image = _read_image(self.image_paths[i], self.channels)
        image = self._normalise(image)
        if self.task == "segmentation":
            label = self.labels[i] if self.labels is not None else _read_label(self.label_paths[i])
            if label.shape != image.shape[1:]:
                raise DenseError(
                    f"{self._where(i)}: label map is {_fmt(label.shape)} but the image is {_fmt(image.shape[1:])}"
                )
            label = np.asarray(label, dtype=np.int64)
            self._check_classes(label, i)
            return image, label
        label = self.labels[i]
        if self.task == "classification":
            self._check_classes(np.asarray(label), i)
            return image, np.int64(label)
        return image, np.asarray(label, dtype=np.float32)

    # ----

    def _normalise(self, image: np.ndarray) -> np.ndarray:
        if self.mean is None and self.std is None:
            return image
        shape = (-1,) + (1,) * (image.ndim - 1)
        if self.mean is not None:
            image = image - self.mean.reshape(shape)
        if self.std is not None:
            image = image / self.std.reshape(shape)
        return image.astype(np.float32, copy=False)

    def _where(self, i: int) -> str:
        if self.label_paths is not None:
            return str(self.label_paths[i])
        if self.image_paths is not None:
            return str(self.image_paths[i])
        return f"{self.source}: item {i}"

    def _check_classes(self, label: np.ndarray, i: int) -> None:
        if self.num_classes is None:
            return
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if np.any(bad):
            value = int(np.asarray(label)[bad].reshape(-1)[0])
            raise DenseError(
                f"{self._where(i)}: class {value} is outside the model's {self.num_classes} classes "
                f"(0..{self.num_classes - 1}, or {self.ignore_index} to ignore a pixel)"
            )

    def check_batchable(self, batch_size: int) -> None:
        if batch_size > 1 and len(self.sizes) > 1:
            a, b = sorted(self.sizes)[:2]
            raise DenseError(
                f"{self.source}: images have different sizes ({_fmt(a)} and {_fmt(b)}); "
                "use batch size 1 or resize them to one size"
            )

    def spatial_size(self) -> tuple[int, ...] | None:
        return next(iter(self.sizes)) if len(self.sizes) == 1 else None


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def open_dataset(
    data,
    task: str,
    *,
    channels: int | None = None,
    spatial_rank: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    ignore_index: int = 255,
    outputs: int | None = None,
) -> Dataset:
    """A :class:`Dataset` for ``data``: a folder, an .npz path, ``(images, labels)`` or a Dataset.

    ``channels``/``spatial_rank``: what the model's input expects (checked). ``num_classes``:
    the model's classes (checked for segmentation and classification labels). ``outputs``:
    the model's output channels, checked against regression targets.
    """
    check_task(task)
    if isinstance(data, Dataset):
        return data
    mean_a = _vector(mean, "mean")
    std_a = _vector(std, "std")
    if std_a is not None and np.any(std_a == 0):
        raise DenseError("std: values must be non-zero")
    common = dict(mean=mean_a, std=std_a, num_classes=num_classes, ignore_index=ignore_index)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        ds = _from_arrays(np.asarray(data[0]), np.asarray(data[1]), task, "arrays", common)
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise DenseError(f"{path}: no such file or directory (expected a data folder or an .npz)")
        if path.is_dir():
            ds = _from_folder(path, task, channels, common)
        elif path.suffix.lower() == ".npz":
            ds = _from_npz(path, task, common)
        else:
            raise DenseError(f"{path}: expected a data folder or an .npz file; {FORMAT_HINT}")
    else:
        raise DenseError(f"data: expected a folder, an .npz path or (images, labels) arrays, got {type(data).__name__}")
    if len(ds) == 0:
        raise DenseError(f"{ds.source}: no training examples")
    _check_against_model(ds, channels, spatial_rank, outputs, mean_a, std_a)
    return ds


def _vector(values, what: str) -> np.ndarray | None:
    if values is None:
        return None
    try:
        array = np.asarray([float(v) for v in values], dtype=np.float32)
    except (TypeError, ValueError):
        raise DenseError(f"{what}: expected numbers, one per channel, e.g. 0.485,0.456,0.406") from None
    return array


def _check_against_model(ds: Dataset, channels, spatial_rank, outputs, mean, std) -> None:
    shape = next(iter(ds.sizes), None)
    ch = ds.channels
    if channels is not None and ch is not None and ch != channels:
        raise DenseError(f"{ds.source}: images have {ch} channel(s) but the model's input expects {channels}")
    if spatial_rank is not None and shape is not None and len(shape) != spatial_rank:
        raise DenseError(
            f"{ds.source}: images have {len(shape)} spatial axes ({_fmt(shape)}) but the model's input has {spatial_rank}"
        )
    for what, vec in (("mean", mean), ("std", std)):
        if vec is not None and ch is not None and len(vec) not in (1, ch):
            raise DenseError(f"{what}: {len(vec)} values for {ch}-channel images")
    if ds.task == "regression" and outputs is not None and ds.labels is not None:
        width = 1 if ds.labels.ndim == 1 else ds.labels.shape[1]
        if width != outputs:
            raise DenseError(f"{ds.source}: {width} regression target(s) per image but the model has {outputs} output(s)")


def _from_arrays(images: np.ndarray, labels: np.ndarray, task: str, source: str, common) -> Dataset:
    if images.ndim < 3:
        raise DenseError(f"{source}: 'images' must be (N, C, *spatial), got shape {list(images.shape)}")
    if not np.issubdtype(images.dtype, np.floating):
        raise DenseError(
            f"{source}: 'images' must be floating point (got {images.dtype}); scale integer pixels, e.g. to [0, 1]"
        )
    if not np.all(np.isfinite(images)):
        raise DenseError(f"{source}: 'images' contains NaN or infinite values")
    n = images.shape[0]
    if labels.shape[:1] != (n,):
        raise DenseError(f"{source}: {n} images but 'labels' has shape {list(labels.shape)}")
    spatial = tuple(images.shape[2:])
    if task == "segmentation":
        if not np.issubdtype(labels.dtype, np.integer):
            raise DenseError(f"{source}: segmentation 'labels' must be integer class indices (got {labels.dtype})")
        if tuple(labels.shape[1:]) != spatial:
            raise DenseError(
                f"{source}: segmentation 'labels' must be (N, {', '.join(map(str, spatial))}) like the images, "
                f"got {list(labels.shape)}"
            )
    elif task == "classification":
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DenseError(
                f"{source}: classification 'labels' must be integer class indices of shape (N,), "
                f"got {labels.dtype} {list(labels.shape)}"
            )
    else:
        if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.number):
            raise DenseError(f"{source}: regression 'labels' must be numbers of shape (N,) or (N, D), got {list(labels.shape)}")
        _check_regression_range(labels.astype(np.float32), source)
        labels = labels.astype(np.float32)
    ds = Dataset(task, source, [str(i) for i in range(n)], images=images, labels=labels, channels=images.shape[1], **common)
    ds.sizes = {spatial}
    if task != "regression":
        _check_all_classes(ds, labels)
    return ds


def _check_all_classes(ds: Dataset, labels: np.ndarray, where: Callable[[int], str] | None = None) -> None:
    """One line naming the first label outside the model's classes (``where(i)``: the file and item)."""
    if ds.num_classes is None:
        return
    bad = (labels != ds.ignore_index) & ((labels < 0) | (labels >= ds.num_classes))
    if np.any(bad):
        index = np.argwhere(bad)[0]
        value = int(labels[tuple(index)])
        item = where(int(index[0])) if where else f"{ds.source}: labels[{int(index[0])}]"
        ignore = f", or {ds.ignore_index} to ignore a pixel" if labels.ndim > 1 else ""
        raise DenseError(
            f"{item} has class {value}, outside the model's {ds.num_classes} classes (0..{ds.num_classes - 1}{ignore})"
        )


def _check_regression_range(labels: np.ndarray, source: str) -> None:
    if not np.all(np.isfinite(labels)):
        raise DenseError(f"{source}: regression targets contain NaN or infinite values")
    if labels.size and (labels.min() < -1 or labels.max() > 1):
        raise DenseError(
            f"{source}: regression targets span [{labels.min():g}, {labels.max():g}]; the loss compares them with "
            "tanh of the output, so scale them to [-1, 1] first"
        )


def _from_npz(path: Path, task: str, common) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise DenseError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None
    for key in ("images", "labels"):
        if key not in arrays:
            raise DenseError(f"{path}: no array '{key}' (found: {', '.join(sorted(arrays)) or 'none'}); {FORMAT_HINT}")
    return _from_arrays(arrays["images"], arrays["labels"], task, str(path), common)


def _from_folder(path: Path, task: str, channels: int | None, common) -> Dataset:
    image_dir = path / "images"
    if not image_dir.is_dir():
        raise DenseError(f"{path}: no 'images' folder; {FORMAT_HINT}")
    image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not image_paths:
        raise DenseError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    stems = [p.stem for p in image_paths]
    dupes = {s for s in stems if stems.count(s) > 1}
    if dupes:
        raise DenseError(f"{image_dir}: several images named '{sorted(dupes)[0]}' with different extensions")
    from PIL import Image

    sizes = set()
    modes = set()
    for p in image_paths:
        try:
            with Image.open(p) as im:
                sizes.add((im.height, im.width))
                modes.add(im.mode)
        except Exception as exc:
            raise DenseError(f"{p}: not a readable image ({str(exc).splitlines()[0][:200]})") from None
    if channels is None:
        channels = 1 if modes <= {"L", "I", "I;16", "F", "1"} else 3
    ds = Dataset(task, str(path), stems, image_paths=image_paths, channels=channels, **common)
    ds.sizes = sizes
    if task == "segmentation":
        label_dir = path / "labels"
        if not label_dir.is_dir():
            raise DenseError(f"{path}: no 'labels' folder with one label PNG per image; {FORMAT_HINT}")
        label_paths = []
        for p in image_paths:
            label = label_dir / f"{p.stem}.png"
            if not label.is_file():
                raise DenseError(f"{label}: missing label map for image {p.name}")
            try:
                with Image.open(label) as im:
                    size = (im.height, im.width)
                    mode = im.mode
            except Exception as exc:
                raise DenseError(f"{label}: not a readable PNG ({str(exc).splitlines()[0][:200]})") from None
            if mode not in ("L", "P", "I", "I;16", "1"):
                raise DenseError(f"{label}: label maps must be single-channel class indices (mode L, P or I), got mode {mode}")
            with Image.open(p) as im:
                if (im.height, im.width) != size:
                    raise DenseError(f"{label}: label map is {_fmt(size)} but image {p.name} is {im.height}x{im.width}")
            label_paths.append(label)
        ds.label_paths = label_paths
        return ds
    csv_path = path / "labels.csv"
    if not csv_path.is_file():
        raise DenseError(f"{path}: no labels.csv ('NAME,{'CLASS' if task == 'classification' else 'VALUE'}' per line); {FORMAT_HINT}")
    ds.labels = _read_csv(csv_path, stems, task)
    if task == "classification":
        _check_all_classes(ds, ds.labels, lambda i: f"{csv_path}: image {ds.names[i]}")
    return ds


def _read_csv(path: Path, stems: list[str], task: str) -> np.ndarray:
    rows: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            try:
                values = [float(v) for v in row[1:]]
                if not values:
                    raise ValueError
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise DenseError(f"{path}:{lineno}: expected 'NAME,VALUE[,VALUE...]', got '{','.join(row)[:80]}'") from None
            name = Path(row[0]).stem if Path(row[0]).suffix.lower() in IMAGE_EXTENSIONS else row[0]
            if name in rows:
                raise DenseError(f"{path}:{lineno}: '{row[0]}' is listed twice")
            if task == "classification" and (len(values) != 1 or values[0] != int(values[0])):
                raise DenseError(f"{path}:{lineno}: a classification label is one integer class index, got '{','.join(row[1:])}'")
            rows[name] = values
    missing = [s for s in stems if s not in rows]
    if missing:
        raise DenseError(f"{path}: no label for image '{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    widths = {len(rows[s]) for s in stems}
    if len(widths) > 1:
        raise DenseError(f"{path}: rows have different numbers of values ({', '.join(map(str, sorted(widths)))})")
    values = np.asarray([rows[s] for s in stems], dtype=np.float64)
    if task == "classification":
        return values[:, 0].astype(np.int64)
    values = values.astype(np.float32)
    _check_regression_range(values, str(path))
    return values[:, 0] if values.shape[1] == 1 else values


def _read_image(path: Path, channels: int | None) -> np.ndarray:
    from PIL import Image

    from onnx_dense.runtime.images import _deep_gray

    try:
        with warnings.catch_warnings():  # as onnx-dense run: no decompression-bomb warning lines
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            deep = _deep_gray(im)  # 16-bit grayscale scaled by its bit depth (was: by its largest value)
            if deep is not None:
                array = deep[None]
            else:
                im = im.convert("L" if channels == 1 else "RGB")
                array = np.asarray(im, dtype=np.float32) / 255.0
                array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    except DenseError:
        raise
    except Exception as exc:
        raise DenseError(f"{path}: not a readable image ({str(exc).splitlines()[0][:200]})") from None
    if channels is not None and array.shape[0] != channels:
        if array.shape[0] == 1:
            array = np.repeat(array, channels, axis=0)
        else:
            raise DenseError(f"{path}: image has {array.shape[0]} channels but the model's input expects {channels}")
    return np.ascontiguousarray(array)


def _read_label(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im).astype(np.int64)
    except Exception as exc:
        raise DenseError(f"{path}: not a readable label PNG ({str(exc).splitlines()[0][:200]})") from None
