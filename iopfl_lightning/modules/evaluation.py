"""Per-site, per-model evaluation shared by the LightningModules.

Holds one pair of per-case metrics (foreground Dice, HD95) for each (site, model) seen, creates
them on the device of the first batch, and turns them into result rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iopfl_lightning.metrics import CaseDice, CaseHD95


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
    """``{model}/dice_mean`` and ``{model}/hd95_mean`` over sites, for logging."""
    out: dict[str, Tensor] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        out[f"{model}/dice_mean"] = torch.tensor(sum(r["dice"] for r in mine) / len(mine))
        out[f"{model}/hd95_mean"] = torch.tensor(sum(r["hd95"] for r in mine) / len(mine))
    return out
