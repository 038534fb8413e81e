"""Segmentation overlays: the image in gray, the ground-truth contour and the predicted contour.

Colours are cyan (ground truth) and orange-red (prediction): distinct for the common colour
vision deficiencies and visible on a gray image. With several foreground classes (fundus rim
and cup) each class gets its own line style, named in the legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from iopfl_lightning.viz.figures import new_figure, save_figure, to_numpy

__all__ = ["MASK_COLOR", "PRED_COLOR", "overlay_grid", "save_figure", "slice_dice"]

MASK_COLOR = "#00e5ff"
PRED_COLOR = "#ff4d00"
LINESTYLES = ("solid", "dashed", "dotted", "dashdot")


def _gray(images, channel: int | None) -> np.ndarray:
    """[N, C, H, W] or [N, H, W] -> [N, H, W]: channel ``channel`` (default the middle one:
    the centre slice of 3 adjacent MRI slices, the green channel of a fundus photo)."""
    array = to_numpy(images, "images").astype(np.float32)
    if array.ndim == 3:
        return array
    if array.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W], got shape {array.shape}")
    index = array.shape[1] // 2 if channel is None else channel
    if not -array.shape[1] <= index < array.shape[1]:
        raise ValueError(f"channel {channel} is out of range for {array.shape[1]} channels")
    return array[:, index]


def _labels(value, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = to_numpy(value, name)
    if array.shape != shape:
        raise ValueError(f"{name} must be integer label maps of shape {shape} (like the images), "
                         f"got {array.shape}")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise ValueError(f"{name} must hold integer labels (argmax of the logits), got floats")
    return array.astype(np.int64)


def _column(value, name: str, shape: tuple[int, ...]) -> list[np.ndarray | None]:
    """One model's predictions as a list of [H, W] maps; a list may hold None for a slice the
    model did not predict (its panel shows the ground truth only)."""
    if isinstance(value, (list, tuple)):
        if len(value) != shape[0]:
            raise ValueError(f"{name} has {len(value)} entries for {shape[0]} slices")
        return [None if v is None else _labels(v, f"{name}[{i}]", shape[1:])
                for i, v in enumerate(value)]
    return list(_labels(value, name, shape))


def _contour(ax: Axes, region: np.ndarray, color: str, style: str, width: float) -> None:
    """Outline of a boolean region (nothing for an empty one). The region is padded with
    background so a region touching the border, or filling the image, is still outlined."""
    if not region.any():
        return
    padded = np.pad(region.astype(np.float32), 1)
    # the padding sits 0.6 px outside the border so its outline runs just inside the image
    ys, xs = (np.concatenate([[-0.6], np.arange(n), [n - 0.4]]) for n in region.shape)
    ax.contour(xs, ys, padded, levels=[0.5], colors=[color], linestyles=[style],
               linewidths=width)


def slice_dice(mask: np.ndarray, pred: np.ndarray, classes: Sequence[int]) -> float:
    """Mean foreground Dice of one slice over ``classes`` (a class absent from both counts 1)."""
    scores = []
    for c in classes:
        a, b = mask == c, pred == c
        total = a.sum() + b.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total)
    return float(np.mean(scores)) if scores else float("nan")


def _panel(ax: Axes, image: np.ndarray, mask: np.ndarray, pred: np.ndarray | None,
           classes: Sequence[int], width: float, show_dice: bool) -> None:
    low, high = np.percentile(image, [1, 99])
    ax.imshow(image, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), interpolation="nearest")
    for c, style in zip(classes, LINESTYLES, strict=False):
        _contour(ax, mask == c, MASK_COLOR, style, width)
        if pred is not None:
            _contour(ax, pred == c, PRED_COLOR, style, width)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)  # contours of border regions must not widen it
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    note = "not evaluated" if pred is None else f"Dice {slice_dice(mask, pred, classes):.2f}"
    if show_dice or pred is None:
        ax.text(0.02, 0.02, note, transform=ax.transAxes,
                color="white", fontsize=8, va="bottom",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_handles(classes: Sequence[int], class_names: Sequence[str] | None) -> list[Line2D]:
    handles = [Line2D([], [], color=MASK_COLOR, lw=2.5, label="ground truth"),
               Line2D([], [], color=PRED_COLOR, lw=2.5, label="prediction")]
    if len(classes) > 1:
        for c, style in zip(classes, LINESTYLES, strict=False):
            name = class_names[c] if class_names and c < len(class_names) else f"class {c}"
            handles.append(Line2D([], [], color="gray", lw=1.5, linestyle=style, label=name))
    return handles


def overlay_grid(
    images,
    masks,
    preds,
    titles: Sequence[str] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    channel: int | None = None,
    ncols: int | None = None,
    panel_inches: float = 2.2,
    linewidth: float = 1.6,
    show_dice: bool = True,
    suptitle: str | None = None,
) -> Figure:
    """Overlay grid of N slices.

    Args:
        images: [N, C, H, W] or [N, H, W] tensors or arrays (shown in gray, per-panel 1-99th
            percentile window; ``channel`` picks the channel, default the middle one).
        masks: [N, H, W] integer ground-truth label maps (0 = background).
        preds: [N, H, W] integer predicted label maps, or a mapping ``{model: [N, H, W]}``:
            then every slice is a row and every model a column (global vs personalized ...).
            A model's entry may also be a list of N [H, W] maps with None where that model
            has no prediction (the panel then shows the ground truth only).
        titles: one per slice (panel titles; row labels with several models).
        class_names: names of the labels (``class_names[c]``), shown in the legend when there
            are several foreground classes.
        num_classes: foreground classes drawn are 1..num_classes-1 (default: the largest label).
        ncols: slices per row (each takes one column per model); default up to 4 slices for
            a single prediction set, else as many as fit in about 6 columns.
        show_dice: write each panel's foreground Dice in its corner.
        suptitle: figure title (drawn above the legend).
    """
    gray = _gray(images, channel)
    masks = _labels(masks, "masks", gray.shape)
    columns = dict(preds) if isinstance(preds, Mapping) else {"": preds}
    if not columns:
        raise ValueError("preds is an empty mapping: give at least one model's predictions")
    columns = {name: _column(p, f"preds[{name!r}]" if name else "preds", gray.shape)
               for name, p in columns.items()}
    count = gray.shape[0]
    if count == 0:
        raise ValueError("no slices to draw (images has N = 0)")
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles has {len(titles)} entries for {count} slices")
    found = [int(p.max()) for col in columns.values() for p in col if p is not None]
    top = num_classes - 1 if num_classes else max(int(masks.max()), *found, 1)
    classes = list(range(1, top + 1))
    models = list(columns)
    cells = _layout(count, models, ncols)
    rows, cols = max(r for r, _, _, _ in cells) + 1, max(c for _, c, _, _ in cells) + 1
    fig = new_figure(panel_inches * cols, panel_inches * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, c, i, model in cells:
        ax = axes[r, c]
        ax.set_axis_on()
        _panel(ax, gray[i], masks[i], columns[model][i], classes, linewidth, show_dice)
        _label(ax, r, model == models[0], model, titles[i] if titles is not None else None)
    fig.legend(handles=_legend_handles(classes, class_names), loc="outside upper center",
               ncols=2 + (len(classes) if len(classes) > 1 else 0), fontsize=9, frameon=False,
               title=suptitle, title_fontproperties={"size": 11, "weight": "bold"})
    return fig


def _layout(count: int, models: list[str], ncols: int | None) -> list[tuple[int, int, int, str]]:
    """(row, column, slice index, model) of every panel: ``ncols`` slices per row, each slice
    taking one column per model (defaults: 4 slices, or as many as fit in about 6 columns)."""
    width = len(models)
    per_row = ncols or (min(count, 4) if width == 1 else max(1, min(count, 6 // width)))
    return [(i // per_row, (i % per_row) * width + j, i, m)
            for i in range(count) for j, m in enumerate(models)]


def _label(ax: Axes, row: int, first: bool, model: str, title: str | None) -> None:
    """Model names over the first row; the slice title left of its first panel (or, for a
    single unnamed prediction set, over each panel)."""
    if not model:
        if title:
            ax.set_title(title, fontsize=9)
        return
    if row == 0:
        ax.set_title(model, fontsize=10, fontweight="bold")
    if first and title:
        ax.set_ylabel(title, fontsize=8)
