"""Data loading: the datamodule's batch-at-once loader vs a plain per-slice DataLoader.

Both read the same generated site (in memory, as the synthetic and the ``.npy`` readers give it),
resize to the benchmark size and z-score every slice; the plain loader calls ``__getitem__`` once
per slice and stacks with ``default_collate`` (how a torch Dataset is usually written), ours
gathers each case's slices of a batch at once (:mod:`iopfl_lightning.data.batching`). No workers:
this is the work one worker process does per batch, so it bounds what a GPU step can be fed.
``cached`` is ``device_cache=True`` (here on the CPU: the host work per batch is one index
gather, whatever device the cache is on); ``cache_fill_s`` is the one-off cost of finishing it.
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


def _datamodule(size: int, batch: int, slices: int, cases: int, cache: bool):
    dm = MultiSiteDataModule(format="synthetic", sites=["BIDMC"], batch_size=batch,
                             normalize="zscore", eval_batch_size=batch, device_cache=cache,
                             synthetic={"size": size, "slices": slices,
                                        "cases_per_split": {"train": 1, "val": 1, "test": cases}})
    dm.setup("test")
    return dm


def loader_bench(size: int, batch: int, slices: int, cases: int, repeats: int = 5) -> dict:
    dm = _datamodule(size, batch, slices, cases, cache=False)
    ours = dm.test_dataloader()[0]
    plain = DataLoader(dm.dataset("BIDMC", "test"), batch_size=batch)
    start = time.perf_counter()
    cached = _datamodule(size, batch, slices, cases, cache=True).test_dataloader()[0]
    fill_s = time.perf_counter() - start
    first, second = next(iter(ours)), next(iter(plain))
    max_diff = (first["image"] - second["image"]).abs().max().item()
    max_diff = max(max_diff, (next(iter(cached))["image"] - first["image"]).abs().max().item())
    out = {"cache_fill_s": fill_s}
    for name, loader in (("batched", ours), ("plain", plain), ("cached", cached)):
        times = []
        for _ in range(repeats):
            seconds, images = _epoch_seconds(loader)
            times.append(seconds)
        out[name] = {"epoch_s": summary(times), "images": images,
                     "images_per_s": images / min(times)}
    out["speedup"] = out["batched"]["images_per_s"] / out["plain"]["images_per_s"]
    out["cached_speedup"] = out["cached"]["images_per_s"] / out["plain"]["images_per_s"]
    out["first_batch_max_abs_diff"] = max_diff
    out["config"] = {"size": size, "batch": batch, "slices": slices, "cases": cases,
                     "threads": torch.get_num_threads()}
    return out
