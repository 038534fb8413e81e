"""Tiny, fast building blocks shared by the tests."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from iopfl_lightning.cli import main
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


REPO = Path(__file__).resolve().parents[1]
TINY_CONFIGS = REPO / "tests" / "configs"


def run_cli(args: list[str], root) -> LightningCLI:
    """Runs the CLI with every output (run folder, logger) under ``root``."""
    return main([*args, "--trainer.default_root_dir", str(root),
                 "--trainer.logger.init_args.save_dir", str(root)])


def fit_rows(config: str, root, *extra: str) -> list[dict]:
    """``fit`` a tiny config from tests/configs; returns the rows of its results.csv."""
    cli = run_cli(["fit", "--config", str(TINY_CONFIGS / config), *extra], root)
    with open(Path(cli.trainer.log_dir) / "results.csv") as handle:
        return list(csv.DictReader(handle))


def load_twin(real: str, twin: str) -> tuple[dict, dict]:
    """Loads an experiment config and its tiny twin, and checks the twin changes values only:
    it never adds a model or data option the real config lacks."""
    full = yaml.safe_load((REPO / "experiments" / real).read_text())
    tiny = yaml.safe_load((TINY_CONFIGS / twin).read_text())
    for section in ("model", "data"):
        tiny_args = tiny[section].get("init_args", tiny[section])
        full_args = full[section].get("init_args", full[section])
        assert set(tiny_args) <= set(full_args), (real, section)
    return full, tiny


def eager_compiles(monkeypatch) -> list[tuple]:
    """Make ``torch.compile`` use the eager backend (real graph capture, no code generation:
    fast on a CPU, and the numbers of the uncompiled run); returns the ``(fn, kwargs)`` of
    every call, in order."""
    calls: list[tuple] = []
    real_compile = torch.compile

    def eager(fn, **kwargs):
        calls.append((fn, kwargs))
        return real_compile(fn, backend="eager")  # modes are for the inductor backend

    monkeypatch.setattr(torch, "compile", eager)
    return calls
