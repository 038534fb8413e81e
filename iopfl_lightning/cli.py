"""``python -m iopfl_lightning {fit,validate,test,predict} --config FILE`` (also ``iopfl``).

A LightningCLI over any LightningModule of this package (``model.class_path``) and the
MultiSiteDataModule. After ``fit`` the test split is evaluated with the final weights
(``--test_after_fit false`` to skip), so one command ends with the per-site results table.

Every trainer gets :class:`~iopfl_lightning.checkpoint_io.AtomicCheckpointIO` (atomic checkpoint
writes, ``weights_only=True`` loads of ``--ckpt_path``) unless another CheckpointIO plugin is given.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from iopfl_lightning.checkpoint_io import use_atomic_checkpoints
from iopfl_lightning.data import MultiSiteDataModule


class IOPFLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after fit, evaluate the test split and write results.csv/results.md",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)


def main(args: list[str] | None = None) -> IOPFLCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return IOPFLCLI(
        LightningModule,
        MultiSiteDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": False},
        args=args,
        auto_configure_optimizers=False,
    )
