"""docs/segmentation.png: one image segmented by a small DeepLabv3 and by its dense rewrite.

Trains the ``deeplabv3`` of :mod:`samples.segmentation` (stride 8, bilinear x8 at the end) for a
few hundred Adam steps on the generated shapes (:func:`samples.shapes_data.segmentation_set`),
exports it (TorchScript), rewrites it at output stride 2 (``onnx_dense.rewrite_model``: the score
map dense, a prediction every 2 pixels instead of 8, the same bilinear upsampling rebuilt on it)
and draws, for held-out images: the image, its true labels, the original's labels and the dense
model's. About two minutes on two shared CPU cores (600 Adam steps on 48x48 shapes, each batch
shifted by up to a stride so that the stride-8 network has seen its input at every offset).

    python -m samples.segmentation_picture docs/segmentation.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import onnx_dense
from samples import segmentation
from samples.shapes_data import CLASSES, segmentation_set


def train(steps: int, size: int, seed: int = 0) -> torch.nn.Module:
    """Adam with a one-cycle learning rate on 48x48 shapes (the model is size-agnostic in torch),
    background weighted down in the loss."""
    torch.manual_seed(seed)
    data = segmentation_set(1024, size=48, seed=seed)
    x_all = torch.from_numpy(data["images"])
    y_all = torch.from_numpy(data["labels"])
    model = segmentation.deeplabv3(width=8, size=size, num_classes=len(CLASSES), seed=seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    rng = np.random.default_rng(seed)
    weight = torch.tensor([0.2] + [1.0] * (len(CLASSES) - 1))  # most pixels are background
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(x_all), 16, replace=False))
        # Shifted by up to a stride (wrapping round): a stride-8 network that has not seen its
        # input at every offset predicts differently at each, which the dense map would show.
        dy, dx = (int(v) for v in rng.integers(0, 8, 2))
        xb = torch.roll(x_all[idx], (dy, dx), dims=(2, 3))
        yb = torch.roll(y_all[idx], (dy, dx), dims=(1, 2))
        loss = F.cross_entropy(model(xb), yb, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    return model.eval()


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    import onnx_ir as ir
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(["output"], {name: x})[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m samples.segmentation_picture")
    ap.add_argument("out", type=Path, nargs="?", default=Path("docs/segmentation.png"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--stride", type=int, default=2)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    size = 64
    model = train(args.steps, size)
    test = segmentation_set(3, size=size, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = segmentation.export(model, Path(tmp) / "deeplab.onnx")
        import onnx

        original = onnx.load(str(path))
        dense = onnx_dense.rewrite_model(onnx.load(str(path)), output_stride=args.stride)
    rows = []
    for i in range(len(test["images"])):
        x = test["images"][i : i + 1]
        a = run_onnx(original, x)[0].argmax(0)
        b = run_onnx(dense, x)[0].argmax(0)
        truth = test["labels"][i]
        rows.append((x[0].transpose(1, 2, 0), truth, a, b))
        print(f"image {i}: pixel accuracy original {np.mean(a == truth):.3f}, dense {np.mean(b == truth):.3f}")
    draw(rows, args.out, args.stride)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def draw(rows, out: Path, stride: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#202020", "#e6194b", "#3cb44b", "#4363d8", "#f58231"])
    titles = ["image", "true labels", "original (a prediction every 8 px)",
              f"dense rewrite, -r {stride} (every {stride} px)"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = axes[r, c]
            if c == 0:
                ax.imshow(np.clip(panel, 0, 1), interpolation="nearest")
            else:
                ax.imshow(panel, cmap=cmap, vmin=0, vmax=len(CLASSES) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(k)) for k in range(len(CLASSES))]
    fig.legend(handles, CLASSES, loc="lower center", ncol=len(CLASSES), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
