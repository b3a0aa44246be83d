"""The classification and regression experiments (the paper's 3.3 and 3.4) with the paper's protocol.

    python -m samples.cls_reg_paper --config small --seeds 0,1,2 --out exp_cls_reg_small

:mod:`samples.experiments` trains its cls/reg baselines from scratch on 3000 images, at the
same size in training and test, with Adam and a cosine decay. The paper did otherwise; this
runner follows it as closely as a 2-core CPU allows, reusing that module's net, data, training
and table code:

* **pretrained, then fine-tuned on a small target set.** One source net (the same VGG-like
  net, shared by every seed as the paper's one ImageNet VGG-16 or VGG-Face) is trained from
  scratch on ``n_source`` images of *other* shapes (:data:`samples.shapes_data.SOURCE_CLASSES`:
  ellipse, hexagon, bar, semicircle; at full size: on random crops it had not left chance
  after 1500 steps), then its last layer (fc8) is replaced and the baseline is
  fine-tuned on the target: ``cls_per_class`` images per class for classification (Indoor-67:
  ~80), ``n_reg`` images for regression (ChaLearn: 2476).
* **cls: random crops at the size where the baseline gives one prediction, tested larger.**
  The baseline is fine-tuned on random ``crop`` x ``crop`` windows of the ``size`` x ``size``
  training images (48 of 64: one prediction, as VGG-16 on 224 of 256) and tested on the full
  images (2x2 predictions averaged, as VGG-16 on 256). The dense net (the paper's pool4 stride
  1: 5x5 predictions at 64) is fine-tuned on the full training images and tested on them.
  At the crop size the dense net gives one prediction too: this rewrite is exact, so a dense
  net has ``(n - 1) * r + 1`` predictions where the original has ``n``; the paper's 31x31 at 256
  (27x27 at 224 for VGG-Face) include predictions whose window hangs over the border.
* **reg: centred ("aligned") objects, imperfectly.** Each object is centred with a uniform
  offset of up to ``jitter`` px per axis (the paper's detected, cropped, aligned faces), its
  radius scaled to [-1, 1], tanh, L1, as :mod:`samples.experiments`. Train and test at
  ``size`` (2x2 predictions for the baseline, 5x5 for the dense net; the paper's 224 gives VGG-Face
  one prediction, which here would give the dense net one too, see above).
* **fine-tuning with SGD, momentum 0.9, a small fixed learning rate** (Caffe's fine-tuning):
  the baseline's own fine-tuning, the control and the dense net. BatchNorm (which the paper's
  VGGs do not have; it helps the source net train from scratch) keeps its source statistics
  during every fine-tuning stage, as the exported, folded net does.

Columns: **baseline**; **control** (the baseline fine-tuned K more steps the same way: on crops
for cls); **control at full size** (cls only: K more steps on the full training images, as the
dense net gets: without it a dpoa gain may come from training at the test size rather than from
density); **dense**; **dpoa** (checked with :func:`onnx_dense.verify` against the trained
dense net); **dense, not fine-tuned**.

Variants (``--variants``; the first of each task is the main protocol, the rest ablations):
``cls`` (as above), ``cls-full`` (no crops: baseline, control and dense all fine-tuned on the
full images), ``cls-adam`` (as ``cls`` with Adam, the same ``lr``, and a cosine decay in every
fine-tuning stage), ``reg-jJ`` (regression with jitter J px, e.g. ``reg-j4``; ``reg-any``: objects
anywhere, as in :mod:`samples.experiments`).

Runs in one process, one torch thread (``--threads``); the data is drawn once (``data_seed``),
the source net once (``source_seed``; kept with the data in ``OUT/data`` and reused); the
seed sets the new fc8's initial weights, every batch order and every crop. ``OUT/results.json`` holds
every number and time, ``OUT/results.md`` the tables; ``--report`` rewrites the latter.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from samples import experiments as ex

COLUMNS = ("baseline", "control", "control_full", "dense", "dpoa", "dense0")
TITLES = {**ex.COLUMN_TITLES, "control_full": "control at full size"}
_PAIRS = (
    ("control", "baseline"), ("dense", "control"), ("dpoa", "control"), ("dpoa", "baseline"),
    ("dense", "dpoa"), ("control_full", "control"), ("dense", "control_full"), ("dpoa", "control_full"),
)


@dataclasses.dataclass(frozen=True)
class PaperConfig:
    name: str
    size: int = 64  # test size, and the dense net's training size
    crop: int = 48  # cls training crops: the size where the baseline gives one prediction
    stages: int = 4
    convs: int = 2
    width: int = 8
    fc_width: int = 64
    removed: int = 2  # the paper's pool4 stride 1: output stride 16 -> 4
    n_source: int = 3000  # source task (other shapes, anywhere): pretraining images
    source_steps: int = 2500  # from scratch: Adam, warm-up, cosine
    source_lr: float = 1e-3
    source_warmup: int = 100
    source_crop: int = 0  # 0: full-size images (on 48 crops it stayed at chance for 1500 steps)
    source_seed: int = 0  # one source net for every seed
    cls_per_class: int = 30  # target training images per class (4 classes)
    n_cls_test: int = 1000
    n_reg: int = 400  # target regression training images
    n_reg_test: int = 500
    target_steps: int = 300  # the baseline's own fine-tuning on the target
    ft_steps: int = 300  # K: control, control at full size, dense
    optimizer: str = "sgd"
    lr: float = 1e-3  # fixed (schedule constant): chosen with --lr-check (docs/cls_reg_results.md)
    momentum: float = 0.9
    schedule: str = "constant"
    batch: int = 16
    eval_batch: int = 50
    data_seed: int = 2000
    exporter: str = "torchscript"
    device: str = "cpu"

    def net_config(self) -> ex.Config:
        """The :class:`samples.experiments.Config` of the same net (build_net, radius_range, ...)."""
        return ex.Config(self.name, size=self.size, stages=self.stages, convs=self.convs, width=self.width,
                         fc_width=self.fc_width, removed=self.removed, batch=self.batch, base_steps=self.source_steps,
                         base_lr=self.source_lr, base_warmup=self.source_warmup, eval_batch=self.eval_batch,
                         exporter=self.exporter, device=self.device)


CONFIGS = {
    "small": PaperConfig("small"),
    # the test suite's end-to-end run: seconds
    "tiny": PaperConfig("tiny", size=32, crop=24, stages=3, convs=1, width=4, fc_width=8, removed=1, n_source=24,
                        source_steps=3, source_warmup=1, cls_per_class=2, n_cls_test=8, n_reg=8, n_reg_test=8,
                        target_steps=2, ft_steps=2, batch=4, eval_batch=8),
}
DEFAULT_VARIANTS = "cls,cls-full,cls-adam,reg-j4,reg-j0,reg-j8,reg-any"


def parse_variant(v: str) -> tuple[str, Any]:
    """'cls' / 'cls-full' / 'cls-adam' -> ('cls', mode); 'reg-j4' -> ('reg', 4.0); 'reg-any' -> ('reg', None)."""
    if v in ("cls", "cls-full", "cls-adam"):
        return "cls", v.partition("-")[2] or "crop"
    if v == "reg-any":
        return "reg", None
    if v.startswith("reg-j"):
        try:
            return "reg", float(v[5:])
        except ValueError:
            pass
    raise SystemExit(f"--variants: unknown {v!r}; known: cls, cls-full, cls-adam, reg-jJ (J px of jitter), reg-any")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _draw(pc: PaperConfig, name: str) -> dict[str, np.ndarray]:
    from samples import shapes_data as sd

    r_range = ex.radius_range(pc.net_config())
    kw: dict[str, Any] = {"r_range": r_range}
    if name == "source":
        n, seed, kw["kinds"] = pc.n_source, pc.data_seed + 2, sd.SOURCE_CLASSES
    elif name in ("cls_train", "cls_test"):
        n, seed = (4 * pc.cls_per_class, pc.data_seed) if name == "cls_train" else (pc.n_cls_test, pc.data_seed + 1)
    else:  # reg_{train,test}_{jJ,any}
        _, split, where = name.split("_")
        n, seed = (pc.n_reg, pc.data_seed + 3) if split == "train" else (pc.n_reg_test, pc.data_seed + 4)
        kw["centre_jitter"] = None if where == "any" else float(where[1:])
    d = sd.object_set(n, pc.size, seed=seed, **kw)
    labels = ex.radius_targets(pc.net_config(), d["radius"]) if name.startswith("reg") else d["classes"].astype(np.int64)
    return {"images": ex._normalise(d["images"]), "labels": labels}


def data(pc: PaperConfig, root: Path, name: str, timing: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one set, drawn once and kept in ``root``."""
    keys = {k: getattr(pc, k) for k in ("size", "n_source", "cls_per_class", "n_cls_test", "n_reg", "n_reg_test", "data_seed")}
    path = root / f"{name}_{hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]}.npz"
    if not path.exists():
        t = time.perf_counter()
        arrays = _draw(pc, name)
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        timing["data"] = timing.get("data", 0.0) + time.perf_counter() - t
    with np.load(path) as d:
        return d["images"], d["labels"]


# --------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------


def pretrain(pc: PaperConfig, root: Path, timing: dict[str, float]):
    """The source net, trained once and shared by every seed (as the paper's one ImageNet
    VGG-16 or VGG-Face): from scratch on the other shapes, Adam + warm-up + cosine (the
    from-scratch recipe of :mod:`samples.experiments`), at full size (``source_crop`` 0) or on
    random crops. Kept in ``root`` and reused by a later run with the same settings."""
    import torch

    keys = {k: getattr(pc, k) for k in ("size", "stages", "convs", "width", "fc_width", "n_source", "source_steps",
                                         "source_lr", "source_warmup", "source_crop", "source_seed", "batch", "data_seed")}
    path = root / f"source_{hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]}.pt"
    cfg = pc.net_config()
    net = ex.build_net(cfg, "cls", pc.source_seed)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        net.load_state_dict(saved["state"])
        net.eval()
        return net, saved["stats"]
    images, labels = data(pc, root, "source", timing)
    t = time.perf_counter()
    stats = ex.train_baseline(net, "cls", cfg, pc.source_seed, images, labels, None, "cpu", crop=pc.source_crop or None)
    x = torch.from_numpy(images[:500])
    with torch.no_grad():
        stats["train_accuracy_first_500"] = 100.0 * float((net(x).mean(dim=(2, 3)).argmax(1).numpy() == labels[:500]).mean())
    timing["pretraining"] = time.perf_counter() - t
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state": net.state_dict(), "stats": stats}, tmp)
    os.replace(tmp, path)
    return net, stats


def transfer(source, task: str, pc: PaperConfig, seed: int):
    """A target net: the source net's weights, a new last layer (fc8) for the task."""
    import torch

    net = ex.build_net(pc.net_config(), task, seed)
    own = net.state_dict()
    last = [k for k in own if k.startswith("head.6.")]
    state = {k: v.clone() for k, v in source.state_dict().items() if k not in last}
    net.load_state_dict({**state, **{k: own[k] for k in last}})
    net.eval()
    assert torch.equal(net.head[0].weight, source.head[0].weight)
    return net


def run_variant(variant: str, seed: int, pc: PaperConfig, source, root: Path, out: Path) -> dict:
    """Baseline (fine-tuned from the source net), control(s), dense, dpoa, dense0 for one variant and seed."""
    from onnx_dense import api
    from onnx_dense import train as dt
    from samples.export import export_onnx

    task, mode = parse_variant(variant)
    started = time.perf_counter()
    res: dict[str, Any] = {"task": task, "variant": variant, "seed": seed, "metrics": {}, "times": {}}
    timing = res["times"]
    cfg = pc.net_config()
    if task == "cls":
        images, labels = data(pc, root, "cls_train", timing)
        test_images, test_labels = data(pc, root, "cls_test", timing)
    else:
        where = "any" if mode is None else f"j{mode:g}"
        images, labels = data(pc, root, f"reg_train_{where}", timing)
        test_images, test_labels = data(pc, root, f"reg_test_{where}", timing)
    crops = task == "cls" and mode in ("crop", "adam")
    optimizer, schedule = ("adam", "cosine") if mode == "adam" else (pc.optimizer, pc.schedule)
    work = out / "models" / f"{variant}_seed{seed}"
    work.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    net = transfer(source, task, pc, seed)
    res["baseline_training"] = ex.train_baseline(
        net, task, cfg, seed, images, labels, None, "cpu", steps=pc.target_steps, lr=pc.lr, warmup=1,
        optimizer=optimizer, momentum=pc.momentum, schedule=schedule, crop=pc.crop if crops else None, bn_train=False)
    timing["baseline_training"] = time.perf_counter() - t
    base, base_crop, dense = work / "baseline.onnx", work / "baseline_crop.onnx", work / "dense.onnx"
    export_onnx(net, (1, 3, pc.size, pc.size), base, exporter=pc.exporter, dynamic_batch=True)
    api.rewrite(base, dense, output_stride=cfg.output_stride(task))
    geo = dt.geometry_from(str(dense), original=True)
    res["predictions"] = {"baseline": _grid(base, pc.size), "dense": _grid(dense, pc.size)}
    ft = dict(task=ex.TRAIN_TASKS[task], steps=pc.ft_steps, lr=pc.lr, batch_size=pc.batch, optimizer=optimizer,
              momentum=pc.momentum, schedule=schedule, label_mode="upsample", seed=seed, device="cpu", progress=False)

    def evaluate(model, geometry=None) -> float:
        m = dt.evaluate(model, task=ex.TRAIN_TASKS[task], data=(test_images, test_labels), batch_size=pc.eval_batch,
                        device="cpu", label_mode="upsample", geometry=geometry)
        return ex._metric(task, cfg, m)

    t = time.perf_counter()
    res["metrics"]["baseline"] = evaluate(str(base), geo)
    res["metrics"]["dense0"] = evaluate(str(dense))
    timing["evaluate_before"] = time.perf_counter() - t

    t = time.perf_counter()
    if crops:
        # the baseline's own protocol continued: the net at the crop size (one prediction), K
        # steps on random crops (drawn up front: every step its own crops), its weights then
        # written into the full-size graph (same names) to be tested as the baseline is
        export_onnx(net, (1, 3, pc.crop, pc.crop), base_crop, exporter=pc.exporter, dynamic_batch=True)
        rng = np.random.default_rng([seed, 9])
        idx = rng.integers(0, len(images), pc.ft_steps * pc.batch)
        control = dt.train(str(base_crop), data=(ex.random_crops(images[idx], pc.crop, rng), labels[idx]), **ft)
        dt.export_dpoa(str(base), control.state_dict_onnx(), str(work / "control.onnx"))
        res["predictions"]["baseline_at_crop"] = _grid(base_crop, pc.crop)
    else:
        control = dt.train(str(base), data=(images, labels), geometry=geo, **ft)
        control.save_onnx(work / "control.onnx")
    timing["control_training"] = time.perf_counter() - t
    if crops:
        t = time.perf_counter()
        control_full = dt.train(str(base), data=(images, labels), geometry=geo, **ft)
        control_full.save_onnx(work / "control_full.onnx")
        timing["control_full_training"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = dt.train(str(dense), data=(images, labels), **ft)
    timing["dense_training"] = time.perf_counter() - t
    res["fine_tune"] = {"control_final_loss": control.final_loss, "dense_final_loss": trained.final_loss}

    t = time.perf_counter()
    dpoa, dense_trained = work / "dpoa.onnx", work / "dense_trained.onnx"
    trained.save_onnx(dense_trained)
    export = dt.export_dpoa(str(base), trained.state_dict_onnx(), str(dpoa))
    res["dpoa"] = {"replaced": export.replaced, "changed": export.changed,
                   "equivalent_to_trained_dense": bool(api.verify(str(dpoa), str(dense_trained)))}
    timing["export_verify"] = time.perf_counter() - t

    t = time.perf_counter()
    res["metrics"]["control"] = evaluate(str(work / "control.onnx"), geo)
    if crops:
        res["metrics"]["control_full"] = evaluate(str(work / "control_full.onnx"), geo)
    res["metrics"]["dense"] = evaluate(trained.model)
    res["metrics"]["dpoa"] = evaluate(str(dpoa), geo)
    timing["evaluate_after"] = time.perf_counter() - t
    res["seconds"] = time.perf_counter() - started
    return res


def _grid(path: Path, size: int) -> list[int]:
    """The prediction map's spatial size of the ONNX model at ``path`` on a size x size image."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, size, size), np.float32)
    return list(s.run(None, {s.get_inputs()[0].name: x})[0].shape[2:])


def lr_check(pc: PaperConfig, rates: list[float], root: Path) -> dict[str, float]:
    """The one short check that picks the fixed SGD learning rate: seed 0's source net, the cls
    baseline fine-tuned (crops) with each rate, scored on a validation set (drawn from
    ``data_seed + 5``, never the test set)."""
    from samples import shapes_data as sd

    timing: dict[str, float] = {}
    source, _ = pretrain(pc, root, timing)
    images, labels = data(pc, root, "cls_train", timing)
    v = sd.object_set(400, pc.size, seed=pc.data_seed + 5, r_range=ex.radius_range(pc.net_config()))
    val_x, val_y = ex._normalise(v["images"]), v["classes"]
    import torch

    scores = {}
    for lr in rates:
        net = transfer(source, "cls", pc, 0)
        ex.train_baseline(net, "cls", pc.net_config(), 0, images, labels, None, "cpu", steps=pc.target_steps, lr=lr,
                          warmup=1, optimizer="sgd", momentum=pc.momentum, schedule="constant", crop=pc.crop, bn_train=False)
        with torch.no_grad():
            logits = net(torch.from_numpy(val_x)).mean(dim=(2, 3))
        scores[f"{lr:g}"] = 100.0 * float((logits.argmax(1).numpy() == val_y).mean())
        print(f"lr {lr:g}: validation accuracy {scores[f'{lr:g}']:.1f}%", flush=True)
    return scores


# --------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------


def _signed(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:+.{digits}f}" for v in values)


def report(payload: dict) -> str:
    runs = payload["runs"]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    head = ["variant", "metric"] + [TITLES[c] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        task = rows[0]["task"]
        name, unit, higher = ex.METRICS[task]
        cells = [v, f"{name} ({unit}, {'higher' if higher else 'lower'} is better)"]
        cells += [ex._fmt([r["metrics"].get(c) for r in rows], ex._DIGITS[task]) if c in rows[0]["metrics"] else "n/a"
                  for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample std over seeds {', '.join(map(str, seeds))}.", "",
              "Differences, seed by seed (mean ± std; then each seed's value):", "",
              "| variant | difference | mean ± std | per seed |", "|---|---|---|---|"]
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        digits = ex._DIGITS[rows[0]["task"]]
        for a, b in _PAIRS:
            if a in rows[0]["metrics"] and b in rows[0]["metrics"]:
                d = [r["metrics"][a] - r["metrics"][b] for r in rows]
                lines.append(f"| {v} | {TITLES[a]} − {TITLES[b]} | {ex._fmt(d, digits)} | {_signed(d, digits)} |")
    verified = all(r["dpoa"]["equivalent_to_trained_dense"] for r in runs)
    grids = {r["variant"]: r["predictions"] for r in runs}
    lines += ["", f"dpoa verified equal to the trained dense net sampled every eST (onnx_dense.verify): "
              f"{'every run' if verified else 'NOT in every run'}. Predictions per image (rows x columns): "
              + "; ".join(f"{v}: " + ", ".join(f"{k} {'x'.join(map(str, g))}" for k, g in p.items())
                          for v, p in grids.items()) + "."]
    times = {}
    for r in runs:
        for k, s in r["times"].items():
            times.setdefault(k, []).append(s)
    lines += ["", "Time per stage, summed over runs (s): "
              + ", ".join(f"{k} {sum(v):.0f}" for k, v in times.items())
              + f"; the source net {payload['pretraining']['seconds_this_run']:.0f} this run "
              f"({payload['pretraining']['steps']} steps, {payload['pretraining']['seconds']:.0f} s when trained; final loss "
              f"{payload['pretraining']['final_loss']:.3f}, accuracy on its first 500 training images "
              f"{payload['pretraining'].get('train_accuracy_first_500', float('nan')):.1f}%)."]
    lines += ["", f"Wall time {payload['wall_seconds'] / 60:.1f} min, CPU time {payload['cpu_seconds'] / 60:.1f} min "
              f"(1 process, {payload['threads']} torch thread(s)); load average at the start "
              f"{payload['load_start']}, at the end {payload['load_end']}; {payload['machine']}.",
              "", f"`{payload['command']}`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m samples.cls_reg_paper", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated: cls, cls-full, cls-adam, reg-jJ, reg-any (default {DEFAULT_VARIANTS})")
    ap.add_argument("--out", type=Path, default=None, help="default: exp_cls_reg_CONFIG")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a PaperConfig field")
    ap.add_argument("--lr-check", default=None, metavar="LR,LR,...",
                    help="only run the learning-rate check (seed 0, cls baseline, validation set) for these rates")
    ap.add_argument("--report", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    args = ap.parse_args(argv)
    args.out = args.out or Path(f"exp_cls_reg_{args.config}")
    if args.report:
        return ex.rewrite_report(ap, args.out, report)
    import torch

    torch.set_num_threads(args.threads)
    pc = dataclasses.replace(CONFIGS[args.config], **ex.parse_overrides(args.set, PaperConfig))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error("--seeds: expected integers, e.g. 0,1,2")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    root = out / "data"
    if args.lr_check:
        scores = lr_check(pc, [float(x) for x in args.lr_check.split(",")], root)
        (out / "lr_check.json").write_text(json.dumps({"config": dataclasses.asdict(pc), "validation_accuracy": scores}, indent=1))
        return 0
    started, cpu0, load_start = time.perf_counter(), time.process_time(), _load()
    print(f"config {pc.name}: {json.dumps(dataclasses.asdict(pc))}", flush=True)
    runs, timing = [], {}
    t = time.perf_counter()
    source, stats = pretrain(pc, root, timing)
    pretraining = {**stats, **timing, "seconds_this_run": time.perf_counter() - t}
    print(f"source net: {pretraining['seconds_this_run']:.0f} s this run, final loss {stats['final_loss']:.3f}", flush=True)
    for seed in seeds:
        for v in variants:
            r = run_variant(v, seed, pc, source, root, out)
            runs.append(r)
            m = ", ".join(f"{k} {x:.2f}" for k, x in r["metrics"].items())
            print(f"  {v} seed {seed}: {m}  ({r['seconds']:.0f} s)", flush=True)
    runs.sort(key=lambda r: (variants.index(r["variant"]), r["seed"]))
    command = f"python -m samples.cls_reg_paper --config {pc.name} --seeds {args.seeds} --variants {','.join(variants)} --out {out}"
    command += "".join(f" --set {s}" for s in args.set)
    payload = {
        "config": dataclasses.asdict(pc), "seeds": seeds, "variants": variants, "command": command,
        "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu0,
        "threads": args.threads, "machine": ex._machine(), "load_start": load_start, "load_end": _load(),
        "pretraining": pretraining, "runs": runs,
    }
    ex.write_results(out, payload, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
