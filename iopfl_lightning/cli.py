"""``python -m iopfl_lightning {fit,validate,test} --config FILE`` (also ``iopfl``).

A LightningCLI over any LightningModule of this package (``model.class_path``) and the
MultiSiteDataModule. After ``fit`` the test split is evaluated with the final weights
(``--test_after_fit false`` to skip), so one command ends with the per-site results table.

Every trainer gets :class:`~iopfl_lightning.checkpoint_io.AtomicCheckpointIO` (atomic checkpoint
writes, ``weights_only=True`` loads of ``--ckpt_path``) unless another CheckpointIO plugin is given.

The results table is logged (markdown) at the end of ``test``, so ``test`` skips Lightning's
own metric dump by default (``--verbose true`` brings it back); ``validate`` prints it. There is
no ``predict``: the modules have no prediction output to write yet. With wandb as
the logger (:class:`~iopfl_lightning.tracking.WandbRunLogger`) the resolved config goes into
the wandb run and the run is closed when the command ends.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from iopfl_lightning import tracking
from iopfl_lightning.checkpoint_io import use_atomic_checkpoints
from iopfl_lightning.data import MultiSiteDataModule
from iopfl_lightning.fileio import safe_torch_load

log = logging.getLogger(__name__)


class TrackedSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run folder as usual, and puts the same resolved config
    into the wandb run when wandb is the logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        tracking.log_config(trainer, self.config.as_dict())


class IOPFLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after fit, evaluate the test split and write results.csv/results.md",
        )

    def parse_arguments(self, parser, args) -> None:
        """Parses, then opens ``--ckpt_path`` safely before LightningCLI reads its hyperparameters,
        so a truncated file or a pickle payload is refused with an error naming the file."""
        parser.set_defaults({"test.verbose": False})
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            hparams = safe_torch_load(ckpt_path).get("hyper_parameters") or {}
            _warn_overridden(self.config[subcommand].get("model"), hparams, ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer

    def _refuse_used_run_folder(self) -> None:
        """Lightning creates a CSV logger's writer before any callback runs, and that writer
        deletes an existing ``metrics.csv``; so a run forced into a used version folder would
        lose it even though ``config.yaml`` then stops the run. Refuse first."""
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger) and getattr(logger, "_experiment", None) is None:
                tracking.refuse_used_run_folder(logger.log_dir)

    before_fit = before_validate = before_test = _refuse_used_run_folder

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, without ``predict`` (no module here has a prediction output)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)


def _warn_overridden(model_config: Any, hparams: dict, ckpt_path: str) -> None:
    """LightningCLI builds the model from the checkpoint's hyperparameters, silently replacing
    model arguments given now; say which ones."""
    init_args = getattr(model_config, "init_args", None)
    if init_args is None:
        return
    given = dict(vars(init_args))
    # None asks for the data's value (in_channels, num_classes): nothing is overridden then
    changed = {k: (given[k], v) for k, v in hparams.items()
               if given.get(k) is not None and given[k] != v}
    for key, (now, saved) in changed.items():
        log.warning("--ckpt_path %s: model %s=%r is ignored, the checkpoint's %r is used; "
                    "to run with %r, start without --ckpt_path", ckpt_path, key, now, saved, now)


# Lightning warnings that are expected in our runs and ask nothing of the user: an outside
# (routing) run has a datamodule with validation loaders for inside runs but no validation step;
# and a deprecation inside Lightning's own pytree helper.
_EXPECTED_WARNINGS = (
    r".*passed in a `val_dataloader` but have no `validation_step`.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


def main(args: list[str] | None = None) -> IOPFLCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    cli = IOPFLCLI(
        LightningModule,
        MultiSiteDataModule,
        subclass_mode_model=True,
        save_config_callback=TrackedSaveConfig,
        save_config_kwargs={"overwrite": False},
        args=args,
        auto_configure_optimizers=False,
    )
    tracking.finish(getattr(cli, "trainer", None))
    return cli
