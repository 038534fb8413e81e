"""Per-site bar charts of result rows (one implementation for the run folder and the tools).

Rows are dicts as the package writes them (``results.csv``: ``site, model, dice, hd95``;
values may be strings, as ``csv.DictReader`` gives them). Sites go along the x axis, one bar
per ``group`` value (the evaluated model, or a method in the comparison tool).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from iopfl_lightning.results import shared_sites
from iopfl_lightning.viz.figures import new_figure

__all__ = ["METRIC_LABELS", "site_bar_chart"]

METRIC_LABELS = {"dice": "foreground Dice per case", "hd95": "HD95 per case (px)"}
MEAN = "mean"


def _value(row: Mapping, key: str | None) -> float:
    if key is None or row.get(key) in (None, ""):
        return float("nan")
    try:
        return float(row[key])
    except (TypeError, ValueError) as err:
        raise ValueError(f"result row {dict(row)}: {key}={row[key]!r} is not a number") from err


def _grid(rows: Sequence[Mapping], metric: str, group: str, error: str | None,
          add_mean: bool) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Sites, groups, values [G, S] and errors [G, S] (NaN where a pair is missing)."""
    for row in rows:
        for key in ("site", group, metric):
            if key not in row:
                raise ValueError(f"result row {dict(row)} has no {key!r} column")
    sites = list(dict.fromkeys(str(r["site"]) for r in rows))
    groups = list(dict.fromkeys(str(r[group]) for r in rows))
    values = np.full((len(groups), len(sites)), np.nan)
    errors = np.zeros_like(values)
    err_key = error.format(metric=metric) if error else None
    for row in rows:
        g, s = groups.index(str(row[group])), sites.index(str(row["site"]))
        values[g, s] = _value(row, metric)
        errors[g, s] = _value(row, err_key)
    if add_mean and MEAN not in sites and len(sites) > 1:
        # over the sites every group was scored on, as the results table's mean row
        common = set(shared_sites([{"site": str(r["site"]), "model": str(r[group])}
                                   for r in rows]))
        shared = values[:, [s in common for s in sites]]
        means = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in shared]
        sites.append(MEAN)
        values = np.column_stack([values, means])
        errors = np.column_stack([errors, np.zeros(len(groups))])
    return sites, groups, values, np.nan_to_num(errors)


def _bars(ax: Axes, sites: list[str], groups: list[str], values: np.ndarray,
          errors: np.ndarray, labels: bool) -> None:
    width = 0.8 / len(groups)
    x = np.arange(len(sites))
    for g, name in enumerate(groups):
        offset = (g - (len(groups) - 1) / 2) * width
        bars = ax.bar(x + offset, values[g], width, yerr=errors[g] if errors[g].any() else None,
                      capsize=2, label=name, color=f"C{g % 10}")
        if labels:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, sites, rotation=30 if len(sites) > 4 else 0, ha="right"
                  if len(sites) > 4 else "center")


def site_bar_chart(
    rows: Sequence[Mapping],
    metric: str | Sequence[str] = "dice",
    *,
    group: str = "model",
    error: str | None = None,
    add_mean: bool = True,
    title: str | None = None,
) -> Figure:
    """Bar chart of ``metric`` per site, one bar per ``group`` value, legend naming them.

    Args:
        rows: result rows with ``site``, ``group`` and the metric columns.
        metric: ``dice``, ``hd95`` (or any numeric column), or several: one panel each.
        group: the column whose values get one bar each (``model``; ``method`` in the tools).
        error: column template of error bars, e.g. ``"{metric}_std"`` (NaN draws none).
        add_mean: append a ``mean`` over the sites every group has a row for (NaN skipped),
            unless rows already have one.
        title: figure title.
    """
    if not rows:
        raise ValueError("no result rows to chart")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    first = _grid(rows, metrics[0], group, error, add_mean)
    sites, groups = first[0], first[1]
    fig = new_figure(max(3.2, 1.0 + 0.35 * len(sites) * (len(groups) + 0.6)) * len(metrics), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, name in zip(axes, metrics, strict=True):
        s, g, values, errors = _grid(rows, name, group, error, add_mean)
        _bars(ax, s, g, values, errors, labels=values.size <= 16)
        ax.set_ylabel(METRIC_LABELS.get(name, name))
        if name == "dice":
            ax.set_ylim(0, 1.08)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.legend(*axes[0].get_legend_handles_labels(), title=group, fontsize=8, title_fontsize=8,
               loc="outside right upper", frameon=False)
    if title:
        fig.suptitle(title)
    return fig
