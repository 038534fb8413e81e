"""Progress-bar text: which federated round and which site is training."""

from __future__ import annotations

import lightning.pytorch as pl


def describe_round(trainer: pl.Trainer, round_idx: int, site: str) -> None:
    """Sets the training bar's description to ``Round R · site NAME``.

    Works with Lightning's default TQDM bar (and any bar exposing ``train_progress_bar``);
    does nothing when the bar is disabled or of another kind.
    """
    bar = getattr(trainer.progress_bar_callback, "train_progress_bar", None)
    if bar is not None and hasattr(bar, "set_description"):
        bar.set_description(f"Round {round_idx} · site {site}", refresh=False)
