"""The paper's FCN protocol (section 3.1) at small scale on generated data: dense-8s and dpoa-8s.

    python -m samples.fcn8s_experiment --config small --seeds 0,1,2 --out exp_fcn8s
    python -m samples.fcn8s_experiment --config large --seeds 0,1,2 --out exp_fcn8s_large --device cuda

Per seed (data from :mod:`samples.shapes_data`, drawn once and shared by all seeds; the seed
sets the initial weights and the batch order):

* **FCN-32s**: the layers of :class:`samples.segmentation.FCN8s` with the score map upsampled
  x32 by a fixed bilinear ConvTranspose, trained once from scratch in plain PyTorch with
  BatchNorm (folded away afterwards; the stand-in for the paper's ImageNet VGG-16, shared by
  every seed, cached in ``OUT/data``), then fine-tuned K steps per seed; **FCN-16s** initialised from it (score_pool4 zero, upscore2 bilinear, as FCN
  does), **FCN-8s** from FCN-16s (score_pool3 zero), each fine-tuned for K steps with
  :func:`onnx_dense.train.train` on its ONNX export. FCN-8s is the untouched
  ``samples.segmentation.FCN8s``.
* **dense-32s**: FCN-32s rewritten with ``output_stride=4`` (the paper's "pool3 stride 1",
  eST 8), its final upsampling rebuilt on the dense score map, fine-tuned K steps;
  **dense-16s**: FCN-16s's architecture initialised from dense-32s's weights, rewritten,
  fine-tuned K steps; **dense-8s** the same from dense-16s (as the paper describes).
* **dpoa-8s**: dense-8s's weights written into the FCN-8s ONNX with
  :func:`onnx_dense.train.export_dpoa` (checked: the same initializer names and shapes, and
  ``onnx_dense.verify`` against the trained dense-8s).
* **control**: FCN-8s trained K more steps (dense-8s had one stage more than FCN-8s: the
  dense-32s stage), with the same optimiser.

All losses are per-pixel cross-entropy on the full-resolution output (as FCN trains), the
fixed bilinear upsampling kernels frozen. Ablations (``--ablations``):

* ``loss``: the dense chain again with the loss on the dense score map itself (labels read at
  each prediction's receptive-field centre) instead of the upsampled output -> dense-8s(T),
  dpoa-8s(T);
* ``regime``: every fine-tuning stage (FCN-16s, FCN-8s, dense-*, control) with the other
  optimiser (SGD momentum 0.9, small fixed learning rate vs Adam with cosine decay);
* ``upsampling`` (evaluation only): each final model's score map upsampled bilinearly (each
  prediction at its receptive-field centre), nearest, or by a learned ConvTranspose (bilinear
  initialised, fitted on the training set's score maps with the net frozen), and the score
  map scored at its own pixels (no interpolation);
* ``size`` (evaluation only): every final model on test sets of small, medium and large
  objects (radius bins; the stride of FCN-8s's predictions is 8 px).

``OUT/results.json`` holds every number and timing, ``OUT/results.md`` the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

N_CLASSES = 5
MEAN, STD = 0.5, 0.25
REGIMES = {"adam": "Adam, cosine", "sgd": "SGD momentum 0.9, fixed lr"}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    size: int = 64
    width: int = 4  # FCN8s(width): stage widths w, 2w, 4w, 8w, 8w; fc6/fc7 16w
    n_train: int = 1500
    n_test: int = 300
    n_test_bin: int = 150  # test images per object-size bin
    max_objects: int = 3
    classes: int = 2  # 2: object vs background; 5: background and the four shapes
    r_min: float = 4.0  # object radius range (px) of the training and main test set
    r_max: float = 22.0
    bins: str = "4-8,8-14,14-22"  # radius bins (px) of the size ablation
    batch: int = 16
    base_steps: int = 2000  # FCN-32s from scratch (once): Adam, warm-up then cosine
    base_lr: float = 1e-3
    base_warmup: int = 100
    stage_steps: int = 150  # K: each fine-tuning stage
    regime: str = "adam"  # main regime; the "regime" ablation runs the other
    adam_lr: float = 1e-3
    sgd_lr: float = 5e-3
    dense_r: int = 4  # output stride of the dense nets (pool3 stride 1)
    learned_steps: int = 300  # fitting the learned upsampling
    eval_batch: int = 50
    data_seed: int = 3000
    exporter: str = "torchscript"
    ablations: str = "loss,upsampling,size,regime"
    device: str = "cpu"  # training: cpu, cuda or auto (CUDA when torch sees one); evaluation runs on the CPU


CONFIGS = {
    "small": Config("small"),
    # For a GPU (not run yet: no GPU was lent): 128x128 images (FCN-8s's score map 16x16,
    # dense-8s's 32x32), twice the width, four times the data, radii and bins scaled x2.
    "large": Config("large", size=128, width=8, n_train=6000, n_test=1000, n_test_bin=300, r_min=8.0, r_max=44.0,
                    bins="8-16,16-28,28-44", base_steps=6000, stage_steps=1000, learned_steps=1000, device="auto"),
    "tiny": Config("tiny", ablations="loss,upsampling,size,regime", size=32, width=2, n_train=16, n_test=8, n_test_bin=4, r_min=2.0, r_max=8.0,
                   bins="2-4,4-8", batch=4, base_steps=2, base_warmup=1, stage_steps=1, learned_steps=2,
                   eval_batch=8),
}


# ------------------------------------------------------------------------------------- data


def _bins(cfg: Config) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in b.split("-")) for b in cfg.bins.split(",") if b]  # type: ignore[misc]


def make_data(cfg: Config, root: Path) -> dict[str, str]:
    """Train/test (radius r_min..r_max) and one test set per radius bin, as .npz (reused)."""
    from samples import shapes_data as sd

    root.mkdir(parents=True, exist_ok=True)
    sets = {"train": (cfg.n_train, (cfg.r_min, cfg.r_max), cfg.data_seed),
            "test": (cfg.n_test, (cfg.r_min, cfg.r_max), cfg.data_seed + 1)}
    for k, b in enumerate(_bins(cfg)):
        sets[f"bin{k}"] = (cfg.n_test_bin, b, cfg.data_seed + 10 + k)
    paths = {}
    for name, (n, r_range, seed) in sets.items():
        key = f"{cfg.size}_{n}_{r_range[0]:g}-{r_range[1]:g}_{cfg.max_objects}_{seed}_{cfg.classes}"
        path = root / f"{name}_{key}.npz"
        paths[name] = str(path)
        if not path.exists():
            d = sd.segmentation_set(n, cfg.size, seed=seed, max_objects=cfg.max_objects, r_range=r_range)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, images=((d["images"] - MEAN) / STD).astype(np.float32), labels=(d["labels"] if cfg.classes == 5 else d["labels"] > 0).astype(np.int64))
            os.replace(tmp, path)
    return paths


def load(paths: dict[str, str], name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(paths[name]) as d:
        return d["images"], d["labels"]


# ------------------------------------------------------------------------------------- nets


def _nets():
    import torch.nn as nn

    from samples.segmentation import FCN8s, _crop, bilinear_weight
    import torch.nn.functional as F

    class FCN32s(FCN8s):
        """FCN8s's layers; the score map upsampled x32 (fixed bilinear); the skip layers unused."""

        def __init__(self, width: int, num_classes: int) -> None:
            super().__init__(width, num_classes)
            self.upscore32 = nn.ConvTranspose2d(num_classes, num_classes, 64, stride=32, bias=False)

        def _post_init(self) -> None:
            super()._post_init()
            self.upscore32.weight.copy_(bilinear_weight(self.num_classes, 64))

        def forward(self, x):
            h = self.stage5(self.stage4(self.stage3(self.stage2(self.stage1(x)))))
            h = self.score_fr(F.relu(self.fc7(F.relu(self.fc6(h)))))
            return _crop(self.upscore32(h), 16)

    class FCN16s(FCN8s):
        def __init__(self, width: int, num_classes: int) -> None:
            super().__init__(width, num_classes)
            self.upscore16 = nn.ConvTranspose2d(num_classes, num_classes, 32, stride=16, bias=False)

        def _post_init(self) -> None:
            super()._post_init()
            self.upscore16.weight.copy_(bilinear_weight(self.num_classes, 32))

        def forward(self, x):
            pool4 = self.stage4(self.stage3(self.stage2(self.stage1(x))))
            h = self.stage5(pool4)
            h = self.score_fr(F.relu(self.fc7(F.relu(self.fc6(h)))))
            fuse_pool4 = _crop(self.upscore2(h), 1) + self.score_pool4(pool4)
            return _crop(self.upscore16(fuse_pool4), 8)

    return {32: FCN32s, 16: FCN16s, 8: FCN8s}


FIXED = ("upscore32.", "upscore16.", "upscore8.")  # the fixed bilinear final upsamplings


def build(variant: int, cfg: Config, seed: int):
    from samples.zoo import _finish

    cls = _nets()[variant]
    return _finish(lambda: cls(cfg.width, cfg.classes), seed, (1, 3, cfg.size, cfg.size))


def next_stage(variant: int, cfg: Config, weights: dict[str, np.ndarray]):
    """The FCN-``variant`` net initialised from ``weights`` (ONNX names = torch names), as FCN
    goes from 32s to 16s to 8s: the new score layer zero, the new upsampling bilinear."""
    import torch

    from samples.segmentation import bilinear_weight

    net = build(variant, cfg, 0)
    state = net.state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            if name in state and not name.startswith(FIXED):
                state[name].copy_(torch.tensor(np.array(value)).reshape(state[name].shape))
        new = {16: ("score_pool4", "upscore2"), 8: ("score_pool3", "upscore_pool4")}.get(variant)
        if new and not any(k.startswith(new[0]) for k in weights):
            state[f"{new[0]}.weight"].zero_()
            state[f"{new[0]}.bias"].zero_()
            state[f"{new[1]}.weight"].copy_(bilinear_weight(cfg.classes, 4))
    net.load_state_dict(state)
    return net.eval()


def export(net, path: Path, cfg: Config) -> Path:
    from samples.export import export_onnx

    export_onnx(net, (1, 3, cfg.size, cfg.size), path, exporter=cfg.exporter, dynamic_batch=True)
    return path


def pretrained(cfg: Config, paths: dict[str, str], out: Path) -> dict[str, Any]:
    """The starting point of every seed: FCN-32s trained from scratch once (with BatchNorm,
    folded away; seed ``cfg.data_seed``), our stand-in for the paper's ImageNet VGG-16, which
    is shared by all its runs. Cached in ``OUT/data``."""
    key = f"{cfg.size}_{cfg.classes}_{cfg.width}_{cfg.n_train}_{cfg.r_min:g}-{cfg.r_max:g}_{cfg.base_steps}_{cfg.base_lr:g}_{cfg.data_seed}"
    path = out / "data" / f"fcn32s_scratch_{key}.onnx"
    info = path.with_suffix(".json")
    if path.exists() and info.exists():
        return {**json.loads(info.read_text()), "path": path, "reused": True}
    images, labels = load(paths, "train")
    net = build(32, cfg, cfg.data_seed)
    stats = train_scratch(net, cfg, cfg.data_seed, images, labels)
    tmp = path.with_name("tmp_" + path.name)
    export(net, tmp, cfg)
    os.replace(tmp, path)
    info.write_text(json.dumps(stats))
    return {**stats, "path": path, "reused": False}


def _convs(net):
    """(owner, key, conv) of every conv of the backbone and of fc6/fc7."""
    import torch.nn as nn

    for stage in (net.stage1, net.stage2, net.stage3, net.stage4, net.stage5):
        for i, m in enumerate(stage):
            if isinstance(m, (nn.Conv2d, nn.Sequential)):
                yield stage, i, m
    for name in ("fc6", "fc7"):
        yield net, name, getattr(net, name)


def add_bn(net):
    """BatchNorm after every conv of the backbone and fc6/fc7, for training from scratch (VGG-16
    depth does not train from scratch without it here); :func:`fold_bn` removes it again."""
    import torch.nn as nn

    for owner, key, conv in list(_convs(net)):
        seq = nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels))
        if isinstance(key, int):
            owner[key] = seq
        else:
            setattr(owner, key, seq)
    return net


def fold_bn(net):
    """Fold each BatchNorm into its conv (eval statistics): the plain FCN architecture again."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net.eval()
    for owner, key, seq in list(_convs(net)):
        fused = fuse_conv_bn_eval(seq[0], seq[1])
        if isinstance(key, int):
            owner[key] = fused
        else:
            setattr(owner, key, fused)
    return net


def train_scratch(net, cfg: Config, seed: int, images, labels) -> dict[str, Any]:
    """FCN-32s from scratch in plain PyTorch, with BatchNorm (folded away afterwards): Adam,
    warm-up then cosine, CE on the full output."""
    import torch
    import torch.nn.functional as F

    from onnx_dense.train import resolve_device

    device = resolve_device(cfg.device)
    add_bn(net).to(device)

    params = [p for n, p in net.named_parameters() if not n.startswith(FIXED)]
    for n, p in net.named_parameters():
        p.requires_grad_(not n.startswith(FIXED))
    opt = torch.optim.Adam(params, lr=cfg.base_lr)
    total, warm = cfg.base_steps, max(1, cfg.base_warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = np.random.default_rng([seed, 11])
    order = np.empty(0, np.int64)
    losses = []
    started = time.perf_counter()
    net.train()
    for _ in range(total):
        if len(order) < cfg.batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        idx, order = order[: cfg.batch], order[cfg.batch:]
        x, y = torch.from_numpy(images[idx]).to(device), torch.from_numpy(labels[idx]).to(device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % 200 == 0:
            print(f"  seed {seed} FCN-32s step {len(losses)}: loss {np.mean(losses[-50:]):.3f}", flush=True)
    fold_bn(net.cpu())
    return {"steps": total, "seconds": time.perf_counter() - started, "final_loss": float(np.mean(losses[-20:]))}


# --------------------------------------------------------------------------------- evaluation


def _confusion(pred, labels, k: int = N_CLASSES) -> np.ndarray:
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    keep = labels != 255
    return np.bincount(labels[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def miou(cm: np.ndarray) -> float:
    """Mean IoU (%) over the classes present in labels or predictions (as onnx_dense.train.evaluate)."""
    cm = cm.astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = union > 0
    return float(100 * (np.diag(cm)[present] / union[present]).mean()) if present.any() else math.nan


def with_output(src: Path, name: str, dst: Path) -> Path:
    """A copy of ``src`` with the value ``name`` (the score map T) added as a graph output."""
    import onnx

    m = onnx.load(str(src))
    if name not in [o.name for o in m.graph.output]:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(dst))
    return dst


def outputs(model_path: Path, images: np.ndarray, names: list[str], batch: int) -> dict[str, np.ndarray]:
    import torch

    from onnx_dense import train as dt

    module = dt.OnnxGraphModule(str(model_path)).eval()
    parts: dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for s in range(0, len(images), batch):
            out = module.run({module.input_names[0]: torch.from_numpy(images[s:s + batch])})
            for n in names:
                parts[n].append(out[n].numpy())
    return {n: np.concatenate(v) for n, v in parts.items()}


def upsample(scores: np.ndarray, geometry, size: int, mode: str) -> np.ndarray:
    """Score maps (N, K, h, w) to (N, K, size, size): "bilinear" (each prediction at its
    receptive-field centre, clamped at the border) or "nearest" (each pixel takes its nearest
    prediction)."""
    import torch

    from onnx_dense.train.losses import upsample_scores

    t = torch.from_numpy(scores)
    if mode == "bilinear":
        return upsample_scores(t, (size, size), geometry).numpy()
    idx = []
    for k, n in enumerate(scores.shape[2:]):
        c = geometry.centres(k, n).numpy()
        idx.append(np.abs(np.arange(size)[:, None] - c[None, :]).argmin(axis=1))
    return scores[:, :, idx[0][:, None], idx[1][None, :]]


def at_centres(scores: np.ndarray, labels: np.ndarray, geometry) -> np.ndarray:
    import torch

    from onnx_dense.train.losses import sample_labels

    lab = sample_labels(torch.from_numpy(labels), scores.shape[2:], geometry).numpy()
    return _confusion(scores.argmax(1), lab)


def fit_learned(scores: np.ndarray, labels: np.ndarray, stride: int, offset: int, cfg: Config, seed: int):
    """A ConvTranspose(2s x 2s / s) + crop fitted (Adam) on training-set score maps, the net frozen;
    bilinear-initialised. Returns a function scores -> upsampled scores."""
    import torch
    import torch.nn.functional as F

    from samples.segmentation import bilinear_weight

    torch.manual_seed(seed)
    w = bilinear_weight(scores.shape[1], 2 * stride).clone().requires_grad_(True)
    size = labels.shape[-1]

    def up(x):
        y = F.conv_transpose2d(x, w, stride=stride)
        return y[:, :, offset:offset + size, offset:offset + size]

    opt = torch.optim.Adam([w], lr=1e-3)
    rng = np.random.default_rng([seed, 13])
    xs, ys = torch.from_numpy(scores), torch.from_numpy(labels)
    for _ in range(cfg.learned_steps):
        idx = torch.from_numpy(rng.integers(0, len(xs), 64))
        loss = F.cross_entropy(up(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def apply(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return up(torch.from_numpy(x)).numpy()

    return apply


# ------------------------------------------------------------------------------------ chains


def _ft(cfg: Config, regime: str, seed: int) -> dict[str, Any]:
    lr = cfg.adam_lr if regime == "adam" else cfg.sgd_lr
    return dict(task="segmentation", steps=cfg.stage_steps, batch_size=cfg.batch, lr=lr,
                optimizer=regime, momentum=0.9, schedule="cosine" if regime == "adam" else "constant",
                seed=seed, device=cfg.device, progress=False, trainable=lambda n: not n.startswith(FIXED))


def chains(cfg: Config, seed: int, work: Path, fcn32: Path, data, regime: str, loss_on: str,
           baseline: dict | None, times: dict) -> dict[str, Any]:
    """The baseline chain (FCN-16s, FCN-8s, control) unless ``baseline`` is given, and the dense
    chain (dense-32s, -16s, -8s, dpoa-8s) with the loss on the full output ("output") or on
    the dense score map ("dense")."""
    import onnx

    from onnx_dense import api
    from onnx_dense import train as dt

    work.mkdir(parents=True, exist_ok=True)
    ft = _ft(cfg, regime, seed)
    models: dict[str, Any] = {}
    if baseline is None:
        t = time.perf_counter()
        weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(fcn32)).graph.initializer}
        for v in (16, 8):
            path = export(next_stage(v, cfg, weights), work / f"fcn{v}s_init.onnx", cfg)
            res = dt.train(str(path), data=data, label_mode="upsample", **ft)
            out = work / f"fcn{v}s.onnx"
            res.save_onnx(out)
            weights = res.state_dict_onnx()
            models[f"fcn{v}s"] = out
            print(f"  seed {seed} {regime} FCN-{v}s: loss {res.final_loss:.3f}", flush=True)
        control = dt.train(str(models["fcn8s"]), data=data, label_mode="upsample", **ft)
        control.save_onnx(work / "control.onnx")
        models["control"] = work / "control.onnx"
        times["baseline_chain"] = time.perf_counter() - t
    else:
        models.update(baseline)
    t = time.perf_counter()
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(fcn32)).graph.initializer}
    tag = "" if loss_on == "output" else "_T"
    for v in (32, 16, 8):
        orig = fcn32 if v == 32 else export(next_stage(v, cfg, weights), work / f"fcn{v}s_from_dense{tag}.onnx", cfg)
        dense = work / f"dense{v}s{tag}_init.onnx"
        api.rewrite(orig, dense, output_stride=cfg.dense_r)
        if loss_on == "output":
            res = dt.train(str(dense), data=data, label_mode="upsample", **ft)
        else:
            score = _score_name(dense)
            res = dt.train(str(dense), data=data, label_mode="sample", output=score,
                           geometry=score_geometry(cfg.dense_r, v), **ft)
        out = work / f"dense{v}s{tag}.onnx"
        res.save_onnx(out)
        weights = res.state_dict_onnx()
        models[f"dense{v}s{tag}"] = out
        print(f"  seed {seed} {regime} dense-{v}s{tag}: loss {res.final_loss:.3f}", flush=True)
        models[f"dense{v}s{tag}_skeleton"] = dense
    if loss_on == "output":  # dpoa at the earlier stages too: dense-32s into FCN-32s, dense-16s into FCN-16s
        for v, into in ((32, fcn32), (16, models["fcn16s"])):
            path = work / f"dpoa{v}s.onnx"
            w = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(models[f"dense{v}s"])).graph.initializer}
            w.update({i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(into)).graph.initializer
                      if i.name.startswith(FIXED)})
            dt.export_dpoa(str(into), w, str(path))
            models[f"dpoa{v}s"] = path
    dpoa = work / f"dpoa8s{tag}.onnx"
    # The dense weights lack upscore8's kernel (the rewrite rebuilt that fixed bilinear
    # upsampling by the remaining factor): export_dpoa keeps the original's own.
    exp = dt.export_dpoa(str(models["fcn8s"]), {k: np.asarray(v) for k, v in weights.items()}, str(dpoa))
    models[f"dpoa8s{tag}"] = dpoa
    models[f"dpoa8s{tag}_check"] = {
        "replaced": exp.replaced, "changed": exp.changed,
        "same_initializers": _inits(dpoa) == _inits(models["fcn8s"]),
        "verify": bool(api.verify(str(dpoa), str(models[f"dense8s{tag}"]))),
    }
    times[f"dense_chain{tag}"] = time.perf_counter() - t
    return models


def score_geometry(stride: int, variant: int = 8):
    """Where the score map's predictions sit: prediction i at pixel (variant - 1) / 2 + stride * i.

    FCN-xs's score map is aligned with the cells of its last pool (FCN-8s's fuse_pool3 with
    pool3: cell i covers pixels 8i..8i+7, centre 8i + 3.5; the upscore kernels are bilinear
    around the same centres), and the rewrite keeps dense prediction (x/stride) i equal to
    the original's i. The dense model's metadata puts the fused score map's prediction 0 at
    the same 3.5 px (tests/test_receptive_field.py); before the analysis placed a transposed
    kernel's output where its pads put it, it said 39.5 px, so the experiment kept its own
    geometry, as it still does (its recorded numbers do not move).
    """
    from onnx_dense.train.losses import Geometry

    return Geometry((2, 3), (stride, stride), (0, 0), (variant, variant))


def _inits(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    import onnx

    return sorted((i.name, tuple(i.dims)) for i in onnx.load(str(path)).graph.initializer)


def _score_name(dense: Path) -> str:
    """The dense score map T the final upsampling was rebuilt on."""
    from onnx_dense import metadata, model_io

    info = metadata.read(model_io.load(str(dense)))
    return next(o.upsampling["score"] for o in info.outputs.values() if o.upsampling)


# ------------------------------------------------------------------------------------ a seed


def run_seed(seed: int, cfg: Config, paths: dict[str, str], out: Path, threads: int = 1) -> dict[str, Any]:
    import torch

    from onnx_dense import train as dt

    torch.set_num_threads(threads)
    started = time.perf_counter()
    abl = {a for a in cfg.ablations.split(",") if a}
    work = out / "models" / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    images, labels = load(paths, "train")
    test = load(paths, "test")
    times: dict[str, float] = {}
    res: dict[str, Any] = {"seed": seed, "times": times}

    data = (images, labels)
    t = time.perf_counter()
    res["pretrained"] = pretrained(cfg, paths, out)
    res["pretrained_path"] = str(res["pretrained"].pop("path"))
    ft = _ft(cfg, cfg.regime, seed)
    fcn32_res = dt.train(res["pretrained_path"], data=data, label_mode="upsample", **ft)
    fcn32 = work / f"fcn32s_{cfg.regime}.onnx"
    fcn32_res.save_onnx(fcn32)
    print(f"  seed {seed} {cfg.regime} FCN-32s: loss {fcn32_res.final_loss:.3f}", flush=True)
    times["fcn32s"] = time.perf_counter() - t

    main = chains(cfg, seed, work / cfg.regime, fcn32, data, cfg.regime, "output", None, times)
    main["fcn32s"] = fcn32
    runs = {cfg.regime: main}
    if "loss" in abl:
        base = {k: main[k] for k in ("fcn16s", "fcn8s", "control")}
        main.update({k: v for k, v in chains(cfg, seed, work / cfg.regime, fcn32, data, cfg.regime, "dense",
                                             base, times).items() if k.endswith(("_T", "_T_check", "_T_skeleton"))})
    if "regime" in abl:
        other = "sgd" if cfg.regime == "adam" else "adam"
        t2: dict[str, float] = {}
        r32 = dt.train(res["pretrained_path"], data=data, label_mode="upsample", **_ft(cfg, other, seed))
        fcn32_other = work / f"fcn32s_{other}.onnx"
        r32.save_onnx(fcn32_other)
        runs[other] = chains(cfg, seed, work / other, fcn32_other, data, other, "output", None, t2)
        runs[other]["fcn32s"] = fcn32_other
        times.update({f"{k}_{other}": v for k, v in t2.items()})

    t = time.perf_counter()
    dense8 = main["dense8s_skeleton"]
    score = _score_name(dense8)
    geo_dense, geo_orig = score_geometry(cfg.dense_r), score_geometry(8)
    meta = dt.geometry_from(str(dense8), score, original=True)
    res["score_map"] = {"name": score, "original_stride": list(geo_orig.stride), "dense_stride": list(geo_dense.stride),
                        "metadata_rf_centre": meta.rf_start[0] + (meta.rf_size[0] - 1) / 2}

    def full_miou(path: Path, ds) -> float:
        o = outputs(path, ds[0], ["output"], cfg.eval_batch)["output"]
        return miou(_confusion(o.argmax(1), ds[1]))

    res["metrics"] = {}
    for regime, models in runs.items():
        keys = [k for k, v in models.items() if isinstance(v, Path) and not k.endswith("_skeleton")]
        res["metrics"][regime] = {k: full_miou(models[k], test) for k in keys}
        res["dpoa_check"] = res.get("dpoa_check", {})
        for k, v in models.items():
            if k.endswith("_check"):
                res["dpoa_check"][f"{regime}:{k[:-6]}"] = v
    times["evaluate"] = time.perf_counter() - t

    finals = [k for k in ("fcn8s", "control", "dpoa8s", "dense8s", "dpoa8s_T", "dense8s_T") if k in main]
    if "upsampling" in abl:
        t = time.perf_counter()
        ups: dict[str, dict[str, float]] = {}
        for k in finals:
            dense = k.startswith("dense")
            geo = geo_dense if dense else geo_orig
            path = main[k] if dense else with_output(main[k], score, work / f"{k}_with_T.onnx")
            fit = slice(0, min(len(images), 500))  # the learned upsampling is fitted on these
            train_t = outputs(path, images[fit], [score], cfg.eval_batch)[score]
            o = outputs(path, test[0], ["output", score], cfg.eval_batch)
            stride = int(geo.stride[0])
            learned = fit_learned(train_t, labels[fit], stride, stride // 2, cfg, seed)
            ups[k] = {
                "model": miou(_confusion(o["output"].argmax(1), test[1])),
                "bilinear": miou(_confusion(upsample(o[score], geo, cfg.size, "bilinear").argmax(1), test[1])),
                "nearest": miou(_confusion(upsample(o[score], geo, cfg.size, "nearest").argmax(1), test[1])),
                "learned": miou(_confusion(learned(o[score]).argmax(1), test[1])),
                "at_centres": miou(at_centres(o[score], test[1], geo)),
            }
        res["upsampling"] = ups
        times["upsampling"] = time.perf_counter() - t
    if "size" in abl:
        t = time.perf_counter()
        res["size"] = {}
        for b in range(len(_bins(cfg))):
            ds = load(paths, f"bin{b}")
            res["size"][f"bin{b}"] = {k: full_miou(main[k], ds) for k in finals}
        times["size"] = time.perf_counter() - t
    res["seconds"] = time.perf_counter() - started
    return res


# ------------------------------------------------------------------------------------- report


def _fmt(values, digits: int = 1) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _per_seed(values) -> str:
    return ", ".join(f"{v:+.1f}" for v in values)


TITLES = {
    "fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s", "control": "FCN-8s +K (control)",
    "dense32s": "dense-32s", "dense16s": "dense-16s", "dense8s": "dense-8s",
    "dpoa32s": "dpoa-32s", "dpoa16s": "dpoa-16s", "dpoa8s": "dpoa-8s",
    "dense32s_T": "dense-32s (loss on T)", "dense16s_T": "dense-16s (loss on T)", "dense8s_T": "dense-8s (loss on T)",
    "dpoa8s_T": "dpoa-8s (loss on T)",
}


def report(payload: dict) -> str:
    cfg = Config(**payload["config"])
    runs = payload["runs"]
    seeds = [r["seed"] for r in runs]
    lines = [f"Mean IoU (%) on {cfg.n_test} held-out images, mean ± std over seeds {', '.join(map(str, seeds))}:", ""]
    regimes = list(runs[0]["metrics"])
    lines += ["| model | " + " | ".join(REGIMES[r] for r in regimes) + " |", "|---|" + "---|" * len(regimes)]
    for k, title in TITLES.items():
        if any(k in runs[0]["metrics"][r] for r in regimes):
            cells = [_fmt([x["metrics"][r][k] for x in runs]) if k in runs[0]["metrics"][r] else "—" for r in regimes]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "Differences seed by seed (mean ± std; the values per seed):", ""]
    lines += ["| difference | regime | mean ± std | per seed |", "|---|---|---|---|"]
    pairs = [("dpoa8s", "fcn8s"), ("dpoa8s", "control"), ("dense8s", "control"), ("control", "fcn8s"),
             ("dense8s", "fcn8s"), ("fcn8s", "fcn32s"), ("dense32s", "fcn32s"), ("dpoa32s", "fcn32s"),
             ("dense16s", "fcn16s"), ("dpoa16s", "fcn16s"), ("dpoa8s_T", "control"),
             ("dense8s_T", "control")]
    for r in regimes:
        for a, b in pairs:
            if a in runs[0]["metrics"][r] and b in runs[0]["metrics"][r]:
                d = [x["metrics"][r][a] - x["metrics"][r][b] for x in runs]
                lines.append(f"| {TITLES[a]} − {TITLES[b]} | {REGIMES[r]} | {_fmt(d)} | {_per_seed(d)} |")
    if "upsampling" in runs[0]:
        cols = ("model", "bilinear", "nearest", "learned", "at_centres")
        lines += ["", f"Upsampling at evaluation ({REGIMES[cfg.regime]}): the same score map T upsampled by the "
                  "model's own fixed bilinear ConvTranspose, bilinearly (predictions at their receptive-field "
                  "centres), nearest, by a learned ConvTranspose (fitted on the training set, net frozen), and "
                  "T scored at its own pixels:", ""]
        lines += ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for k in runs[0]["upsampling"]:
            lines.append(f"| {TITLES[k]} | " + " | ".join(_fmt([x["upsampling"][k][c] for x in runs]) for c in cols) + " |")
        for c in cols:
            if "dpoa8s" in runs[0]["upsampling"]:
                d = [x["upsampling"]["dpoa8s"][c] - x["upsampling"]["control"][c] for x in runs]
                lines.append(f"\ndpoa-8s − control, {c}: {_fmt(d)} ({_per_seed(d)})")
    if "size" in runs[0]:
        bins = _bins(cfg)
        ks = list(runs[0]["size"]["bin0"])
        lines += ["", f"Object size ({REGIMES[cfg.regime]}; {cfg.n_test_bin} test images per bin, radius in px; "
                  "FCN-8s predicts every 8 px, dense-8s every "
                  f"{cfg.dense_r} px):", ""]
        lines += ["| radius | " + " | ".join(TITLES[k] for k in ks) + " | dpoa-8s − control |", "|---|" + "---|" * (len(ks) + 1)]
        for b, (lo, hi) in enumerate(bins):
            cells = [_fmt([x["size"][f"bin{b}"][k] for x in runs]) for k in ks]
            d = [x["size"][f"bin{b}"]["dpoa8s"] - x["size"][f"bin{b}"]["control"] for x in runs]
            lines.append(f"| {lo:g}–{hi:g} | " + " | ".join(cells) + f" | {_fmt(d)} ({_per_seed(d)}) |")
    checks = [c for x in runs for c in x["dpoa_check"].values()]
    lines += ["", f"dpoa checks: {sum(c['same_initializers'] for c in checks)}/{len(checks)} with FCN-8s's initializer "
              f"names and shapes, {sum(c['verify'] for c in checks)}/{len(checks)} verified equal to their dense-8s "
              "sampled every 2nd prediction."]
    per_seed = ", ".join(f"{x['seconds'] / 60:.1f}" for x in runs)
    cpu = f", CPU time {payload['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in payload else ""
    load = f", load average at the end {payload['load_average'][1]:.1f}" if "load_average" in payload else ""
    lines += ["", f"Wall time {payload['wall_seconds'] / 60:.1f} min ({payload['threads']} thread(s); per seed "
              f"{per_seed} min{cpu}{load}) on {payload['machine']}.", "",
              f"`{payload['command']}`", ""]
    return "\n".join(lines)


def _machine(cfg: Config) -> str:
    """The CPU (evaluation, and training on --device cpu) and the GPU that trained, if one did."""
    import torch

    from samples.experiments import _machine as m

    from onnx_dense.train import resolve_device

    device = resolve_device(cfg.device)
    return m() + (f"; training on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m samples.fcn8s_experiment", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=None, help="default: exp_fcn8s_CONFIG")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="training device: cpu, cuda, auto (default: the config's)")
    ap.add_argument("--ablations", default=None, help="comma-separated subset of loss,upsampling,size,regime ('' for none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--report", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    args = ap.parse_args(argv)
    out: Path = args.out or Path(f"exp_fcn8s_{args.config}")
    if args.report:
        from samples.experiments import rewrite_report

        return rewrite_report(ap, out, report)
    from samples.experiments import parse_overrides

    overrides = parse_overrides(args.set, Config)
    if args.ablations is not None:
        overrides["ablations"] = args.ablations
    if args.device:
        overrides["device"] = args.device
    cfg = dataclasses.replace(CONFIGS[args.config], **overrides)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.perf_counter(), time.process_time()
    print(f"config {json.dumps(dataclasses.asdict(cfg))}", flush=True)
    paths = make_data(cfg, out / "data")
    data_seconds = time.perf_counter() - started
    print(f"data: {data_seconds:.0f} s", flush=True)
    runs = []
    command = f"python -m samples.fcn8s_experiment --config {cfg.name} --seeds {args.seeds} --out {out}"
    if args.ablations is not None:
        command += f" --ablations '{args.ablations}'"
    command += "".join(f" --set {s}" for s in args.set) + (f" --device {args.device}" if args.device else "")
    for seed in seeds:
        r = run_seed(seed, cfg, paths, out, args.threads)
        runs.append(r)
        print(f"seed {seed}: {json.dumps(r['metrics'])} ({r['seconds']:.0f} s)", flush=True)
        payload = {"config": dataclasses.asdict(cfg), "seeds": seeds, "command": command, "threads": args.threads,
                   "wall_seconds": time.perf_counter() - started, "data_seconds": data_seconds,
                   "cpu_seconds": time.process_time() - cpu0, "load_average": os.getloadavg(),
                   "machine": _machine(cfg), "runs": runs}
        (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))  # after every seed
    from samples.experiments import write_results

    write_results(out, payload, report, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
