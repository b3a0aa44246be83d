"""A few images and a small labelled folder, drawn by :mod:`samples.shapes_data` (no download).

``python -m samples.make_samples OUTDIR`` calls :func:`write_sample_data`, so that the README's
``onnx-dense run`` and ``onnx-dense train --data`` name files that exist:

    OUTDIR/scene.jpg, OUTDIR/shapes.png   two 160x208 pictures with 3 to 5 shapes each
    OUTDIR/data/images/NNN.png            N 64x64 images, one shape each (class i % 4)
    OUTDIR/data/labels/NNN.png            its label map (0 background, 1 circle ... 4 cross)
    OUTDIR/data/labels.csv                NNN,CLASS (0 circle ... 3 cross) for classification
    OUTDIR/data/classes.txt               the label map's class names, one per line

The folder is the layout ``onnx-dense train --data`` reads for every task (segmentation uses
``labels/``, classification ``labels.csv``). Same seed, same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samples import shapes_data


def _pixels(image: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return np.clip(np.rint(np.moveaxis(image, 0, -1) * 255), 0, 255).astype(np.uint8)


def write_sample_data(outdir: str | Path, n: int = 16, seed: int = 0) -> list[Path]:
    """Write the pictures and the labelled folder under ``outdir``; returns the files written."""
    from PIL import Image

    out = Path(outdir)
    written: list[Path] = []
    # two scenes: a few objects on clutter, wider than tall, as a photo would be
    rng = np.random.default_rng([seed, 17])
    for k, name in enumerate(("scene.jpg", "shapes.png")):
        size = 208
        objs = [shapes_data._random_object(rng, size, (18.0, 34.0)) for _ in range(3 + k * 2)]
        for obj in objs:  # keep them inside the 160 rows that are kept
            obj["cy"] = float(np.clip(obj["cy"], obj["r"] + 24, 160 + 24 - obj["r"] - 1))
        image, _, _ = shapes_data.draw_object_image(rng, size, objs)
        picture = Image.fromarray(_pixels(image)[24:184])
        path = out / name
        picture.save(path, quality=92) if name.endswith(".jpg") else picture.save(path)
        written.append(path)

    data = out / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "labels").mkdir(parents=True, exist_ok=True)
    items = shapes_data.object_set(n, size=64, seed=seed)
    lines = []
    for i in range(n):
        stem = f"{i:03d}"
        Image.fromarray(_pixels(items["images"][i])).save(data / "images" / f"{stem}.png")
        label = (items["masks"][i] * (items["classes"][i] + 1)).astype(np.uint8)
        Image.fromarray(label).save(data / "labels" / f"{stem}.png")
        lines.append(f"{stem},{int(items['classes'][i])}")
        written += [data / "images" / f"{stem}.png", data / "labels" / f"{stem}.png"]
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    (data / "classes.txt").write_text("\n".join(shapes_data.CLASSES) + "\n")
    written += [data / "labels.csv", data / "classes.txt"]
    return written
