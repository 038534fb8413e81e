"""Per-round checkpoints: how long a round waits for its checkpoint, ours vs Lightning's stock way.

- ``stock`` (the baseline, how a Lightning run is usually set up): ``ModelCheckpoint(save_last=
  True, every_n_epochs=1)`` writes the round's epoch file and ``last.ckpt``, two full copies,
  through Lightning's ``TorchCheckpointIO``, optimizer moments included.
- ``one_file``: what the experiment configs do (``filename: last``: one file overwritten each
  round), atomic writes, moments left out between rounds (``FederatedTrainer.on_save_checkpoint``),
  written synchronously.
- ``ours``: the same, written by a worker thread during fit (``BackgroundCheckpointIO``, the
  CLI's default); the round waits only for the snapshot of the tensors.

Measured per variant: main-thread milliseconds per round spent in ModelCheckpoint's hooks (what
delays the next round; CUDA-synchronised), megabytes written per round, and the wall time of
the whole fit including its final wait for pending writes. Rounds train without evaluation
(``limit_val_batches=0``): the checkpoint costs the same either way.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import summary, time_methods
from federated_bench import ALPHA, LR, FedConfig, make_datamodule, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from iopfl_lightning.checkpoint_io import use_atomic_checkpoints
from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.modules import SegmentationModule

VARIANTS = ("stock", "one_file", "ours")


class _KeepMoments(FederatedTrainer):
    """The engine with Lightning's default checkpoint content (optimizer moments included)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        pass


def _run(cfg: FedConfig, device: torch.device, variant: str, dm) -> dict:
    pl.seed_everything(cfg.seed, verbose=False)
    module = SegmentationModule(net="unet", features=cfg.features, lr=LR, val_hd95=False,
                                channels_last=cfg.channels_last)
    fed = (_KeepMoments if variant == "stock" else FederatedTrainer)(alpha=ALPHA)
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "checkpoints"
        if variant == "stock":
            ckpt = ModelCheckpoint(dirpath=folder, save_last=True, every_n_epochs=1)
        else:
            ckpt = ModelCheckpoint(dirpath=folder, filename="last", every_n_epochs=1)
        waits = time_methods(ckpt, ["on_train_epoch_end", "on_train_end"], device)
        trainer = quiet_trainer(device, root, precision=cfg.precision, max_epochs=cfg.rounds,
                                callbacks=[fed, ckpt], enable_checkpointing=True,
                                limit_val_batches=0)
        if variant != "stock":
            use_atomic_checkpoints(trainer, background=variant == "ours")
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)  # returns after pending background writes
        fit_s = time.perf_counter() - start
        files = sorted(folder.glob("*.ckpt"))
        written = sum(f.stat().st_size for f in files)  # every file is rewritten every round
    return {"wait_ms_per_round": summary(waits["on_train_epoch_end"]),
            "wait_ms_at_end": sum(waits["on_train_end"]), "files": [f.name for f in files],
            "mb_written_per_round": written / 2**20, "fit_s": fit_s}


def checkpoint_bench(cfg: FedConfig, device: torch.device) -> dict:
    dm = make_datamodule(cfg)
    return {name: _run(cfg, device, name, dm) for name in VARIANTS}
