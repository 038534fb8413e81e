"""Progress-bar text: which federated round and which site is training."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


def describe_round(trainer: pl.Trainer, round_idx: int, site: str) -> None:
    """Sets the training bar's description to ``Round R · site NAME``.

    Works with Lightning's default bars: Rich (the default when ``rich`` is installed) and
    TQDM (or any bar exposing ``train_progress_bar.set_description``); does nothing when the
    bar is disabled or of another kind.
    """
    bar = trainer.progress_bar_callback
    text = f"Round {round_idx} · site {site}"
    if isinstance(bar, RichProgressBar):
        if bar.progress is not None and bar.train_progress_bar_id is not None:
            bar.progress.update(bar.train_progress_bar_id, description=text)
        return
    tqdm_bar = getattr(bar, "train_progress_bar", None)
    if tqdm_bar is not None and hasattr(tqdm_bar, "set_description"):
        tqdm_bar.set_description(text, refresh=False)
