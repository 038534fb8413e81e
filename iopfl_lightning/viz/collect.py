"""Picks a few fixed slices per site during ``test`` and keeps every model's prediction of them.

For each site the first ``cases_per_site`` cases seen (test loaders are not shuffled, so the
same cases in every run) are kept, each by its slice with the largest ground-truth area (the
most telling slice of a scan). Work per batch is a few tensor reductions plus a loop over the
kept cases present in it; only the kept slices are copied to the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure
from torch import Tensor

from iopfl_lightning.viz.overlays import overlay_grid


@dataclass
class _Kept:
    site: str
    case: int
    slice: int
    area: int
    image: Tensor  # [H, W] float32, the display channel
    mask: Tensor  # [H, W] uint8
    preds: dict[str, Tensor] = field(default_factory=dict)  # model -> [H, W] uint8


class OverlayCases:
    """Args:
    cases_per_site: cases kept per site (0 keeps nothing and draws nothing).
    channel: image channel shown (default the middle one).
    num_classes: label count, for the legend and the contours drawn.
    """

    def __init__(self, cases_per_site: int = 2, channel: int | None = None,
                 num_classes: int | None = None) -> None:
        if cases_per_site < 0:
            raise ValueError(f"cases_per_site must be >= 0, got {cases_per_site}")
        self.cases_per_site = cases_per_site
        self.channel = channel
        self.num_classes = num_classes
        self._chosen: dict[str, list[int]] = {}
        self._kept: dict[tuple[str, int], _Kept] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def _wanted(self, site: str, cases: Tensor) -> list[int]:
        """Kept cases present in this batch, choosing new ones while the site has room."""
        chosen = self._chosen.setdefault(site, [])
        present = torch.unique(cases).tolist()
        for case in present:
            if len(chosen) < self.cases_per_site and case not in chosen:
                chosen.append(case)
        return [case for case in present if case in chosen]

    def update(self, site: str, batch: dict, logits: Mapping[str, Tensor]) -> None:
        """Offers one test batch and each model's logits (or one-hot scores) [B, C, H, W]."""
        if self.cases_per_site == 0:
            return
        wanted = self._wanted(site, batch["case"])
        if not wanted:
            return
        area = (batch["mask"] > 0).flatten(1).sum(1)
        for case in wanted:
            rows = (batch["case"] == case).nonzero().flatten()
            best = int(rows[area[rows].argmax()])
            kept = self._kept.get((site, case))
            if kept is not None and kept.area >= int(area[best]):
                continue
            self._kept[(site, case)] = self._keep(site, case, best, int(area[best]), batch, logits)

    def _keep(self, site: str, case: int, i: int, area: int, batch: dict,
              logits: Mapping[str, Tensor]) -> _Kept:
        image = batch["image"][i]
        channel = image.shape[0] // 2 if self.channel is None else self.channel
        slices = batch.get("slice")
        return _Kept(
            site=site, case=case, slice=int(slices[i]) if slices is not None else -1, area=area,
            image=image[channel].detach().float().cpu(),
            mask=batch["mask"][i].detach().to(torch.uint8).cpu(),
            preds={m: v[i].detach().argmax(0).to(torch.uint8).cpu() for m, v in logits.items()},
        )

    def figure(self, title: str | None = None) -> Figure | None:
        """The overlay grid, or None if empty: one row per site when its kept slices fit
        (each slice one column per model), else fewer slices per row.
        A model that a site was not evaluated with (no personalized copy for an outside site)
        leaves that panel with the ground truth only, labelled ``not evaluated``."""
        if not self._kept:
            return None
        kept = list(self._kept.values())
        models = list(dict.fromkeys(m for k in kept for m in k.preds))
        preds = {m: [k.preds.get(m) for k in kept] for m in models}
        titles = [f"{k.site} case {k.case}" + (f" slice {k.slice}" if k.slice >= 0 else "")
                  for k in kept]
        per_site = max(sum(k.site == s for k in kept) for s in {k.site for k in kept})
        ncols = per_site if per_site * len(models) <= 8 else max(1, 8 // len(models))
        return overlay_grid(torch.stack([k.image for k in kept]),
                            torch.stack([k.mask for k in kept]).long(), preds, titles,
                            num_classes=self.num_classes, ncols=ncols, suptitle=title)
