"""Per-site, per-model evaluation and the end-of-test report, shared by the LightningModules.

``SiteEvaluator`` holds one pair of per-case metrics (foreground Dice, HD95) for each (site,
model) seen, creates them on the device of the first batch, and turns them into result rows.
``log_rows`` logs them under stable names; ``report_test`` writes the run folder's tables and
pictures and hands everything to the experiment tracker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from iopfl_lightning import tracking
from iopfl_lightning.metrics import CaseDice, CaseHD95
from iopfl_lightning.nets.routed import mixture_weights
from iopfl_lightning.results import model_means, write_results
from iopfl_lightning.viz import save_figure, site_bar_chart
from iopfl_lightning.viz.collect import OverlayCases

log = logging.getLogger(__name__)


class SiteEvaluator:
    def __init__(self, num_classes: int, hd95: bool = True):
        self.num_classes = num_classes
        self.hd95 = hd95
        self._metrics: dict[tuple[str, str], tuple[CaseDice, CaseHD95 | None]] = {}

    def update(self, site: str, model: str, logits: Tensor, batch: dict) -> None:
        key = (site, model)
        if key not in self._metrics:
            dice = CaseDice(self.num_classes).to(logits.device)
            hd = CaseHD95(self.num_classes).to(logits.device) if self.hd95 else None
            self._metrics[key] = (dice, hd)
        preds = logits.argmax(1)
        for metric in self._metrics[key]:
            if metric is not None:
                metric.update(preds, batch["mask"], batch["case"], batch.get("slice"))

    def rows(self) -> list[dict]:
        """One row per (site, model) in insertion order; resets the metrics."""
        out = []
        for (site, model), (dice, hd) in self._metrics.items():
            row = {
                "site": site,
                "model": model,
                "dice": float(dice.compute()),
                "hd95": float(hd.compute()) if hd is not None else float("nan"),
                "cases": int(dice.per_case()[0].numel()),
            }
            out.append(row)
        self._metrics.clear()
        return out


def means_by_model(rows: list[dict]) -> dict[str, Tensor]:
    """``{model}/dice_mean`` and ``{model}/hd95_mean`` over the sites every model was scored
    on (``results.model_means``), for logging."""
    return {f"{model}/{metric}_mean": torch.tensor(value)
            for model, means in model_means(rows).items() for metric, value in means.items()}


def log_rows(module: pl.LightningModule, stage: str, rows: list[dict], hd95: bool = True) -> None:
    """Logs ``{stage}/{site}/{model}/{dice,hd95}`` and ``{stage}/{model}/{dice,hd95}_mean``:
    the names runs are compared by (in wandb too), kept stable across versions. ``hd95=False``
    (not computed, e.g. ``val_hd95: false``) logs Dice only instead of a column of NaNs."""
    metrics = ("dice", "hd95") if hd95 else ("dice",)
    for row in rows:
        for metric in metrics:
            module.log(f"{stage}/{row['site']}/{row['model']}/{metric}", row[metric],
                       add_dataloader_idx=False)
    for name, value in means_by_model(rows).items():
        if hd95 or not name.endswith("hd95_mean"):
            module.log(f"{stage}/{name}", value, prog_bar=name.endswith("dice_mean"),
                       add_dataloader_idx=False)


def report_test(module: pl.LightningModule, rows: list[dict], title: str,
                overlays: OverlayCases | None = None,
                figures: Mapping[str, Figure] | None = None) -> dict[str, Figure]:
    """End of ``test`` on rank 0: ``results.csv``/``results.md`` (the table is also logged),
    ``site_bars.png``, ``overlays.png`` and any extra ``figures`` (``{name}.png``) in
    ``trainer.log_dir``; then the same rows and figures go to wandb when it is the logger."""
    trainer = module.trainer
    if not rows or not trainer.is_global_zero:
        return {}
    shown = {"site_bars": site_bar_chart(rows, metric=("dice", "hd95"), title=title)}
    overlay = overlays.figure(title) if overlays is not None else None
    if overlay is not None:
        shown["overlays"] = overlay
    shown.update(figures or {})
    folder = trainer.log_dir
    if folder:
        write_results(rows, folder, title=title)
        paths = [save_figure(fig, Path(folder) / f"{name}.png") for name, fig in shown.items()]
        log.info("pictures written: %s", ", ".join(str(p) for p in paths))
    tracking.log_test_report(trainer, rows, shown)
    return shown


class MixtureMeter:
    """Mean mixture weight per routed layer over the samples seen (for the routing heatmap).
    The routed net must record its mixtures (``nets.set_mixture_recording``)."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def reset(self) -> None:
        self._sums.clear()
        self._count = 0

    def update(self, net: nn.Module, batch_size: int) -> None:
        """Adds the batch-mean mixtures of ``net``'s last forward, weighted by the batch size."""
        for name, weights in mixture_weights(net).items():
            total = self._sums.get(name)
            self._sums[name] = weights * batch_size if total is None else total + weights * batch_size
        self._count += batch_size

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().cpu() for k, v in self._sums.items()},
                "count": self._count}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self._sums = {k: v.to(device) for k, v in state["sums"].items()}
        self._count = int(state["count"])

    def mean(self) -> dict[str, Tensor]:
        """``{layer: [E]}`` on the CPU; empty if nothing was recorded."""
        if not self._count:
            return {}
        return {name: (s / self._count).float().cpu() for name, s in self._sums.items()}
