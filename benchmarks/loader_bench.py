"""Data loading: the datamodule's batch-at-once loader vs a plain per-slice DataLoader.

Both read the same generated site (in memory, as the synthetic and the ``.npy`` readers give it),
resize to the benchmark size and z-score every slice; the plain loader calls ``__getitem__`` once
per slice and stacks with ``default_collate`` (how a torch Dataset is usually written), ours
gathers each case's slices of a batch at once (:mod:`iopfl_lightning.data.batching`). No workers:
this is the work one worker process does per batch, so it bounds what a GPU step can be fed.
"""

from __future__ import annotations

import time

import torch
from common import summary
from torch.utils.data import DataLoader

from iopfl_lightning.data import MultiSiteDataModule


def _epoch_seconds(loader: DataLoader) -> tuple[float, int]:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += batch["image"].shape[0]
    return time.perf_counter() - start, images


def loader_bench(size: int, batch: int, slices: int, cases: int, repeats: int = 5) -> dict:
    dm = MultiSiteDataModule(format="synthetic", sites=["BIDMC"], batch_size=batch,
                             normalize="zscore", eval_batch_size=batch,
                             synthetic={"size": size, "slices": slices,
                                        "cases_per_split": {"train": 1, "val": 1, "test": cases}})
    dm.setup("test")
    ours = dm.test_dataloader()[0]
    plain = DataLoader(dm.dataset("BIDMC", "test"), batch_size=batch)
    first, second = next(iter(ours)), next(iter(plain))
    max_diff = (first["image"] - second["image"]).abs().max().item()
    out = {}
    for name, loader in (("batched", ours), ("plain", plain)):
        times = []
        for _ in range(repeats):
            seconds, images = _epoch_seconds(loader)
            times.append(seconds)
        out[name] = {"epoch_s": summary(times), "images": images,
                     "images_per_s": images / min(times)}
    out["speedup"] = out["batched"]["images_per_s"] / out["plain"]["images_per_s"]
    out["first_batch_max_abs_diff"] = max_diff
    out["config"] = {"size": size, "batch": batch, "slices": slices, "cases": cases,
                     "threads": torch.get_num_threads()}
    return out
