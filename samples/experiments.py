"""The paper's experiments, at a scale a 2-core CPU can run, on generated data.

    python -m samples.experiments --config small --seeds 0,1,2 --out exp_small
    python -m samples.experiments --config large --seeds 0,1,2 --out exp_large --device cuda

For each task and seed (the paper's section 3; data from :mod:`samples.shapes_data`, drawn
once from ``data_seed`` and shared by every seed; the seed changes the weight initialisation
and the order of the training batches):

* **seg** (3.1): an FCN-style VGG-like net (conv stages + fc6 3x3 / fc7 1x1 / score 1x1, no
  upsampling layer) trained from scratch in plain PyTorch on per-pixel labels, its scores
  upsampled bilinearly to the label size for the loss and the evaluation, as in FCN;
* **cls** (3.3) and **reg** (3.4): a VGG-like net whose fc6 (3x3, no padding) / fc7 / fc8
  convolutions output a small map of predictions, averaged (the paper's global-average head);
  classification of the object's class (cross-entropy), regression of its radius (tanh of
  the average, L1 against the radius scaled to [-1, 1], as the paper's age estimation);
* **loc** (3.2, no training): the channel sum of the last pooling output of the trained
  classification baseline, thresholded at its mean, largest connected component, its
  bounding box against the object's; correct when the box IoU is at least 0.5.

Then, per task: the baseline is exported to ONNX (:func:`samples.export.export_onnx`, BatchNorm
folded), rewritten dense with :func:`onnx_dense.rewrite` (the paper's "pool4 stride 1": the
strides of the last ``removed`` pools are set to 1 and later layers become eConv/ePool, so the
output stride is ``2**stages / 2**removed``), and

* **control**: the baseline fine-tuned for K more steps with :func:`onnx_dense.train.train`
  (the original ONNX graph, the same optimiser, learning rate, batches and loss as the dense
  net: without it a dpoa gain may just be more training);
* **dense**: the dense net fine-tuned for the same K steps with :func:`onnx_dense.train.train`;
* **dpoa**: the dense net's trained weights written back into the untouched original with
  :func:`onnx_dense.train.export_dpoa` (checked against the trained dense model with
  :func:`onnx_dense.verify`: the dpoa output is the dense output sampled every eST);
* **dense0**: the dense net with the baseline's weights, not fine-tuned (what density alone does).

All are evaluated on a held-out generated test set with :func:`onnx_dense.train.evaluate`:
mean IoU (scores upsampled bilinearly to the label size, each prediction at the centre of its
receptive field), accuracy, MAE in pixels. ``OUT/results.json`` holds every number and
timing, ``OUT/results.md`` the tables (mean ± sample std over the seeds, and the differences
seed by seed); ``--report`` rewrites results.md from results.json. ``--set KEY=VALUE``
overrides a field of the configuration (:class:`Config`). The generated data is kept in
``OUT/data`` and reused by a later run with the same data settings.

Units of work (task, seed) run in ``--jobs`` processes of ``--threads`` torch threads each
(default 2 x 1: on the shared 2-core machine, one process with two torch threads was measured
7x slower per step than with one, as the threads wait for each other when the cores are
busy). ``loc`` runs inside the ``cls`` unit of the same seed and reuses its baseline. With one
thread per process the results are bit-identical from run to run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("seg", "cls", "reg", "loc")
TRAIN_TASKS = {"seg": "segmentation", "cls": "classification", "reg": "regression"}
COLUMNS = ("baseline", "control", "dense", "dpoa", "dense0")
COLUMN_TITLES = {
    "baseline": "baseline",
    "control": "baseline +K steps (control)",
    "dense": "dense",
    "dpoa": "dpoa",
    "dense0": "dense, not fine-tuned",
}
METRICS = {  # task: (name, unit, higher is better)
    "seg": ("mean IoU", "%", True),
    "cls": ("accuracy", "%", True),
    "reg": ("radius MAE", "px", False),
    "loc": ("box IoU >= 0.5", "%", True),
}


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    size: int = 64  # input images are size x size
    stages: int = 4  # conv stages, each ending with MaxPool 2x2/2
    convs: int = 2  # 3x3 convs per stage
    width: int = 8  # channels of stage 1; stage i has width * 2**min(i, 3)
    fc_width: int = 64  # channels of fc6 / fc7
    removed: int = 2  # strides removed for the dense net (2: the paper's pool4 of VGG-16)
    seg_removed: int = 2  # the same for segmentation (the paper: 3, pool3)
    n_train: int = 3000  # training images per data set
    n_test: int = 1000  # test images per data set
    max_objects: int = 3  # segmentation: objects per image, 1..max
    batch: int = 16
    base_steps: int = 2000  # baseline from scratch: Adam, linear warm-up, then cosine to 0
    base_lr: float = 1e-3
    base_warmup: int = 100
    ft_steps: int = 600  # K: the control and the dense net each get K steps
    ft_lr: float = 1e-4
    ft_optimizer: str = "adam"
    ft_schedule: str = "cosine"
    eval_batch: int = 50
    data_seed: int = 1000
    exporter: str = "torchscript"
    device: str = "cpu"

    def output_stride(self, task: str) -> int:
        removed = self.seg_removed if task == "seg" else self.removed
        return 2 ** (self.stages - removed)

    def key(self) -> str:
        data = {k: getattr(self, k) for k in ("size", "n_train", "n_test", "max_objects", "data_seed")}
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


CONFIGS = {
    # 16 minutes on a nearly idle 2-core CPU (two single-threaded jobs), 30 CPU-minutes
    "small": Config("small"),
    # for a GPU (not run yet): 128x128 images, a 5-stage VGG-like net (2 convs per stage, not
    # VGG-16's 2-2-3-3-3), the paper's strides (pool4 for cls/reg, pool3 for segmentation)
    "large": Config(
        "large", size=128, stages=5, convs=2, width=32, fc_width=256, removed=2, seg_removed=3,
        n_train=12000, n_test=2000, max_objects=4, batch=32, base_steps=6000, base_lr=1e-3, base_warmup=300,
        ft_steps=2000, ft_lr=5e-5, device="auto",
    ),
    # the test suite's end-to-end run: tiny images, a few steps
    "smoke": Config(
        "smoke", size=32, stages=3, convs=1, width=4, fc_width=8, removed=1, seg_removed=1,
        n_train=16, n_test=12, max_objects=2, batch=4, base_steps=3, base_warmup=1, ft_steps=2, eval_batch=12,
    ),
}


def parse_overrides(items: list[str], config: type | None = None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> fields of ``config`` (a config dataclass; default this
    script's :class:`Config`), each converted to its field's type; shared by the experiment scripts."""
    fields = {f.name: f.type for f in dataclasses.fields(config or Config)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or key == "name" or not _:
            raise SystemExit(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(k for k in fields if k != 'name')}")
        kind = fields[key]
        kind = kind if isinstance(kind, str) else kind.__name__
        out[key] = (int if kind == "int" else float if kind == "float" else str)(value)
    return out


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

MEAN, STD = 0.5, 0.25  # images in [0, 1] -> roughly zero mean, unit spread


def radius_range(cfg: Config) -> tuple[float, float]:
    return (cfg.size * 0.13, cfg.size * 0.34)  # shapes_data.object_set's default


def _data_chunk(kind: str, cfg: Config, seed: int, start: int, n: int) -> tuple[dict[str, np.ndarray], float]:
    from samples import shapes_data as sd

    cpu = time.process_time()
    if kind == "seg":
        d = sd.segmentation_set(n, cfg.size, seed=seed, max_objects=cfg.max_objects, start=start)
        arrays = {"images": _normalise(d["images"]), "labels": d["labels"].astype(np.uint8)}
    else:
        d = sd.object_set(n, cfg.size, seed=seed, r_range=radius_range(cfg), start=start)
        arrays = {"images": _normalise(d["images"]), "classes": d["classes"], "radius": d["radius"], "boxes": d["boxes"]}
    return arrays, time.process_time() - cpu


def make_data(cfg: Config, root: Path, tasks, pool: cf.Executor | None = None) -> tuple[dict[str, str], float]:
    """Generate (or reuse) the data sets the tasks need; returns ({name: npz path}, CPU seconds).

    The training set is drawn from ``data_seed``, the test set from ``data_seed + 1``; with a
    ``pool`` the items are drawn in chunks in parallel (the result is the same).
    """
    root.mkdir(parents=True, exist_ok=True)
    paths, cpu = {}, 0.0
    want = {"seg": "seg" in tasks, "obj": any(t in tasks for t in ("cls", "reg", "loc"))}
    for kind in ("seg", "obj"):
        if not want[kind]:
            continue
        for split, n, offset in (("train", cfg.n_train, 0), ("test", cfg.n_test, 1)):
            path = root / f"{kind}_{split}_{cfg.key()}.npz"
            paths[f"{kind}_{split}"] = str(path)
            if path.exists():
                continue
            step = 250
            args = [(kind, cfg, cfg.data_seed + offset, a, min(step, n - a)) for a in range(0, n, step)]
            if pool is None:
                chunks = [_data_chunk(*a) for a in args]
            else:
                chunks = list(pool.map(_data_chunk, *zip(*args)))
            cpu += sum(c[1] for c in chunks)
            arrays = {k: np.concatenate([c[0][k] for c in chunks]) for k in chunks[0][0]}
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    return paths, cpu


def _normalise(images: np.ndarray) -> np.ndarray:
    return ((images - MEAN) / STD).astype(np.float32)


def task_arrays(task: str, cfg: Config, paths: dict[str, str], split: str) -> tuple[np.ndarray, np.ndarray]:
    if task == "seg":
        with np.load(paths[f"seg_{split}"]) as d:
            return d["images"], d["labels"].astype(np.int64)
    with np.load(paths[f"obj_{split}"]) as d:
        images = d["images"]
        if task == "reg":
            return images, radius_targets(cfg, d["radius"])
        return images, d["classes"].astype(np.int64)


def radius_targets(cfg: Config, radius: np.ndarray) -> np.ndarray:
    """The regression targets: the radius scaled from :func:`radius_range` to [-1, 1] (the paper's (a - 45) / 45)."""
    lo, hi = radius_range(cfg)
    return ((radius - (lo + hi) / 2) / ((hi - lo) / 2)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the networks
# --------------------------------------------------------------------------------------------


def build_net(cfg: Config, task: str, seed: int):
    """A VGG-like net: ``stages`` x (convs x [3x3 conv, BN, ReLU], MaxPool 2x2/2), then fc6
    (3x3 conv: padding 1 for segmentation, 0 otherwise), BN, ReLU, fc7 (1x1), BN, ReLU and a 1x1
    score conv. BatchNorm only helps it train from scratch here; the export folds it away."""
    import torch
    from torch import nn

    outputs = {"seg": 5, "cls": 4, "reg": 1}[task]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], 3
            for i in range(cfg.stages):
                w = cfg.width * 2 ** min(i, 3)
                for _ in range(cfg.convs):
                    layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                    c = w
                layers.append(nn.MaxPool2d(2, 2))
            self.features = nn.Sequential(*layers)
            f = cfg.fc_width
            self.head = nn.Sequential(
                nn.Conv2d(c, f, 3, padding=1 if task == "seg" else 0), nn.BatchNorm2d(f), nn.ReLU(inplace=True),  # fc6
                nn.Conv2d(f, f, 1), nn.BatchNorm2d(f), nn.ReLU(inplace=True),  # fc7
                nn.Conv2d(f, outputs, 1),  # score / fc8
            )

        def forward(self, x):
            return self.head(self.features(x))

    torch.manual_seed(seed)
    return Net()


# --------------------------------------------------------------------------------------------
# one unit of work: a task and a seed
# --------------------------------------------------------------------------------------------


def _metric(task: str, cfg: Config, m: dict[str, float]) -> float:
    if task == "seg":
        return 100.0 * m["mean_iou"]
    if task == "cls":
        return 100.0 * m["accuracy"]
    lo, hi = radius_range(cfg)
    return m["mae"] * (hi - lo) / 2


def train_baseline(net, task: str, cfg: Config, seed: int, images, labels, geometry, device, *,
                   steps: int | None = None, lr: float | None = None, warmup: int | None = None,
                   optimizer: str = "adam", momentum: float = 0.9, schedule: str = "cosine",
                   crop: int | None = None, bn_train: bool = True) -> dict[str, Any]:
    """Plain PyTorch with the trainer's loss (TaskLoss). By default the from-scratch baseline:
    Adam ``cfg.base_lr``, ``cfg.base_warmup`` steps of warm-up then cosine over ``cfg.base_steps``.
    The keywords make it a fine-tuning stage (:mod:`samples.cls_reg_paper`): ``optimizer``
    "sgd" (with ``momentum``), ``schedule`` "constant", ``crop`` (a random ``crop`` x ``crop``
    window of each image, drawn per step, as the paper's 224 crops of 256 images),
    ``bn_train=False`` (BatchNorm keeps its statistics, as in the exported, folded net)."""
    import torch
    from onnx_dense.train.losses import TaskLoss

    loss_fn = TaskLoss(TRAIN_TASKS[task], geometry, label_mode="upsample")
    net.to(device).train(bn_train)
    lr = cfg.base_lr if lr is None else lr
    if optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    total = cfg.base_steps if steps is None else steps
    warm = max(1, cfg.base_warmup if warmup is None else warmup)
    if schedule == "constant":
        sched = None
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    rng = np.random.default_rng([seed, 7])
    crop_rng = np.random.default_rng([seed, 8])
    order = np.empty(0, np.int64)
    losses = []
    started = time.perf_counter()
    for _ in range(total):
        if len(order) < cfg.batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        idx, order = order[: cfg.batch], order[cfg.batch :]
        batch = images[idx] if crop is None else random_crops(images[idx], crop, crop_rng)
        x = torch.from_numpy(batch).to(device)
        y = torch.from_numpy(labels[idx]).to(device)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    return {"steps": total, "seconds": time.perf_counter() - started, "final_loss": float(np.mean(losses[-20:]))}


def random_crops(images: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """One random ``crop`` x ``crop`` window of each image (N, C, H, W), offsets from ``rng``."""
    n, c, h, w = images.shape
    ys = rng.integers(0, h - crop + 1, n)
    xs = rng.integers(0, w - crop + 1, n)
    return np.stack([im[:, y : y + crop, x : x + crop] for im, y, x in zip(images, ys, xs)])


def run_unit(task: str, seed: int, cfg: Config, paths: dict[str, str], out: str, with_loc: bool, threads: int) -> list[dict]:
    """Baseline, control, dense, dpoa (and loc) for one task and seed, with ``threads`` torch
    threads (the caller's setting is restored afterwards: with --jobs 1 this runs in-process)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_unit(task, seed, cfg, paths, out, with_loc, threads)
    finally:
        torch.set_num_threads(previous)


def _run_unit(task: str, seed: int, cfg: Config, paths: dict[str, str], out: str, with_loc: bool, threads: int) -> list[dict]:
    import onnx

    from onnx_dense import api, metadata
    from onnx_dense import train as dt
    from samples.export import export_onnx

    started, cpu0 = time.perf_counter(), time.process_time()
    device = dt.resolve_device(cfg.device)
    work = Path(out) / "models" / f"{task}_seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"task": task, "seed": seed, "metrics": {}, "times": {}}
    t = time.perf_counter()
    images, labels = task_arrays(task, cfg, paths, "train")
    test_images, test_labels = task_arrays(task, cfg, paths, "test")
    stride = cfg.output_stride(task)
    net = build_net(cfg, task, seed)
    # The geometry of the original's predictions (where each sits in the image), read from the
    # dense model's metadata of the untrained net: the architecture fixes it (None when the
    # original gives one prediction per image).
    base, dense = work / "baseline.onnx", work / "dense.onnx"
    export_onnx(net, (1, 3, cfg.size, cfg.size), base, exporter=cfg.exporter, dynamic_batch=True)
    api.rewrite(base, dense, output_stride=stride)
    geo_orig = dt.geometry_from(str(dense), original=True)
    res["times"]["data_and_setup"] = time.perf_counter() - t

    res["baseline_training"] = train_baseline(net, task, cfg, seed, images, labels, geo_orig, device)
    net.cpu().eval()
    export_onnx(net, (1, 3, cfg.size, cfg.size), base, exporter=cfg.exporter, dynamic_batch=True)
    t = time.perf_counter()
    api.rewrite(base, dense, output_stride=stride)
    res["times"]["rewrite"] = time.perf_counter() - t
    out_info = next(iter(metadata.read(onnx.load(str(dense), load_external_data=False)).outputs.values()))
    res["dense"] = {"output_stride": stride, "original_stride": list(out_info.original_stride)[0],
                    "predictions": list(out_info.dense_size), "original_predictions": list(out_info.size)}

    def evaluate(model, geometry=None, label_mode="upsample") -> float:
        m = dt.evaluate(model, task=TRAIN_TASKS[task], data=(test_images, test_labels), batch_size=cfg.eval_batch,
                        device=str(device), label_mode=label_mode, geometry=geometry)
        return _metric(task, cfg, m)

    ft = dict(task=TRAIN_TASKS[task], data=(images, labels), steps=cfg.ft_steps, lr=cfg.ft_lr, batch_size=cfg.batch,
              optimizer=cfg.ft_optimizer, schedule=cfg.ft_schedule, label_mode="upsample", seed=seed,
              device=str(device), progress=False)
    t = time.perf_counter()
    res["metrics"]["baseline"] = evaluate(str(base), geo_orig)
    res["metrics"]["dense0"] = evaluate(str(dense))
    res["times"]["evaluate_before"] = time.perf_counter() - t

    t = time.perf_counter()
    control = dt.train(str(base), geometry=geo_orig, **ft)
    res["times"]["control_training"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = dt.train(str(dense), **ft)
    res["times"]["dense_training"] = time.perf_counter() - t
    res["fine_tune"] = {"control_final_loss": control.final_loss, "dense_final_loss": trained.final_loss,
                        "control_images_per_second": control.images_per_second,
                        "dense_images_per_second": trained.images_per_second}

    dpoa, dense_trained, control_onnx = work / "dpoa.onnx", work / "dense_trained.onnx", work / "control.onnx"
    t = time.perf_counter()
    trained.save_onnx(dense_trained)
    control.save_onnx(control_onnx)
    export = dt.export_dpoa(str(base), trained.state_dict_onnx(), str(dpoa))
    res["times"]["export"] = time.perf_counter() - t
    res["dpoa"] = {"replaced": export.replaced, "changed": export.changed}
    # dpoa is the trained dense net sampled every eST: check it with onnxruntime.
    report = api.verify(str(dpoa), str(dense_trained))
    res["dpoa"]["equivalent_to_trained_dense"] = bool(report)

    t = time.perf_counter()
    res["metrics"]["control"] = evaluate(str(control_onnx), geo_orig)
    res["metrics"]["dense"] = evaluate(trained.model)
    res["metrics"]["dpoa"] = evaluate(str(dpoa), geo_orig)
    res["times"]["evaluate_after"] = time.perf_counter() - t
    if task == "seg":
        # Secondary: each prediction scored on the label under its own receptive-field centre
        # (no interpolation): how right the predictions are where they are, on either grid.
        t = time.perf_counter()
        res["at_centres"] = {
            "baseline": evaluate(str(base), geo_orig, "sample"),
            "control": evaluate(str(control_onnx), geo_orig, "sample"),
            "dense": evaluate(trained.model, None, "sample"),
            "dpoa": evaluate(str(dpoa), geo_orig, "sample"),
            "dense0": evaluate(str(dense), None, "sample"),
        }
        res["times"]["evaluate_at_centres"] = time.perf_counter() - t
    results = [res]
    if with_loc:
        results.append(run_loc(net, seed, cfg, paths, work, threads))
    for r in results:
        r["seconds"] = time.perf_counter() - started
        r["cpu_seconds"] = time.process_time() - cpu0
    return results


# --------------------------------------------------------------------------------------------
# unsupervised localisation (the paper's 3.2)
# --------------------------------------------------------------------------------------------


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D boolean mask (ties: the first found)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for sy, sx in zip(*np.nonzero(mask)):
        if seen[sy, sx]:
            continue
        stack, comp = [(sy, sx)], []
        seen[sy, sx] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    for y, x in best:
        out[y, x] = True
    return out


def _pixel_span(first: int, last: int, centres: np.ndarray, n_pixels: int) -> tuple[int, int]:
    """Pixels [a, b) whose nearest prediction centre has index in [first, last]."""
    pix = np.arange(n_pixels)
    nearest = np.abs(pix[:, None] - centres[None, :]).argmin(axis=1)
    inside = np.nonzero((nearest >= first) & (nearest <= last))[0]
    return int(inside.min()), int(inside.max()) + 1


def mask_box(channel_sum: np.ndarray, centres_y: np.ndarray, centres_x: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The paper's (and SCDA's) box: mask = sum > its mean, largest component, its extent in pixels
    (each pixel belongs to its nearest prediction: the map resized to the image)."""
    mask = channel_sum > channel_sum.mean()
    if not mask.any():
        mask = channel_sum >= channel_sum.max()
    comp = largest_component(mask)
    ys, xs = np.nonzero(comp)
    y0, y1 = _pixel_span(ys.min(), ys.max(), centres_y, size)
    x0, x1 = _pixel_span(xs.min(), xs.max(), centres_x, size)
    return x0, y0, x1, y1


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def run_loc(net, seed: int, cfg: Config, paths: dict[str, str], work: Path, threads: int) -> dict:
    """Localise with the last pooling output of the trained classifier: original vs dense (onnxruntime)."""
    import onnxruntime as ort

    from onnx_dense import api, metadata
    from samples.export import export_onnx

    started = time.perf_counter()
    feats, feats_dense = work / "features.onnx", work / "features_dense.onnx"
    export_onnx(net.features, (1, 3, cfg.size, cfg.size), feats, exporter=cfg.exporter, dynamic_batch=True)
    stride = cfg.output_stride("cls")
    api.rewrite(feats, feats_dense, output_stride=stride)
    import onnx

    info = metadata.read(onnx.load(str(feats_dense), load_external_data=False))
    out = next(iter(info.outputs.values()))
    with np.load(paths["obj_test"]) as d:
        images, boxes = d["images"], d["boxes"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    res: dict[str, Any] = {"task": "loc", "seed": seed, "metrics": {}, "times": {}}
    for column, path, grid in (("baseline", feats, out.original_stride), ("dense0", feats_dense, out.stride)):
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        hits, ious = 0, []
        for start in range(0, len(images), cfg.eval_batch):
            maps = session.run(None, {name: images[start : start + cfg.eval_batch]})[0]
            sums = maps.sum(axis=1)  # channel sum: (N, h, w)
            for k, s in enumerate(sums):
                cy = out.rf_start[0] + np.arange(s.shape[0]) * grid[0] + (out.rf_size[0] - 1) / 2
                cx = out.rf_start[1] + np.arange(s.shape[1]) * grid[1] + (out.rf_size[1] - 1) / 2
                box = mask_box(s, cy, cx, cfg.size)
                iou = box_iou(box, boxes[start + k])
                ious.append(iou)
                hits += iou >= 0.5
        res["metrics"][column] = 100.0 * hits / len(images)
        res[f"{column}_mean_iou"] = float(np.mean(ious))
        res[f"{column}_map_size"] = list(sums.shape[1:])
    res["metrics"]["dense"] = res["metrics"]["dense0"]  # no training: the dense net is the dense0 net
    res["times"]["loc"] = time.perf_counter() - started
    return res


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


def _fmt(values: list[float], digits: int = 1) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def summarise(results: list[dict], cfg: Config) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for task in TASKS:
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        summary[task] = {}
        for col in COLUMNS:
            if task == "loc" and col == "dense0":
                continue
            vals = [r["metrics"][col] for r in rows if col in r["metrics"]]
            if vals:
                summary[task][col] = {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                    "values": vals,
                }
    return summary


_DIGITS = {"seg": 1, "cls": 1, "reg": 2, "loc": 1}
_PAIRS = (("control", "baseline"), ("dense", "control"), ("dpoa", "control"), ("dpoa", "baseline"))


def table(results: list[dict], cfg: Config) -> str:
    """The markdown report: the main table, differences per seed, secondary numbers."""
    seeds = sorted({r["seed"] for r in results})
    head = ["task", "metric"] + [COLUMN_TITLES[c] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in TASKS:
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        name, unit, higher = METRICS[task]
        cells = [task, f"{name} ({unit}, {'higher' if higher else 'lower'} is better)"]
        for col in COLUMNS:
            if task == "loc" and col in ("control", "dpoa", "dense0"):
                cells.append("n/a")
                continue
            cells.append(_fmt([r["metrics"].get(col) for r in rows], _DIGITS[task]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean ± sample std over seeds {', '.join(map(str, seeds))}; config `{cfg.name}`; K = {cfg.ft_steps} "
        f"fine-tuning steps (control and dense alike, after {cfg.base_steps} baseline steps); dense output stride "
        f"{cfg.output_stride('cls')} for cls/reg/loc and {cfg.output_stride('seg')} for seg (original: {2 ** cfg.stages})."
    )
    # Paired differences: the seeds share the data, so seed-to-seed spread cancels out here.
    trained = [t for t in ("seg", "cls", "reg") if any(r["task"] == t for r in results)]
    if trained or any(r["task"] == "loc" for r in results):
        lines += ["", "Differences, seed by seed (mean ± std of the per-seed differences):", ""]
        head = ["task"] + [f"{a} − {b}" for a, b in _PAIRS] + ["dense − baseline"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for task in TASKS:
            rows = [r for r in results if r["task"] == task]
            if not rows:
                continue
            cells = [task]
            for a, b in (*_PAIRS, ("dense", "baseline")):
                diffs = [r["metrics"][a] - r["metrics"][b] for r in rows if a in r["metrics"] and b in r["metrics"]]
                cells.append(_fmt(diffs, _DIGITS[task]) if diffs else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    seg = [r for r in results if r["task"] == "seg" and "at_centres" in r]
    loc = [r for r in results if r["task"] == "loc"]
    if seg or loc:
        lines += ["", "Secondary numbers:", ""]
    if seg:
        cells = [_fmt([r["at_centres"][c] for r in seg]) for c in COLUMNS]
        lines.append(
            "* seg, mean IoU (%) of each prediction against the label under its receptive-field centre, no "
            "interpolation (" + ", ".join(f"{COLUMN_TITLES[c]} {v}" for c, v in zip(COLUMNS, cells)) + ")"
        )
    if loc:
        lines.append(
            f"* loc, mean box IoU (%): baseline {_fmt([100 * r['baseline_mean_iou'] for r in loc])}, "
            f"dense {_fmt([100 * r['dense0_mean_iou'] for r in loc])}; channel-sum maps "
            f"{'x'.join(map(str, loc[0]['baseline_map_size']))} (baseline) and "
            f"{'x'.join(map(str, loc[0]['dense0_map_size']))} (dense)"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def ap_defaults() -> dict[str, Any]:
    return {"jobs": min(2, os.cpu_count() or 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m samples.experiments", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for data, models, results.json, results.md (default: exp_CONFIG, e.g. exp_smoke)")
    ap.add_argument("--tasks", default="seg,cls,reg,loc", help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--jobs", type=int, default=ap_defaults()["jobs"], help="worker processes (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--device", default=None, help="cpu, cuda, auto (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--report", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    args = ap.parse_args(argv)
    args.out = args.out or Path(f"exp_{args.config}")
    if args.report:
        return rewrite_report(ap, args.out, report)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        ap.error(f"--tasks: unknown {', '.join(bad) or '(none)'}; known: {', '.join(TASKS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error("--seeds: expected integers, e.g. 0,1,2")
    overrides = parse_overrides(args.set)
    if args.device:
        overrides["device"] = args.device
    cfg = dataclasses.replace(CONFIGS[args.config], **overrides)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.perf_counter(), time.process_time()
    print(f"config {cfg.name}: {json.dumps(dataclasses.asdict(cfg))}", flush=True)

    pool = None
    if args.jobs > 1:
        pool = cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        return _run(args, cfg, tasks, seeds, out, pool, started, cpu0)
    finally:
        if pool is not None:
            pool.shutdown()


def _run(args, cfg: Config, tasks, seeds, out: Path, pool, started: float, cpu0: float) -> int:
    t = time.perf_counter()
    paths, data_cpu = make_data(cfg, out / "data", tasks, pool)
    data_seconds = time.perf_counter() - t
    print(f"data: {data_seconds:.1f} s ({', '.join(sorted(paths))})", flush=True)

    units = []  # the costliest first, so that the last unit to finish is a short one
    for task in ("seg", "cls", "reg"):
        for seed in seeds:
            if task in tasks or (task == "cls" and "loc" in tasks):
                units.append((task, seed, task == "cls" and "loc" in tasks))
    results: list[dict] = []
    cls_only_for_loc = "loc" in tasks and "cls" not in tasks
    unit_cpu = []

    def collect(rs):
        unit_cpu.append(rs[-1]["cpu_seconds"])
        for r in rs:
            if cls_only_for_loc and r["task"] == "cls":
                continue
            results.append(r)
            m = ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items())
            print(f"  {r['task']} seed {r['seed']}: {m}  ({r['seconds']:.0f} s)", flush=True)

    if pool is None:
        for task, seed, loc in units:
            collect(run_unit(task, seed, cfg, paths, str(out), loc, args.threads))
    else:
        futures = [pool.submit(run_unit, task, seed, cfg, paths, str(out), loc, args.threads) for task, seed, loc in units]
        for f in cf.as_completed(futures):
            collect(f.result())
    results.sort(key=lambda r: (TASKS.index(r["task"]), r["seed"]))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0 + ((sum(unit_cpu) + data_cpu) if pool is not None else 0.0)
    command = f"python -m samples.experiments --config {cfg.name} --seeds {args.seeds} --out {out} --tasks {','.join(tasks)}"
    if args.jobs != ap_defaults()["jobs"] or args.threads != 1:
        command += f" --jobs {args.jobs} --threads {args.threads}"
    if args.device:
        command += f" --device {args.device}"
    if args.set:
        command += "".join(f" --set {s}" for s in args.set)
    payload = {
        "config": dataclasses.asdict(cfg), "seeds": seeds, "tasks": tasks, "command": command,
        "wall_seconds": wall, "cpu_seconds": cpu, "data_seconds": data_seconds, "jobs": args.jobs,
        "threads": args.threads, "machine": _machine(), "summary": summarise(results, cfg), "runs": results,
    }
    write_results(out, payload, report)
    return 0


def write_results(out: Path, payload: dict, report, default=float) -> None:
    """``OUT/results.json`` (every number) and ``OUT/results.md`` (``report(payload)``), printed too:
    the end of this module's run and of :mod:`samples.fcn8s_experiment`'s and :mod:`samples.cls_reg_paper`'s."""
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=default))
    md = report(payload)
    (out / "results.md").write_text(md)
    print()
    print(md)


def rewrite_report(ap: argparse.ArgumentParser, out: Path, report) -> int:
    """``--report``: rewrite ``OUT/results.md`` from ``OUT/results.json`` with ``report``."""
    source = out / "results.json"
    if not source.is_file():
        ap.error(f"--report: {source} does not exist")
    md = report(json.loads(source.read_text()))
    (out / "results.md").write_text(md)
    print(md)
    return 0


def report(payload: dict) -> str:
    """results.md from the contents of results.json."""
    cfg = Config(**payload["config"])
    footer = (
        f"Wall time {payload['wall_seconds'] / 60:.1f} min ({payload['jobs']} job(s) x {payload['threads']} "
        f"thread(s); data generation {payload['data_seconds']:.0f} s; CPU time of all processes "
        f"{payload['cpu_seconds'] / 60:.1f} min) on {payload['machine']}.\n\n`{payload['command']}`\n"
    )
    return table(payload["runs"], cfg) + "\n\n" + footer


if __name__ == "__main__":
    sys.exit(main())
