"""Routing heatmap: the mean mixture weight of every expert in every routed layer.

Rows are layers (input to output), columns are experts (the K personalized models, then the
global model). A uniform mixture is one flat colour; a layer that leans on one site's model
shows one bright cell. The colour scale starts at 0 so rows are comparable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from iopfl_lightning.viz.figures import new_figure, to_numpy

__all__ = ["routing_heatmap"]


def _matrix(weights, layer_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """[L, E] weights and L layer names from an array or a ``{layer: [E]}`` mapping."""
    if isinstance(weights, Mapping):
        if not weights:
            raise ValueError("no mixture weights to draw: turn recording on "
                             "(nets.set_mixture_recording) and run the routed net first")
        names = list(weights) if layer_names is None else list(layer_names)
        rows = [to_numpy(weights[n], f"weights[{n!r}]").reshape(-1) for n in names]
        if len({r.size for r in rows}) != 1:
            raise ValueError(f"layers have different expert counts: {[r.size for r in rows]}")
        return np.stack(rows).astype(np.float64), names
    matrix = to_numpy(weights, "weights").astype(np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"weights must be [layers, experts], got shape {matrix.shape}")
    names = [f"layer {i}" for i in range(len(matrix))] if layer_names is None else list(layer_names)
    return matrix, names


def routing_heatmap(
    weights,
    layer_names: Sequence[str] | None = None,
    expert_names: Sequence[str] | None = None,
    *,
    title: str | None = "Mean routing weights",
    annotate: bool | None = None,
) -> Figure:
    """Heatmap of mean mixture weights, layers x experts.

    Args:
        weights: [L, E] array/tensor, or ``{layer name: [E]}`` as ``nets.mixture_weights``
            returns (then ``layer_names`` defaults to its keys).
        layer_names: L row labels. expert_names: E column labels (default ``expert j``).
        annotate: write each value in its cell (default when there are at most 300 cells).
    """
    matrix, names = _matrix(weights, layer_names)
    layers, experts = matrix.shape
    if len(names) != layers:
        raise ValueError(f"{len(names)} layer names for {layers} layers")
    experts_shown = ([f"expert {j}" for j in range(experts)] if expert_names is None
                     else list(expert_names))
    if len(experts_shown) != experts:
        raise ValueError(f"{len(experts_shown)} expert names for {experts} experts")
    fig = new_figure(2.6 + 0.75 * experts, 1.4 + 0.24 * layers)
    ax = fig.subplots()
    top = float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1.0
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(top, 1e-6), aspect="auto")
    ax.set_xticks(range(experts), experts_shown, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(layers), names, fontsize=7)
    ax.set_xlabel("expert")
    if annotate if annotate is not None else layers * experts <= 300:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if value > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, label="mean mixture weight")
    if title:
        ax.set_title(title, fontsize=10)
    return fig
