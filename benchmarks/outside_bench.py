"""Outside personalization end to end: how long a new site waits for its adapted model.

A real ``Trainer.fit`` of the RoutingModule on a generated outside site's unlabelled slices, as
``experiments/outside_demo.yaml`` runs it: the paper's online mode, so every step is the routed
step, the TENT baseline's step and the prediction of both adapted nets stored right after their
update. Images/s of the fastest pass after a warm-up pass. Baseline: the same fit with every
routed layer looping over the samples of the batch (the reference's way), in fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import MemoryMeter, summary
from federated_bench import RoundClock, quiet_trainer
from routing_bench import build_module, make_loop

from iopfl_lightning.data import MultiSiteDataModule

OUTSIDE = "UCL"


def _datamodule(size: int, batch: int, slices: int) -> MultiSiteDataModule:
    dm = MultiSiteDataModule(format="synthetic", sites=["BIDMC", OUTSIDE], outside=[OUTSIDE],
                             train_on="outside", batch_size=batch, normalize="zscore",
                             synthetic={"size": size, "slices": slices,
                                        "cases_per_split": {"train": 1, "val": 1, "test": 2}})
    dm.setup("fit")
    return dm


def _fit(module, dm, device: torch.device, precision: str, passes: int) -> dict:
    shared: dict = {"rounds": [], "images": 0}
    clocks = [RoundClock(device, shared, "start"), RoundClock(device, shared, "end")]
    with tempfile.TemporaryDirectory() as root:
        trainer = quiet_trainer(device, root, precision=precision, max_epochs=passes,
                                callbacks=clocks, limit_val_batches=0)
        with MemoryMeter(device) as mem:
            trainer.fit(module, datamodule=dm)
    passes_run = shared["rounds"][1:] or shared["rounds"]  # the first pass is warm-up
    walls, images = [r["wall"] for r in passes_run], passes_run[0]["images"]
    return {"images_per_pass": images, "pass_s": summary(walls),
            "images_per_s": images / min(walls), "peak_mb": mem.peak_mb}


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
