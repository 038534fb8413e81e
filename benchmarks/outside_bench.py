"""Outside personalization end to end: how long a new site waits for its adapted model.

A real ``Trainer.fit`` of the RoutingModule on a generated outside site's unlabelled slices, as
``experiments/outside_demo.yaml`` runs it: the paper's online mode, so every step is the routed
step, the TENT baseline's step and the prediction of both adapted nets stored right after their
update. Images/s of the fastest pass after a warm-up pass. Baseline: the same fit with every
routed layer looping over the samples of the batch (the reference's way), in fp32.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import MemoryMeter, summary, sync
from routing_bench import build_module, make_loop

from iopfl_lightning.data import MultiSiteDataModule

OUTSIDE = "UCL"


class _PassClock(pl.Callback):
    def __init__(self, device: torch.device):
        self.device, self.walls, self.images = device, [], 0

    def on_train_epoch_start(self, trainer, pl_module):
        sync(self.device)
        self._t0, self.images = time.perf_counter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images += int(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module):
        sync(self.device)
        self.walls.append(time.perf_counter() - self._t0)


def _datamodule(size: int, batch: int, slices: int) -> MultiSiteDataModule:
    dm = MultiSiteDataModule(format="synthetic", sites=["BIDMC", OUTSIDE], outside=[OUTSIDE],
                             train_on="outside", batch_size=batch, normalize="zscore",
                             synthetic={"size": size, "slices": slices,
                                        "cases_per_split": {"train": 1, "val": 1, "test": 2}})
    dm.setup("fit")
    return dm


def _fit(module, dm, device: torch.device, precision: str, passes: int) -> dict:
    clock = _PassClock(device)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                             precision=precision, max_epochs=passes, callbacks=[clock],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0,
                             default_root_dir=root)
        with MemoryMeter(device) as mem:
            trainer.fit(module, datamodule=dm)
    measured = clock.walls[1:] or clock.walls
    return {"images_per_pass": clock.images, "pass_s": summary(measured),
            "images_per_s": clock.images / min(measured), "peak_mb": mem.peak_mb}


def outside_bench(features: int, size: int, batch: int, experts: int, slices: int,
                  device: torch.device, precision: str, channels_last: bool,
                  passes: int = 3) -> dict:
    dm = _datamodule(size, batch, slices)
    with tempfile.TemporaryDirectory() as tmp:
        ours = build_module(Path(tmp), features, experts, baselines=["tent"],
                            channels_last=channels_last)
        loop = make_loop(build_module(Path(tmp), features, experts, baselines=["tent"]))
    out = {"ours": _fit(ours, dm, device, precision, passes),
           "loop_fp32": _fit(loop, dm, device, "32-true", passes)}
    out["speedup"] = out["ours"]["images_per_s"] / out["loop_fp32"]["images_per_s"]
    return out
