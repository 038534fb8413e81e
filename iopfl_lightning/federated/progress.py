"""A progress bar that says which federated round and which site is training."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class FederatedProgressBar(TQDMProgressBar):
    """TQDM bar whose description reads ``Round R · site NAME`` while a client trains.

    The site comes from the batch's client index (``client_id``, read on the CPU by the
    datamodule) and the datamodule's ``inside_sites``; the round is the epoch.
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch, batch_idx: int) -> None:
        sites = getattr(trainer.datamodule, "inside_sites", None)
        client = batch.get("client_id") if isinstance(batch, dict) else None
        if sites and client is not None and self.train_progress_bar is not None:
            name = sites[client] if 0 <= client < len(sites) else client
            self.train_progress_bar.set_description(
                f"Round {trainer.current_epoch} · site {name}", refresh=False
            )
