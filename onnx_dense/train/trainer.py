"""Fine-tune a dense model in PyTorch: :func:`train`, :func:`evaluate`, :func:`predict`.

``train`` builds an :class:`~onnx_dense.train.graph_module.OnnxGraphModule` from the dense ONNX
model (or continues with a module you pass), reads the data (:mod:`onnx_dense.train.data`),
and optimises the task's loss (:mod:`onnx_dense.train.losses`) with a tqdm progress bar showing
loss and throughput. Checkpoints (:mod:`onnx_dense.train.checkpoint`) hold the ONNX-named
weights; :meth:`TrainResult.save_onnx` writes the trained model (the dense one, or whichever
graph was trained) and :meth:`TrainResult.export_dpoa` the original with the trained weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from onnx_dense import metadata, model_io
from onnx_dense.files import refuse_link
from onnx_dense.errors import DenseError
from onnx_dense.train import checkpoint as ckpt
from onnx_dense.train.data import Dataset, check_task, open_dataset
from onnx_dense.train.graph_module import OnnxGraphModule
from onnx_dense.train.losses import LABEL_MODES, Geometry, Metrics, TaskLoss, geometry_of

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did. ``model`` is the trained module (on ``device``)."""

    model: OnnxGraphModule
    task: str
    output: str
    steps: int
    epochs: float
    losses: list[float]  # one per step
    seconds: float
    images_per_second: float
    device: str
    checkpoint: Path | None
    dense_model: str | None  # the dense ONNX model trained, when it came from a file
    onnx_out: Path | None = None

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, min(len(self.losses), 10)) :]
        return float(np.mean(tail)) if tail else math.nan

    def state_dict_onnx(self) -> dict[str, np.ndarray]:
        """Trained values of every float initializer, by ONNX name (numpy, CPU)."""
        return {k: v.detach().cpu().float().numpy() if v.dtype == torch.bfloat16 else v.detach().cpu().numpy()
                for k, v in self.model.state_dict_onnx().items()}

    def save_onnx(self, path: str | os.PathLike, *, dense: str | os.PathLike | None = None) -> Path:
        """Write the trained model: the ONNX graph that was trained (the dense model, or the
        original when that was trained) with its initializer values replaced.

        ``dense``: that graph's file, when the module was not built from one.
        """
        from onnx_dense.train.dpoa import write_trained

        skeleton = dense or self.dense_model or getattr(self.model, "_proto", None)
        if skeleton is None:
            raise DenseError("the trained model's ONNX file is unknown; pass dense=PATH (the model it was trained from)")
        return write_trained(skeleton, self.state_dict_onnx(), path)

    def export_dpoa(self, original: str | os.PathLike, out: str | os.PathLike):
        """Write ``original`` with the trained weights (see :func:`onnx_dense.train.dpoa.export_dpoa`)."""
        from onnx_dense.train.dpoa import export_dpoa

        return export_dpoa(original, self.state_dict_onnx(), out)


# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DenseError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DenseError(f"device '{device}' requested but CUDA is not available here; use --device cpu")
    return dev


def as_module(model, *, train_bn: bool | None = None, trainable=None) -> OnnxGraphModule:
    """``model`` as an OnnxGraphModule (a module is used as it is; ``train_bn`` set when given)."""
    if isinstance(model, OnnxGraphModule):
        if train_bn is not None:
            model.train_bn = bool(train_bn)
        return model
    return OnnxGraphModule(model, train_bn=bool(train_bn), trainable=trainable)


def dense_info(module: OnnxGraphModule) -> metadata.DenseInfo | None:
    text = module.metadata_props.get(metadata.KEY)
    return metadata.DenseInfo.from_json(text) if text else None


def geometry_from(model, output: str | None = None, *, original: bool = False) -> Geometry | None:
    """The prediction grid of a dense model's output (``original=True``: the original's grid).

    Use it to evaluate an original or dpoa model, which has no metadata of its own, at the
    right pixels: ``evaluate(dpoa, ..., geometry=geometry_from(dense, original=True))``.
    When the original output has no spatial axes (a classifier head, (N, classes), that the
    rewrite made spatial), ``original=True`` gives None: one prediction per image.
    """
    if isinstance(model, (metadata.DenseInfo,)):
        info = model
    elif isinstance(model, OnnxGraphModule):
        info = dense_info(model)
    elif isinstance(model, (str, os.PathLike)):
        from onnx_dense import model_io

        info = metadata.read(model_io.load(model))  # weights memory-mapped, not read
    else:
        info = metadata.read(model)
    if info is None:
        raise DenseError("the model has no onnx_dense metadata; was it written by `onnx-dense rewrite`?")
    name = output or next(iter(info.outputs), None)
    if name not in info.outputs:
        raise DenseError(f"output '{name}' is not a dense output of the model (dense outputs: {', '.join(info.outputs)})")
    if original and info.outputs[name].inserted:
        return None  # the dense axes were inserted by the rewrite; the original has none
    return geometry_of(info, name, original=original)


def _check_geometry(geometry: Geometry | None, output_name: str, output: torch.Tensor) -> None:
    """One line, not an IndexError, when ``geometry``'s spatial axes are not axes of ``output``."""
    if geometry is not None and any(a >= output.dim() for a in geometry.spatial_axes):
        raise DenseError(
            f"output '{output_name}' has shape {list(output.shape)} but the geometry puts predictions on axes "
            f"{list(geometry.spatial_axes)}; for an original or dpoa model pass geometry_from(dense, original=True)"
        )


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The model's axes against the trainer's. Data is (N, C, *spatial) and the losses read
    classes on axis 1; a TensorFlow/Keras model (through tf2onnx) reads (N, *spatial, C) and
    may write its scores channels-last too. ``input_axis``: the input's channel axis;
    ``class_axis``: the output's (1: as the trainer's, nothing moved)."""

    input_axis: int = 1
    class_axis: int = 1

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_axis == 1 else x.movedim(1, self.input_axis)

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.class_axis == 1 or out.dim() <= self.class_axis else out.movedim(self.class_axis, 1)

    def geometry(self, geometry: Geometry | None) -> Geometry | None:
        """``geometry`` of the output with its classes moved to axis 1."""
        if geometry is None or self.class_axis == 1:
            return geometry
        moved = tuple(a + 1 if 1 <= a < self.class_axis else a for a in geometry.spatial_axes)
        return dataclasses.replace(geometry, spatial_axes=moved)


def _input_axis(module: OnnxGraphModule, input_name: str) -> int:
    """The input's channel axis: where the dense model's metadata does not put a spatial axis;
    for a model without it (an original, a dpoa), the last axis where the graph's first op moves
    it to axis 1 (tf2onnx's Transpose to NCHW), else 1."""
    dims = module.input_shapes.get(input_name)
    rank = len(dims) if dims is not None else None
    info = dense_info(module)
    if info is not None and input_name in info.inputs and rank is not None:
        spatial = info.inputs[input_name].spatial_axes
        return next((a for a in range(1, rank) if a not in spatial), 1)
    return rank - 1 if rank is not None and input_name in module.channels_last_inputs else 1


def _class_axis(geometry: Geometry | None, out_dim: int) -> int:
    """The output's class axis: the axis after the batch that the geometry does not make spatial."""
    if geometry is None:
        return 1
    return next((a for a in range(1, out_dim) if a not in geometry.spatial_axes), 1)


class _TorchData(torch.utils.data.Dataset):
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        image, label = self.ds[i]
        return torch.from_numpy(image), torch.as_tensor(label)


def _model_io(module: OnnxGraphModule, output: str | None):
    if len(module.input_names) != 1:
        raise DenseError(
            f"training needs a model with one input; this one has {len(module.input_names)} ({', '.join(module.input_names)})"
        )
    name = output or module.output_names[0]
    if name not in module.output_names:
        raise DenseError(f"no output '{name}' in the model (outputs: {', '.join(module.output_names)})")
    return module.input_names[0], name


def _prepare(module, task, data, output, label_mode, ignore_index, mean, std, geometry):
    check_task(task)
    if label_mode not in LABEL_MODES:
        raise DenseError(f"unknown label mode '{label_mode}'; use one of {', '.join(LABEL_MODES)}")
    input_name, output_name = _model_io(module, output)
    dims = module.input_shapes[input_name]
    input_axis = _input_axis(module, input_name)
    channels = dims[input_axis] if dims is not None and len(dims) > input_axis else None
    rank = len(dims) - 2 if dims is not None else None
    ds = open_dataset(data, task, channels=channels, spatial_rank=rank, mean=mean, std=std, ignore_index=ignore_index)
    if geometry is None:
        geometry = geometry_of(dense_info(module), output_name)
    if task == "segmentation" and label_mode == "sample" and geometry is None:
        pass  # predictions taken as evenly spread (losses module docstring)
    # One example through the model: a clear error now if it does not run on this data, and
    # the number of classes / outputs for checking the labels.
    image, _ = ds[0]
    module.eval()
    with torch.no_grad():
        probe = module.run({input_name: _Layout(input_axis).feed(torch.from_numpy(image[None]).to(module.device))})
        probe = probe[output_name]
    if probe.dim() < 2:
        raise DenseError(f"output '{output_name}' has shape {list(probe.shape)}; expected (N, C, ...)")
    _check_geometry(geometry, output_name, probe)
    layout = _Layout(input_axis, _class_axis(geometry, probe.dim()))
    probe, geometry = layout.scores(probe), layout.geometry(geometry)
    if task == "segmentation" and probe.dim() == 2:
        raise DenseError(
            f"output '{output_name}' has shape {list(probe.shape)}: one prediction per image, no score map to "
            f"segment with; use task classification or regression, or the model's dense form"
        )
    width = int(probe.shape[1])
    if task in ("segmentation", "classification"):
        ds.num_classes = width
        if ds.labels is not None:
            from onnx_dense.train.data import _check_all_classes

            _check_all_classes(ds, ds.labels)
    elif ds.labels is not None:
        targets = 1 if ds.labels.ndim == 1 else ds.labels.shape[1]
        if targets != width:
            raise DenseError(f"{ds.source}: {targets} regression target(s) per image but output '{output_name}' has {width} channel(s)")
    loss_fn = TaskLoss(task, geometry, label_mode=label_mode, ignore_index=ignore_index)
    return ds, input_name, output_name, loss_fn, layout


def _optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise DenseError(f"unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}")


def _schedule(name: str, optimizer, total: int):
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if name == "poly":  # FCN/DeepLab "poly": (1 - step/total)^0.9
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total) ** 0.9)
    raise DenseError(f"unknown schedule '{name}'; use one of {', '.join(SCHEDULES)}")


def train(
    model,
    *,
    task: str,
    data,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 8,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    device: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    train_bn: bool = False,
    label_mode: str = "sample",
    ignore_index: int = 255,
    output: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    geometry: Geometry | None = None,
    trainable: Iterable[str] | Callable[[str], bool] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    resume: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: bool | None = None,  # None: a bar on a terminal only (tqdm's own test)
    callback: Callable[[int, float, OnnxGraphModule], Any] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (a dense ONNX path, ModelProto, onnx-ir Model or OnnxGraphModule).

    ``task``: "segmentation", "classification" or "regression". ``data``: a folder, an .npz or
    ``(images, labels)`` arrays (format: :mod:`onnx_dense.train.data`). Training runs ``steps``
    optimiser steps when given, else ``epochs`` passes over the data. ``train_bn``: let
    BatchNorm use batch statistics and update its running statistics (default: inference
    mode). ``label_mode``: segmentation labels "sample"d at each prediction's centre pixel, or
    scores "upsample"d to the label size. ``checkpoint_dir``: write ``step-NNNNNN.pt`` every
    ``checkpoint_every`` steps and ``last.pt`` at the end. ``resume``: a checkpoint to continue
    from (weights, optimiser state and step count; ``steps``/``epochs`` count the total).
    ``out``: also write the trained dense ONNX model there. ``callback(step, loss, module)`` is
    called after every step; return True from it to stop early.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise DenseError("batch size must be at least 1")
    if (steps is not None and steps < 1) or epochs < 1:
        raise DenseError("steps and epochs must be at least 1")
    if lr <= 0:
        raise DenseError("learning rate must be positive")
    dev = resolve_device(device)
    module = as_module(model, train_bn=train_bn, trainable=trainable).to(dev)
    ds, input_name, output_name, loss_fn, layout = _prepare(
        module, task, data, output, label_mode, ignore_index, mean, std, geometry
    )
    ds.check_batchable(batch_size)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise DenseError("the model has no trainable weights")
    opt = _optimizer(optimizer, params, lr, momentum, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        _TorchData(ds), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
        pin_memory=dev.type == "cuda",
    )
    total = steps if steps is not None else epochs * len(loader)
    sched = _schedule(schedule, opt, total)
    step = 0
    if resume is not None:
        state = ckpt.load_checkpoint(resume)
        module.load_state_dict_onnx(state["weights"])
        if state.get("optimizer") is not None and state.get("config", {}).get("optimizer") == optimizer:
            opt.load_state_dict(state["optimizer"])
        step = int(state.get("step", 0))
        if sched is not None:
            for _ in range(step):
                sched.step()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    # every output path checked before the first step, not after the last (links, inputs)
    if out is not None:
        model_io.check_output(Path(out), [model if isinstance(model, (str, os.PathLike)) else None, resume])
    if ckpt_dir is not None and ckpt_dir.is_dir():
        for entry in [ckpt_dir / "last.pt", *ckpt_dir.glob("step-*.pt")]:
            refuse_link(entry, "the checkpoint")
    if ckpt_dir is not None:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DenseError(f"{ckpt_dir}: cannot create the checkpoint folder ({exc.strerror or exc})") from None
    dense_path = getattr(module, "source_path", None)
    config = {
        "task": task, "lr": lr, "batch_size": batch_size, "optimizer": optimizer, "momentum": momentum,
        "weight_decay": weight_decay, "schedule": schedule, "train_bn": bool(train_bn), "label_mode": label_mode,
        "ignore_index": ignore_index, "output": output_name, "seed": seed,
        "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
        "data": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
    }

    def save(path: Path, loss: float | None, epoch: int) -> Path:
        return ckpt.save_checkpoint(path, {
            "weights": {k: v.detach().cpu().clone() for k, v in module.state_dict_onnx().items()},
            "dense_model": str(Path(dense_path).resolve()) if dense_path else None,
            "dense_info": module.metadata_props.get(metadata.KEY),
            "task": task, "step": step, "epoch": epoch, "loss": loss, "config": config,
            "optimizer": opt.state_dict(),
        })

    from tqdm.auto import tqdm

    losses: list[float] = []
    images = 0
    train_seconds = 0.0
    last_ckpt: Path | None = None
    epoch = step // max(len(loader), 1)
    bar = tqdm(total=total, initial=min(step, total), disable=None if progress is None else not progress, unit="step", dynamic_ncols=True,
               desc=f"train {task}", leave=True)
    module.train()
    stop = step >= total
    try:
        while not stop:
            for images_batch, labels_batch in loader:
                t0 = time.perf_counter()
                x = images_batch.to(dev, non_blocking=True)
                y = labels_batch.to(dev, non_blocking=True)
                out_t = layout.scores(module.run({input_name: layout.feed(x)})[output_name])
                loss = loss_fn(out_t, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise DenseError(f"the loss became {value} at step {step + 1}; lower the learning rate (--lr)")
                train_seconds += time.perf_counter() - t0
                step += 1
                images += x.shape[0]
                losses.append(value)
                recent = losses[-20:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", img_s=f"{images / max(train_seconds, 1e-9):.1f}")
                bar.update(1)
                if ckpt_dir is not None and checkpoint_every and step % checkpoint_every == 0:
                    last_ckpt = save(ckpt_dir / f"step-{step:06d}.pt", value, epoch)
                if callback is not None:
                    if callback(step, value, module):
                        stop = True
                    module.train()  # the callback may have evaluated the module
                if step >= total or stop:
                    stop = True
                    break
            epoch += 1
    finally:
        bar.close()
        module.eval()
    if ckpt_dir is not None:
        last_ckpt = save(ckpt_dir / "last.pt", losses[-1] if losses else None, epoch)
    result = TrainResult(
        model=module, task=task, output=output_name, steps=step, epochs=step / max(len(loader), 1), losses=losses,
        seconds=time.perf_counter() - started, images_per_second=images / train_seconds if train_seconds else 0.0,
        device=str(dev), checkpoint=last_ckpt, dense_model=dense_path,
    )
    if out is not None:
        result.onnx_out = result.save_onnx(out)
    return result


@torch.no_grad()
def evaluate(
    model,
    *,
    task: str,
    data,
    batch_size: int = 8,
    device: str | None = None,
    label_mode: str = "sample",
    ignore_index: int = 255,
    output: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    geometry: Geometry | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Loss and task metrics of ``model`` on ``data`` (the model is left in eval mode).

    segmentation: ``loss``, ``pixel_accuracy``, ``mean_iou`` (over classes that occur in the
    labels or predictions, at the positions ``label_mode`` scores); classification: ``loss``,
    ``accuracy`` (of the averaged logits); regression: ``loss``, ``mae`` (of tanh of the averaged
    output against targets in [-1, 1]). For an original or dpoa model pass
    ``geometry=geometry_from(dense_model, original=True)`` so labels are read at its pixels
    (None for an original whose output is (N, classes): one prediction per image).
    """
    dev = resolve_device(device)
    module = as_module(model).to(dev)
    ds, input_name, output_name, loss_fn, layout = _prepare(module, task, data, output, label_mode, ignore_index, mean,
                                                            std, geometry)
    ds.check_batchable(batch_size)
    loader = torch.utils.data.DataLoader(_TorchData(ds), batch_size=batch_size, shuffle=False)
    metrics = Metrics(loss_fn, ds.num_classes)
    module.eval()
    from tqdm.auto import tqdm

    for x, y in tqdm(loader, disable=not progress, desc=f"evaluate {task}", unit="batch"):
        out_t = layout.scores(module.run({input_name: layout.feed(x.to(dev))})[output_name])
        metrics.update(out_t, y.to(dev))
    return metrics.result()


@torch.no_grad()
def predict(
    model,
    images: np.ndarray,
    *,
    task: str,
    batch_size: int = 8,
    device: str | None = None,
    output: str | None = None,
    geometry: Geometry | None = None,
) -> np.ndarray:
    """Task-level predictions for ``images`` (N, C, *spatial), as numpy.

    segmentation: the score maps as the model outputs them (N, K, *grid); classification: the
    averaged logits (N, K); regression: tanh of the averaged output (N, D).
    """
    check_task(task)
    dev = resolve_device(device)
    module = as_module(model).to(dev).eval()
    input_name, output_name = _model_io(module, output)
    if geometry is None:
        geometry = geometry_of(dense_info(module), output_name)
    from onnx_dense.train.losses import average

    parts = []
    input_axis = _input_axis(module, input_name)
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[start : start + batch_size], dtype=np.float32), device=dev)
        out_t = module.run({input_name: _Layout(input_axis).feed(x)})[output_name]
        _check_geometry(geometry, output_name, out_t)
        layout = _Layout(input_axis, _class_axis(geometry, out_t.dim()))
        out_t = layout.scores(out_t)
        if task == "classification":
            out_t = average(out_t, layout.geometry(geometry))
        elif task == "regression":
            out_t = torch.tanh(average(out_t, layout.geometry(geometry)))
        parts.append(out_t.cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)
