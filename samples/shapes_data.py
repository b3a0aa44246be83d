"""Generated image data sets for the paper's experiments (numpy only, deterministic from a seed).

No data set can be downloaded on the machines this project runs on, so the experiments in
:mod:`samples.experiments` draw their own: objects of a few classes on cluttered backgrounds.

Object classes (:data:`CLASSES`; index 0 is the background in label maps):

    1 circle    2 square    3 triangle    4 cross

Each object has a random centre, radius ``r`` (the radius of the circle the shape is drawn
in: a circle's radius, a square's half-diagonal... see :func:`shape_mask`), rotation,
colour and style (filled, or outlined with a 2-4 pixel border).

Backgrounds: a smooth colour gradient, blurred colour noise, 2-5 soft Gaussian blobs,
1-4 random lines (1-2 px), then pixel noise over everything. Objects are drawn above the
clutter (lines and blobs are background in the labels); the object colour is redrawn until
it differs from the local background by a margin, so every object is visible.

Two sets:

* :func:`segmentation_set`: 1 to ``max_objects`` objects per image (later ones on top),
  ``labels`` a per-pixel class map (N, H, W), int64, 0 = background.
* :func:`object_set`: exactly one object per image, with its ``classes`` (N,) in 0..3
  (``CLASSES[1:]``), ``radius`` (N,) in pixels (the regression target), ``boxes`` (N, 4)
  ``x0, y0, x1, y1`` of the drawn pixels (x1/y1 exclusive) and the object ``masks``.

Images are float32 (N, 3, H, W) in [0, 1]. The same ``(n, size, seed, ...)`` always gives the
same arrays; item ``i`` depends only on ``(seed, i)``, so a set of 100 is the first 100 items
of a set of 1000, and ``start=`` draws any slice (to generate a set in parallel chunks).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "CLASSES",
    "OBJECT_CLASSES",
    "SOURCE_CLASSES",
    "draw_object_image",
    "object_set",
    "segmentation_set",
    "shape_mask",
]

CLASSES = ("background", "circle", "square", "triangle", "cross")
OBJECT_CLASSES = CLASSES[1:]
# Other shapes, never in the default sets: a source task to pretrain on before fine-tuning on
# OBJECT_CLASSES (the paper's ImageNet or face-identity pretraining, :mod:`samples.cls_reg_paper`).
SOURCE_CLASSES = ("ellipse", "hexagon", "bar", "semicircle")

_MIN_CONTRAST = 0.35  # minimum RGB distance between an object's colour and the background under it


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


def _gauge(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A function that is <= r exactly inside the shape of radius r (all are degree-1 homogeneous)."""
    if kind == "circle":
        return np.hypot(u, v)
    if kind == "square":  # half-side 0.75 r (half-diagonal 1.06 r)
        return np.maximum(np.abs(u), np.abs(v)) / 0.75
    if kind == "triangle":  # equilateral, circumradius r: the three edges at distance r/2
        d = np.full(u.shape, -np.inf)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            d = np.maximum(d, u * math.cos(a) + v * math.sin(a))
        return 2 * d
    if kind == "cross":  # arms of half-length r and half-width 0.32 r
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au, av / 0.32), np.maximum(au / 0.32, av))
    if kind == "ellipse":  # semi-axes r and 0.5 r
        return np.hypot(u, v / 0.5)
    if kind == "hexagon":  # regular, circumradius r
        d = np.full(u.shape, -np.inf)
        for k in range(6):
            a = math.pi * k / 3
            d = np.maximum(d, u * math.cos(a) + v * math.sin(a))
        return d / math.cos(math.pi / 6)
    if kind == "bar":  # a rectangle of half-length r and half-width 0.3 r
        return np.maximum(np.abs(u), np.abs(v) / 0.3)
    if kind == "semicircle":  # the half disc v >= 0 of radius r
        return np.where(v >= 0, np.hypot(u, v), np.inf)
    raise ValueError(f"unknown shape {kind!r}; known: {', '.join(OBJECT_CLASSES + SOURCE_CLASSES)}")


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        m = out.copy()
        m[1:, :] &= out[:-1, :]
        m[:-1, :] &= out[1:, :]
        m[:, 1:] &= out[:, :-1]
        m[:, :-1] &= out[:, 1:]
        m[0, :] = m[-1, :] = False
        m[:, 0] = m[:, -1] = False
        out = m
    return out


def shape_mask(
    kind: str, size: int | tuple[int, int], cx: float, cy: float, r: float, angle: float = 0.0, outline: int = 0
) -> np.ndarray:
    """Boolean (H, W) mask of a shape of radius ``r`` centred at pixel ``(cx, cy)``.

    ``angle`` in radians; ``outline`` > 0 keeps only a border of that many pixels (the filled
    shape minus its erosion).
    """
    h, w = (size, size) if isinstance(size, int) else size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = x - cx, y - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    mask = _gauge(kind, u, v) <= r
    if outline > 0:
        pad = np.pad(mask, 1)
        inner = _erode(pad, outline)[1:-1, 1:-1]
        mask = mask & ~inner
    return mask


# --------------------------------------------------------------------------------------------
# backgrounds
# --------------------------------------------------------------------------------------------


def _blur(a: np.ndarray, k: int) -> np.ndarray:
    """Box blur of (C, H, W) along both spatial axes, ``k`` taps, edge-padded."""
    if k <= 1:
        return a
    p = k // 2
    for axis in (1, 2):
        widths = [(0, 0)] * 3
        widths[axis] = (p + 1, k - 1 - p)
        c = np.cumsum(np.pad(a, widths, mode="edge"), axis=axis)
        n = a.shape[axis]
        a = (np.take(c, np.arange(k, k + n), axis=axis) - np.take(c, np.arange(0, n), axis=axis)) / k
    return a


def _line(img: np.ndarray, rng: np.random.Generator, colour: np.ndarray, width: int) -> None:
    _, h, w = img.shape
    x0, x1 = rng.uniform(-0.2 * w, 1.2 * w, 2)
    y0, y1 = rng.uniform(-0.2 * h, 1.2 * h, 2)
    n = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 2
    t = np.linspace(0.0, 1.0, n)
    xs = np.round(x0 + t * (x1 - x0)).astype(int)
    ys = np.round(y0 + t * (y1 - y0)).astype(int)
    for oy in range(width):
        for ox in range(width):
            yy, xx = ys + oy, xs + ox
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            img[:, yy[ok], xx[ok]] = colour[:, None]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.empty((3, h, w), np.float64)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b = rng.uniform(0.15, 0.85, 3), rng.uniform(-0.4, 0.4, (2, 3))
    for c in range(3):
        img[c] = a[c] + b[0, c] * (x - 0.5) + b[1, c] * (y - 0.5)
    img += 0.8 * _blur(rng.normal(0, 0.25, (3, h, w)), max(3, h // 8))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(2, 6)):  # soft blobs
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.04, 0.15) * max(h, w)
        alpha = rng.uniform(0.4, 0.9) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        colour = rng.uniform(0, 1, 3)
        img = img * (1 - alpha) + colour[:, None, None] * alpha
    for _ in range(rng.integers(1, 5)):  # lines
        _line(img, rng, rng.uniform(0, 1, 3), int(rng.integers(1, 3)))
    return img


# --------------------------------------------------------------------------------------------
# objects
# --------------------------------------------------------------------------------------------


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    colour = rng.uniform(0, 1, 3)
    for _ in range(50):
        if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
            break
        colour = rng.uniform(0, 1, 3)
    else:  # pragma: no cover - practically unreachable
        colour = np.where(under > 0.5, 0.0, 1.0)
    return colour


def draw_object_image(
    rng: np.random.Generator,
    size: int,
    objects: list[dict],
    kinds: tuple[str, ...] = OBJECT_CLASSES,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Draw ``objects`` (dicts with kind, cx, cy, r, angle, outline) over a cluttered background.

    Returns (image float32 (3, H, W) in [0, 1], label map (H, W) int64: 1 + the kind's index in
    ``kinds``, the visible mask of each object). Colours and the background come from ``rng``.
    """
    img = _background(rng, size, size)
    label = np.zeros((size, size), np.int64)
    masks = []
    for obj in objects:
        m = shape_mask(obj["kind"], size, obj["cx"], obj["cy"], obj["r"], obj["angle"], obj["outline"])
        under = img[:, m].mean(axis=1) if m.any() else img.mean(axis=(1, 2))
        colour = _object_colour(rng, under)
        ys, xs = np.nonzero(m)
        shade = 1.0 + rng.uniform(-0.3, 0.3) * (xs - size / 2) / size  # a slight left-right gradient
        img[:, ys, xs] = np.clip(colour[:, None] * shade[None, :], 0, 1)
        label[m] = kinds.index(obj["kind"]) + 1
        for prev in masks:
            prev &= ~m
        masks.append(m.copy())
    img += rng.normal(0, 0.04, img.shape)
    return np.clip(img, 0, 1).astype(np.float32), label, masks


def _random_object(rng: np.random.Generator, size: int, r_range: tuple[float, float], kind: str | None = None,
                   centre_jitter: float | None = None) -> dict:
    kind = kind or OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
    r = float(rng.uniform(*r_range))
    if centre_jitter is None:  # anywhere, with at least 90% of its radius inside the image
        margin = r * 0.9
        cx, cy = rng.uniform(margin, size - 1 - margin, 2)
    else:  # "aligned": the image centre, off by up to centre_jitter px on each axis
        # the same draw whatever the jitter: sets that differ only in centre_jitter hold the same
        # objects (kind, radius, rotation, style) on the same backgrounds, only moved
        cx, cy = (size - 1) / 2 + centre_jitter * rng.uniform(-1.0, 1.0, 2)
    outline = int(rng.integers(2, 5)) if rng.random() < 0.4 else 0
    return {"kind": kind, "cx": float(cx), "cy": float(cy), "r": r, "angle": float(rng.uniform(0, 2 * math.pi)), "outline": outline}


def _item_rng(seed: int, i: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), int(i)])


def segmentation_set(n: int, size: int = 64, seed: int = 0, max_objects: int = 3,
                     r_range: tuple[float, float] | None = None, start: int = 0) -> dict[str, np.ndarray]:
    """``{"images": (N, 3, H, W) float32, "labels": (N, H, W) int64}``: 1..max_objects objects each,
    radius in ``r_range`` (default 0.11 to 0.22 of the size). Items ``start .. start + n - 1``."""
    r_range = r_range or (size * 0.11, size * 0.22)
    images = np.empty((n, 3, size, size), np.float32)
    labels = np.empty((n, size, size), np.int64)
    for i in range(n):
        rng = _item_rng(seed, start + i, 1)
        objs = [_random_object(rng, size, r_range) for _ in range(int(rng.integers(1, max_objects + 1)))]
        images[i], labels[i], _ = draw_object_image(rng, size, objs)
    return {"images": images, "labels": labels}


def object_set(n: int, size: int = 64, seed: int = 0,
               r_range: tuple[float, float] | None = None, start: int = 0,
               kinds: tuple[str, ...] | None = None, centre_jitter: float | None = None) -> dict[str, np.ndarray]:
    """One object per image: images, classes (N,) in 0..3, radius (N,) px, boxes (N, 4), masks.

    Item ``i`` has class ``i % 4`` (every class is present in any 4 consecutive items; all else
    is drawn from the seed), radius in ``r_range`` (default 0.13 to 0.34 of the size). Items
    ``start .. start + n - 1``. ``kinds``: the shapes of the classes (default
    :data:`OBJECT_CLASSES`; e.g. :data:`SOURCE_CLASSES`). ``centre_jitter``: None (default)
    places the object anywhere; a number centres it ("aligned", as a detected face) with a
    uniform offset of up to that many pixels on each axis. The defaults give the same arrays
    as before these two parameters existed.
    """
    kinds = tuple(kinds) if kinds is not None else OBJECT_CLASSES
    r_range = r_range or (size * 0.13, size * 0.34)
    images = np.empty((n, 3, size, size), np.float32)
    classes = np.empty(n, np.int64)
    radius = np.empty(n, np.float32)
    boxes = np.empty((n, 4), np.float32)
    masks = np.empty((n, size, size), bool)
    for k in range(n):
        i = start + k
        rng = _item_rng(seed, i, 2)
        obj = _random_object(rng, size, r_range, kind=kinds[i % len(kinds)], centre_jitter=centre_jitter)
        images[k], _, (m,) = draw_object_image(rng, size, [obj], kinds)
        ys, xs = np.nonzero(m)
        classes[k] = i % len(kinds)
        radius[k] = obj["r"]
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        masks[k] = m
    return {"images": images, "classes": classes, "radius": radius, "boxes": boxes, "masks": masks}
