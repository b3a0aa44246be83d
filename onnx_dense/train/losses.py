"""Losses for the paper's three kinds of task, computed on a dense model's output.

* **segmentation**: per-pixel cross-entropy on the dense grid. ``label_mode="sample"`` reads,
  for each prediction, the label at the pixel under the centre of its receptive field (from
  the dense model's metadata: ``rf_start + i * stride + (rf_size - 1) / 2``, rounded down;
  predictions whose centre lies outside the image are ignored). ``label_mode="upsample"``
  resamples the scores bilinearly to the label size instead, each prediction placed at its
  centre (outside the span of centres the border score is used), and scores every labelled pixel.
* **classification**: the dense logits averaged over every position (global average, as in
  the paper), then cross-entropy.
* **regression**: the dense outputs averaged over every position, ``tanh``, then L1 against
  targets in [-1, 1].

Labels equal to ``ignore_index`` (255, as in Pascal VOC) are not scored.
Without metadata (a model that is not dense), predictions are taken as evenly spread over
the image: centre of prediction i = (i + 0.5) * size / count - 0.5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from onnx_dense import metadata
from onnx_dense.errors import DenseError

LABEL_MODES = ("sample", "upsample")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where an output's predictions sit in input pixels (see ``metadata.DenseOutput``)."""

    spatial_axes: tuple[int, ...]
    stride: tuple[int, ...]
    rf_start: tuple[int, ...]
    rf_size: tuple[int, ...]

    @classmethod
    def from_output(cls, out: metadata.DenseOutput, *, original: bool = False) -> "Geometry":
        """The dense output's grid, or with ``original=True`` the original model's (every eST-th)."""
        stride = out.original_stride if original else out.stride
        return cls(tuple(out.spatial_axes), tuple(stride), tuple(out.rf_start), tuple(out.rf_size))

    def centres(self, k: int, count: int) -> torch.Tensor:
        """Input-pixel centre of each of ``count`` predictions along spatial axis ``k``."""
        i = torch.arange(count, dtype=torch.float64)
        return self.rf_start[k] + i * self.stride[k] + (self.rf_size[k] - 1) / 2


def geometry_of(info: metadata.DenseInfo | None, output: str, *, original: bool = False) -> Geometry | None:
    if info is None or output not in info.outputs:
        return None
    return Geometry.from_output(info.outputs[output], original=original)


def _centres(geometry: Geometry | None, k: int, n_out: int, n_in: int) -> torch.Tensor:
    if geometry is not None:
        return geometry.centres(k, n_out)
    i = torch.arange(n_out, dtype=torch.float64)
    return (i + 0.5) * n_in / n_out - 0.5


def spatial_axes(output: torch.Tensor, geometry: Geometry | None) -> tuple[int, ...]:
    if geometry is not None:
        return tuple(geometry.spatial_axes)
    return tuple(range(2, output.dim()))


def _check_layout(output: torch.Tensor, geometry: Geometry | None, what: str) -> int:
    axes = spatial_axes(output, geometry)
    if axes != tuple(range(2, output.dim())):
        raise DenseError(f"{what} needs an output laid out (N, classes, *spatial); this output's spatial axes are {list(axes)}")
    return len(axes)


def sample_labels(
    labels: torch.Tensor, out_sizes: Sequence[int], geometry: Geometry | None, ignore_index: int = 255
) -> torch.Tensor:
    """Labels (N, *in) read at each prediction's centre pixel -> (N, *out); outside -> ignore."""
    in_sizes = labels.shape[1:]
    if len(in_sizes) != len(out_sizes):
        raise DenseError(f"label maps have {len(in_sizes)} spatial axes but the output has {len(out_sizes)}")
    index, valid = [], None
    for k, (n_out, n_in) in enumerate(zip(out_sizes, in_sizes)):
        pix = torch.floor(_centres(geometry, k, n_out, n_in)).long()
        ok = (pix >= 0) & (pix < n_in)
        index.append(pix.clamp(0, n_in - 1).to(labels.device))
        shape = [1] * len(out_sizes)
        shape[k] = n_out
        ok = ok.reshape(shape).to(labels.device)
        valid = ok if valid is None else valid & ok
    grids = torch.meshgrid(*index, indexing="ij")
    sampled = labels[(slice(None), *grids)]
    return torch.where(valid.unsqueeze(0), sampled, torch.full_like(sampled, ignore_index))


def upsample_scores(scores: torch.Tensor, in_sizes: Sequence[int], geometry: Geometry | None) -> torch.Tensor:
    """Scores (N, K, *out) resampled bilinearly to (N, K, *in), predictions at their centres."""
    out_sizes = list(scores.shape[2:])
    nd = len(out_sizes)
    if nd not in (1, 2, 3):
        raise DenseError(f"upsampling supports 1 to 3 spatial axes, not {nd}")
    coords = []
    for k, (n_out, n_in) in enumerate(zip(out_sizes, in_sizes)):
        c = _centres(geometry, k, n_out, n_in)
        y = torch.arange(n_in, dtype=torch.float64)
        u = (y - c[0]) / (c[1] - c[0]) if n_out > 1 else torch.zeros_like(y)
        g = 2 * u / (n_out - 1) - 1 if n_out > 1 else u
        coords.append(g.to(scores.dtype).to(scores.device))
    x = scores
    if nd == 1:  # grid_sample wants 2 or 3 spatial axes
        x = x.unsqueeze(2)
        coords = [torch.zeros(1, dtype=scores.dtype, device=scores.device)] + coords
    mesh = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack(list(reversed(mesh)), dim=-1)  # last axis first, as grid_sample expects
    grid = grid.unsqueeze(0).expand(x.shape[0], *grid.shape)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.squeeze(2) if nd == 1 else out


def average(output: torch.Tensor, geometry: Geometry | None) -> torch.Tensor:
    """The output averaged over its spatial axes (global average): (N, C, *spatial) -> (N, C)."""
    axes = spatial_axes(output, geometry)
    return output.mean(dim=axes) if axes else output


class TaskLoss:
    """``loss(output, target)`` for one task; also turns outputs into predictions for metrics."""

    def __init__(
        self, task: str, geometry: Geometry | None = None, *, label_mode: str = "sample", ignore_index: int = 255
    ) -> None:
        if label_mode not in LABEL_MODES:
            raise DenseError(f"unknown label mode '{label_mode}'; use one of {', '.join(LABEL_MODES)}")
        self.task = task
        self.geometry = geometry
        self.label_mode = label_mode
        self.ignore_index = ignore_index

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "segmentation":
            scores, labels = self.align(output, target)
            if not torch.any(labels != self.ignore_index):
                return scores.sum() * 0.0  # nothing to score in this batch
            return F.cross_entropy(scores, labels, ignore_index=self.ignore_index)
        if self.task == "classification":
            return F.cross_entropy(average(output, self.geometry), target.long())
        if self.task == "regression":
            pred = torch.tanh(average(output, self.geometry))
            return F.l1_loss(pred, target.to(pred.dtype).reshape(pred.shape))
        raise DenseError(f"unknown task '{self.task}'")

    def align(self, output: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation: (scores, labels) on one grid, by ``label_mode``."""
        _check_layout(output, self.geometry, "segmentation")
        labels = labels.long()
        if self.label_mode == "sample":
            return output, sample_labels(labels, output.shape[2:], self.geometry, self.ignore_index)
        return upsample_scores(output, labels.shape[1:], self.geometry), labels

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """classification: class indices (N,); regression: tanh of the averaged output (N, D)."""
        if self.task == "classification":
            return average(output, self.geometry).argmax(dim=1)
        if self.task == "regression":
            return torch.tanh(average(output, self.geometry))
        return output.argmax(dim=1)


class Metrics:
    """Accumulates what :func:`onnx_dense.train.evaluate` reports."""

    def __init__(self, loss: TaskLoss, num_classes: int | None) -> None:
        self.loss = loss
        self.num_classes = num_classes
        self.total_loss = 0.0
        self.count = 0
        self.correct = 0
        self.abs_error = 0.0
        self.values = 0
        self.confusion: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        n = output.shape[0]
        self.total_loss += float(self.loss(output, target)) * n
        self.count += n
        task = self.loss.task
        if task == "classification":
            self.correct += int((self.loss.predict(output).cpu() == target.cpu()).sum())
        elif task == "regression":
            pred = self.loss.predict(output).cpu()
            err = (pred - target.cpu().to(pred.dtype).reshape(pred.shape)).abs()
            self.abs_error += float(err.sum())
            self.values += err.numel()
        else:
            scores, labels = self.loss.align(output, target)
            pred = scores.argmax(dim=1).cpu().reshape(-1)
            labels = labels.cpu().reshape(-1)
            keep = labels != self.loss.ignore_index
            k = self.num_classes or scores.shape[1]
            cm = torch.bincount(labels[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
            self.confusion = cm if self.confusion is None else self.confusion + cm

    def result(self) -> dict[str, float]:
        out = {"loss": self.total_loss / max(self.count, 1), "examples": self.count}
        if self.loss.task == "classification":
            out["accuracy"] = self.correct / max(self.count, 1)
        elif self.loss.task == "regression":
            out["mae"] = self.abs_error / max(self.values, 1)
        elif self.confusion is not None:
            cm = self.confusion.double()
            total = cm.sum()
            out["pixel_accuracy"] = float(cm.diag().sum() / total) if total else math.nan
            union = cm.sum(0) + cm.sum(1) - cm.diag()
            present = union > 0
            out["mean_iou"] = float((cm.diag()[present] / union[present]).mean()) if present.any() else math.nan
            out["scored_pixels"] = int(total)
        return out
