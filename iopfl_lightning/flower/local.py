"""One site's side of a round: local training from the global weights, and evaluation.

A :class:`SiteRuntime` is built once per process (a SuperNode starts a ClientApp process per
message; a simulation actor serves many) from the experiment YAML: the model, a data module over
the site alone, and the federation's settings.

Local training reproduces what the in-process engine does for this client in this round: the
same batches in the same order (the engine's :class:`ClientBatchSampler` plan, seeded by
``(seed, round, client index, pass)``), ``local_epochs`` passes, a fresh optimizer from the
module's ``configure_optimizers`` (the engine's default ``optimizer_state="reset"``), through a
Lightning Trainer with the YAML's step-relevant options (precision, clipping, accelerator).
With a random ``train_transform`` the augmentation draws differ from the in-process engine's.

Evaluation runs the module's own validation/test steps (per-case foreground Dice and HD95) on
the global weights and, through ``personalized_states``, on the site's personalized copy.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from iopfl_lightning.data.sampler import ClientBatchSampler
from iopfl_lightning.federated.state import clone_state
from iopfl_lightning.flower.experiment import Experiment, load_experiment, site_datamodule

log = logging.getLogger(__name__)
MODELS = ("global", "personalized")


class _StatesToDevice(pl.Callback):
    """Moves the published personalized copy to the module's device before evaluating."""

    def _move(self, pl_module: pl.LightningModule) -> None:
        pl_module.personalized_states = {
            site: {k: v.to(pl_module.device) for k, v in state.items()}
            for site, state in pl_module.personalized_states.items()
        }

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._move(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._move(pl_module)


class SiteRuntime:
    """Model, one-site data and settings of ``site`` (client ``index``) for this process."""

    def __init__(self, experiment: Experiment, site: str, index: int, folder: Path | None):
        self.experiment = experiment
        self.site, self.index, self.folder = site, index, folder
        self.model = experiment.model
        self.datamodule = site_datamodule(experiment, site)
        self.num_examples = int(self.datamodule.client_sample_counts()[0])
        self.reference = clone_state(self.model.net.state_dict())
        fed = experiment.federation
        # the method's alpha: method_args may override the callback's (as in the engine)
        self.alpha, self.local_epochs = fed.method.alpha, fed.local_epochs
        self._root = str(folder) if folder is not None else tempfile.mkdtemp(prefix="iopfl-site-")

    # ------------------------------------------------------------------ training
    def round_batches(self, round_idx: int) -> list[list[int]]:
        """This client's batches of round ``round_idx`` (0-based), as the engine's sampler plans
        them: only this client's count is non-zero, so indices are local to its dataset."""
        sizes = [0] * len(self.experiment.sites)
        sizes[self.index] = self.num_examples
        sampler = ClientBatchSampler(
            sizes, self.datamodule.batch_size, seed=self.datamodule.seed,
            participants=lambda epoch: [self.index], local_epochs=self.local_epochs,
            epoch=round_idx,
        )
        return [batch for _, batch in sampler.plan(round_idx)]

    def train(self, global_state: Mapping[str, Tensor], round_idx: int) -> dict[str, Tensor]:
        """Local training from ``global_state``; returns the locally trained state (CPU)."""
        self.model.net.load_state_dict(global_state)
        dm = self.datamodule
        loader = DataLoader(
            dm.dataset(self.site, "train"), batch_sampler=self.round_batches(round_idx),
            num_workers=dm.num_workers, pin_memory=dm.pin_memory,
        )
        trainer = self._trainer(limit_val_batches=0)
        with warnings.catch_warnings():  # validation is the server's call, not a missing loader
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            trainer.fit(self.model, train_dataloaders=loader)
        return {k: v.detach().cpu().clone() for k, v in self.model.net.state_dict().items()}

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, global_state: Mapping[str, Tensor], personal: Mapping[str, Tensor] | None, split: str
    ) -> dict[str, float]:
        """``{split}-{global|personalized}-{dice|hd95}`` on this site (NaN entries dropped)."""
        if split not in ("val", "test"):
            raise ValueError(f"evaluation split must be 'val' or 'test', got {split!r}")
        self.model.net.load_state_dict(global_state)
        self.model.personalized_states = {self.site: dict(personal)} if personal else {}
        trainer = self._trainer()
        run = trainer.validate if split == "val" else trainer.test
        run(self.model, datamodule=self.datamodule, verbose=False)
        out: dict[str, float] = {}
        for model in MODELS:
            for metric in ("dice", "hd95"):
                value = trainer.callback_metrics.get(f"{split}/{self.site}/{model}/{metric}")
                if value is not None and torch.isfinite(value):
                    out[f"{split}-{model}-{metric}"] = float(value)
        out[f"{split}-cases"] = len(self.datamodule.site_data[self.site][split])
        self.model.personalized_states = {}
        return out

    def _trainer(self, **overrides: Any) -> pl.Trainer:
        kwargs = {k: v for k, v in self.experiment.trainer_args.items() if v is not None}
        kwargs.update(
            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=self._root,
            callbacks=[_StatesToDevice()], **overrides,
        )
        return pl.Trainer(**kwargs)


_RUNTIMES: dict[tuple, SiteRuntime] = {}


def get_runtime(
    config: str, data_root: str | None, site_of, folder_of, torch_threads: int = 0
) -> SiteRuntime:
    """The process's runtime for this node, built on first use.

    ``site_of(sites) -> (site, index)`` and ``folder_of(site) -> Path | None`` resolve the node's
    identity once the YAML's site list is known.
    """
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    experiment = _experiment(config, data_root)
    site, index = site_of(experiment.sites)
    folder = folder_of(site)
    key = (config, data_root, site, str(folder))
    if key not in _RUNTIMES:
        _RUNTIMES[key] = SiteRuntime(experiment, site, index, folder)
        log.info("site %s (client %d): %d training slices, folder %s",
                 site, index, _RUNTIMES[key].num_examples, folder)
    return _RUNTIMES[key]


_EXPERIMENTS: dict[tuple, Experiment] = {}


def _experiment(config: str, data_root: str | None) -> Experiment:
    key = (config, data_root)
    if key not in _EXPERIMENTS:
        _EXPERIMENTS[key] = load_experiment(config, data_root)
    return _EXPERIMENTS[key]
