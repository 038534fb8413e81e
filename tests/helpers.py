"""Tiny, fast building blocks shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl

from iopfl_lightning.data import MultiSiteDataModule
from iopfl_lightning.modules import SegmentationModule

TINY_SITES = ["BIDMC", "HK", "UCL"]
TINY_SYNTHETIC = {"size": 32, "slices": 4, "cases_per_split": {"train": 2, "val": 1, "test": 1}}


def tiny_datamodule(**overrides) -> MultiSiteDataModule:
    kwargs = {"sites": TINY_SITES, "batch_size": 3, "synthetic": TINY_SYNTHETIC, "seed": 0}
    kwargs.update(overrides)
    dm = MultiSiteDataModule(format="synthetic", **kwargs)
    dm.setup("fit")
    return dm


def tiny_module(seed: int = 0, **overrides) -> SegmentationModule:
    pl.seed_everything(seed, verbose=False)
    kwargs = {"net": "unet", "in_channels": 3, "num_classes": 2, "features": 4, "val_hd95": False}
    kwargs.update(overrides)
    return SegmentationModule(**kwargs)


def tiny_trainer(max_epochs: int, callbacks: list, root, **overrides) -> pl.Trainer:
    """A quiet CPU trainer writing into ``root`` (a tmp_path: nothing lands in the checkout)."""
    kwargs = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(overrides)
    return pl.Trainer(callbacks=callbacks, **kwargs)
