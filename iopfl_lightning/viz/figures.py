"""Figure plumbing shared by the charts: creation without pyplot, PNG bytes, atomic saving.

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no global
figure registry to leak memory in long runs, no GUI backend needed on a headless server, and
rendering goes through the Agg canvas. In Jupyter a returned Figure still displays inline.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from iopfl_lightning.fileio import atomic_write_bytes

DPI = 110


def new_figure(width: float, height: float) -> Figure:
    """A Figure on an Agg canvas with constrained layout (labels never overlap)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Writes ``fig`` as a PNG at ``path`` atomically (a crash never leaves half a file)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; got path {path} (use a .png name)")
    return atomic_write_bytes(path, figure_png(fig, dpi))


def to_numpy(value, name: str) -> np.ndarray:
    """A tensor or array-like as a CPU numpy array (``name`` is used in errors)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()  # bf16: no numpy
    try:
        return np.asarray(value)
    except Exception as err:
        raise TypeError(f"{name}: cannot convert {type(value).__name__} to an array") from err
