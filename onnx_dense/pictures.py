"""Pictures a person reads instead of a table: dense maps over their image, verify per phase, bench times.

* :func:`map_figure`: one output of ``onnx-dense run`` over the image it was computed from.
  A label map is blended over the image, with a legend of class names and colours (the
  classes present, largest share first); a heatmap (a classifier's top class, or a
  single-channel output) is drawn over the image in grey, with a colour bar whose range is
  the map's own minimum to maximum, so that structure shows even when every value lies
  between 0.20 and 0.39, and a title naming the class and that range.
* :func:`verify_figure`: per output, the dense grid's phases as cells, coloured by
  max|dense - original| over the tolerance (log scale; 1 is the tolerance), each cell
  labelled with its value; a cell no check covered is grey, a failing one outlined in red.
  Checks that are not per phase (weights, any size, skipped ones) are listed under it.
* :func:`bench_figure`: the three ways' times as bars (median) with every round as a dot.

Drawing uses matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch, nothing shown on screen); matplotlib is imported only when a picture is drawn.
Files go through :func:`onnx_dense.files.atomic_output`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from onnx_dense.errors import DenseError
from onnx_dense.files import atomic_output

DPI = 100


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (imported here so that nothing else pays for matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - a dependency; a broken install gets one line
        raise DenseError('drawing pictures needs matplotlib: pip install "matplotlib>=3.6"') from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG, atomically."""
    with atomic_output(path, "the picture") as tmp, open(tmp, "wb") as f:
        write(fig, f)


def write(fig, f) -> None:
    """Write ``fig`` as PNG bytes to the open binary file ``f`` (the run's writers, local or Ray)."""
    fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)


def class_names(spec: str | Sequence[str] | None, count: int) -> list[str]:
    """Names for ``count`` classes: from ``spec`` (a list, ``a,b,c``, or a text file with one per line)."""
    names: list[str] = []
    if isinstance(spec, str):
        path = Path(spec)
        if "," not in spec and path.is_file():
            try:
                names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise DenseError(f"{spec}: cannot read class names ({exc})") from None
        else:
            names = [n.strip() for n in spec.split(",")]
    elif spec is not None:
        names = [str(n) for n in spec]
    return [names[i] if i < len(names) and names[i] else f"class {i}" for i in range(count)]


def label_colours(classes: int) -> np.ndarray:
    """(classes, 3) float RGB 0-255: background (class 0) grey, then matplotlib's tab10/tab20 colours."""
    from matplotlib import colormaps

    table = colormaps["tab10" if classes <= 11 else "tab20"]
    n = table.N
    colours = [(0.45, 0.45, 0.45)] + [table(i % n)[:3] for i in range(max(classes, 2) - 1)]
    return np.asarray(colours[: max(classes, 2)], dtype=np.float32) * 255


# --------------------------------------------------------------------------------------------
# dense maps over their image
# --------------------------------------------------------------------------------------------


def map_figure(dense, image, view: str = "auto", names: Sequence[str] | str | None = None, alpha: float = 0.5):
    """The figure of one DenseMap (``onnx_dense.runtime``) over ``image`` (an ImageInput); None if not 2-D."""
    from onnx_dense.runtime import images as imglib

    grid = dense.grid
    if view == "none" or grid is None or len(grid.spatial_axes) != 2:
        return None
    scores = imglib._scores(dense.numpy(), grid.spatial_axes)
    if scores is None:
        return None
    classes = scores.shape[0]
    if view == "auto":
        view = "heatmap" if dense.is_classifier or classes == 1 else "labels"
    rows = grid.nearest(np.arange(image.size[0]), 0)
    cols = grid.nearest(np.arange(image.size[1]), 1)
    every = "x".join(str(s) for s in dict.fromkeys(grid.stride)) if hasattr(grid, "stride") else "?"
    shape = "x".join(str(n) for n in scores.shape[1:])
    h, w = image.size
    fig = _figure(max(3.0, min(10.0, w / 45)) + 0.2, max(2.4, min(8.0, h / 45)) + 0.7)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    label = class_names(names, classes)
    if view == "labels":
        labels = imglib.class_argmax(scores)[rows[:, None], cols[None, :]]
        colours = label_colours(classes)
        blend = (1 - alpha) * image.rgb.astype(np.float32) + alpha * colours[labels]
        ax.imshow(np.clip(blend, 0, 255).astype(np.uint8), interpolation="nearest")
        ax.set_title(f"'{dense.name}': argmax of {classes} classes\n{shape} predictions, one every {every} px",
                     fontsize=9, loc="left")
        share = np.bincount(labels.reshape(-1), minlength=classes) / labels.size
        present = [int(c) for c in np.argsort(-share, kind="stable") if share[c] > 0][:20]
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=colours[c] / 255, edgecolor="black", linewidth=0.5,
                         label=f"{c} {label[c]} ({share[c]:.0%})") for c in present]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                  title="class (share of pixels)", title_fontsize=8, alignment="left")
        return fig
    if classes == 1:
        heat = scores[0].astype(np.float64)
        what = f"value of '{dense.name}'"
        top = None
    else:
        top, heat = imglib.top_class_heat(scores)
        what = f"probability of {label[top]!r} (class {top}, the top class on average)"
    lo, hi = float(np.nanmin(heat)), float(np.nanmax(heat))
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    grey = image.rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    shown = ax.imshow(heat[rows[:, None], cols[None, :]], cmap="inferno", vmin=lo, vmax=hi, alpha=0.6,
                      interpolation="nearest")
    ax.set_title(f"'{dense.name}': {what}\n{shape} predictions, one every {every} px; colours span {lo:.3g} to {hi:.3g}",
                 fontsize=9, loc="left")
    bar = fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.03)
    bar.set_label("probability" if top is not None else "value", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# verify, per phase
# --------------------------------------------------------------------------------------------

_PHASE = re.compile(r"^phase ([0-9,]+)$")


def verify_figure(report, est: dict[str, tuple[int, ...]] | None = None):
    """The figure of an ``equivalence.Report``: per output, each phase's max difference / tolerance.

    ``est``: each output's eST per spatial axis (from the dense model's metadata), so that
    phases no check covered are drawn too; without it the grid spans the phases checked.
    """
    from matplotlib.colors import LogNorm

    est = dict(est or {})
    cells: dict[str, dict[tuple[int, ...], object]] = {}
    others = []
    for c in report.comparisons:
        phase: tuple[int, ...] | None = None
        if c.check == "subgrid":
            phase = (0,) * len(est.get(c.output, (1, 1)))
        else:
            m = _PHASE.match(c.check)
            if m:
                phase = tuple(int(v) for v in m.group(1).split(","))
        if phase is None or not c.compared:
            others.append(c)
            continue
        cells.setdefault(c.output, {})[phase] = c
    outputs = [o for o in dict.fromkeys([*cells, *[o for o in est if o in cells]])]
    panels = max(1, len(outputs))
    width = 4.2 * min(panels, 3) + 1.4
    rows_of_text = len(others) + 1
    fig = _figure(width, 4.0 + 0.18 * rows_of_text)
    norm = LogNorm(vmin=1e-3, vmax=10.0)
    shown = None
    bottom = (0.28 + 0.18 * rows_of_text) / (4.0 + 0.18 * rows_of_text)
    for k, name in enumerate(outputs[:3]):
        found = cells[name]
        rank = len(next(iter(found)))
        e = tuple(est.get(name) or tuple(max(p[i] for p in found) + 1 for i in range(rank)))
        e2 = (1, e[0]) if len(e) == 1 else (e[0], e[1]) if len(e) == 2 else None
        ax = fig.add_axes((0.06 + k * 4.2 / width, bottom, 3.2 / width, 0.78 - bottom + 0.08))
        if e2 is None:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{len(e)} spatial axes: see the text report", ha="center", transform=ax.transAxes)
            continue
        ratio = np.full(e2, np.nan)
        for p, c in found.items():
            q = (0, p[0]) if len(p) == 1 else p[:2]
            if q[0] < e2[0] and q[1] < e2[1]:
                ratio[q] = max(c.max_abs / c.tolerance, 1e-3) if c.tolerance else (0 if c.passed else 10)
        ax.imshow(np.zeros(e2), cmap="Greys", vmin=0, vmax=4, extent=(-0.5, e2[1] - 0.5, e2[0] - 0.5, -0.5))
        shown = ax.imshow(np.ma.masked_invalid(ratio), cmap="viridis", norm=norm, interpolation="nearest",
                          extent=(-0.5, e2[1] - 0.5, e2[0] - 0.5, -0.5))
        small = max(e2) > 8
        for p, c in found.items():
            q = (0, p[0]) if len(p) == 1 else p[:2]
            if not small:
                value = "0" if c.max_abs == 0 else f"{c.max_abs:.1e}"
                ax.text(q[1], q[0], value, ha="center", va="center", fontsize=7,
                        color="white" if (ratio[q] < 0.3) else "black")
            if not c.passed:
                ax.add_patch(_rect(q, "red"))
        n_missing = int(np.isnan(ratio).sum())
        worst = max(found.values(), key=lambda c: (c.max_abs / c.tolerance) if c.tolerance else math.inf)
        ax.set_title(
            f"'{name}': max |dense - original| per phase\n{len(found)} of {ratio.size} phases checked"
            + (f" ({n_missing} grey: not checked)" if n_missing else "")
            + f"; worst {worst.max_abs:.2e} ({worst.check}), tol {worst.tolerance:.1e}",
            fontsize=8, loc="left",
        )
        ax.set_xlabel("phase along width" if len(e) == 2 else "phase", fontsize=8)
        ax.set_ylabel("phase along height" if len(e) == 2 else "", fontsize=8)
        ax.set_xticks(range(e2[1]))
        ax.set_yticks(range(e2[0]))
        ax.tick_params(labelsize=7)
    if shown is not None:
        cax = fig.add_axes(((width - 1.1) / width, bottom, 0.15 / width * 1.2, 0.78 - bottom + 0.08))
        bar = fig.colorbar(shown, cax=cax, extend="both")
        bar.set_label("max |difference| / tolerance (1: the limit)", fontsize=8)
        bar.ax.axhline(1.0, color="red", linewidth=1.5)
        bar.ax.tick_params(labelsize=7)
    elif not outputs:
        fig.text(0.5, 0.6, "no per-phase comparison in this report", ha="center")
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [f"{verdict}: " + report.text().splitlines()[-1].split(": ", 1)[-1]]
    for c in others:
        status = "SKIP" if getattr(c, "skipped", False) else ("PASS" if c.passed else "FAIL")
        lines.append(f"{status}  {c.output} {c.check}: {(c.note or '')[:110]}")
    fig.text(0.02, 0.02, "\n".join(lines), fontsize=7, family="monospace", va="bottom")
    if len(outputs) > 3:
        fig.text(0.98, 0.98, f"first 3 of {len(outputs)} outputs", ha="right", va="top", fontsize=7)
    return fig


def _rect(q, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((q[1] - 0.5, q[0] - 0.5), 1, 1, fill=False, edgecolor=colour, linewidth=2)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def bench_figure(result):
    """The figure of a ``bench.BenchResult``: median time per way as a bar, every round as a dot."""
    ms = [m for m in result.measurements if m.times_ms]
    fig = _figure(7.5, 1.6 + 0.7 * max(1, len(ms)))
    ax = fig.add_axes((0.27, 0.3, 0.68, 0.5))
    medians = [m.median_ms for m in ms if m.median_ms > 0]
    log = bool(medians) and max(medians) / min(medians) > 20  # shift-and-stitch would flatten the others
    left = min(min(m.times_ms) for m in ms) / 2 if log else 0.0
    colours = {"original": "#4c72b0", "dense": "#dd8452", "shift-and-stitch": "#8c8c8c"}
    for i, m in enumerate(ms):
        y = len(ms) - 1 - i
        ax.barh(y, m.median_ms - left, left=left, color=colours.get(m.name, "#55a868"), height=0.6)
        ax.plot(m.times_ms, np.full(len(m.times_ms), y) + np.linspace(-0.15, 0.15, len(m.times_ms)), "k.", markersize=3)
        ax.text(m.median_ms, y + 0.32, f" median {m.median_ms:.2f} ms", va="bottom", ha="left", fontsize=7)
    ax.set_yticks([len(ms) - 1 - i for i in range(len(ms))])
    ax.set_yticklabels([f"{m.name}\n({m.passes} pass{'es' if m.passes != 1 else ''})" for m in ms], fontsize=8)
    ax.set_xlabel(f"milliseconds per map{' (log scale)' if log else ''}; bar: median, dots: each round", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    right = max((max(m.times_ms) for m in ms), default=1.0)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(left, right * 3)
    else:
        ax.set_xlim(0, right * 1.25)
    parts = [f"dense / original {result.time_ratio:.2f}x time"]
    if result.flop_ratio:
        parts[-1] += f", {result.flop_ratio:.2f}x FLOPs"
    if result.stitch_ratio is not None:
        parts.append(f"shift-and-stitch / dense {result.stitch_ratio:.1f}x time")
    inputs = ", ".join(f"{k} {list(v)}" for k, v in result.inputs.items())
    ax.set_title(f"onnx-dense bench: {result.provider}, input {inputs}, {result.repeat} rounds\n" + "; ".join(parts),
                 fontsize=8, loc="left")
    return fig
