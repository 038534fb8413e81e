"""Batch-at-once loading: the datamodule's loaders fetch a whole batch per call.

PyTorch's DataLoader asks a dataset with ``__getitems__`` for all indices of a batch at once and
hands the result to ``collate_fn``. :class:`BatchedSlices` wraps a :class:`SiteDataset` (or a
``ConcatDataset`` of them, the training set of all clients) and answers with the finished batch
dict from :meth:`SiteDataset.get_batch`; :func:`collate_batch` passes that dict through. So the
per-slice Python work (one ``__getitem__``, transpose copy, resize and z-score per slice, then a
stack) becomes one gather per case and one resize and z-score per batch.

``SiteDataset`` itself keeps plain per-item access, so it still works with any DataLoader.
With ``parts`` (one :class:`~iopfl_lightning.data.device_cache.CachedSite` per dataset) the
batches are gathered from device-resident tensors instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, default_collate

from .dataset import SiteDataset, in_order


class BatchSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...
    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...


class BatchedSlices(Dataset):
    """A :class:`SiteDataset` or ``ConcatDataset`` of them, fetched a batch at a time.

    ``parts``: what serves each dataset's batches instead of the dataset itself (e.g. its
    device-resident cache); same lengths, same order.
    """

    def __init__(self, dataset: SiteDataset | ConcatDataset,
                 parts: Sequence[BatchSource] | None = None) -> None:
        datasets = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        if not all(isinstance(part, SiteDataset) for part in datasets):
            names = [type(p).__name__ for p in datasets]
            raise TypeError(f"BatchedSlices needs SiteDataset parts, got {names}")
        parts = list(datasets if parts is None else parts)
        if [len(p) for p in parts] != [len(d) for d in datasets]:
            raise ValueError("BatchedSlices: parts must match the datasets one to one")
        self.dataset = dataset
        self.parts: list[BatchSource] = parts
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        part_of = np.searchsorted(self.offsets, index, side="right") - 1
        pieces, positions = [], []
        for part in np.unique(part_of):  # one part per batch, except pooled (centralized) batches
            where = np.flatnonzero(part_of == part)
            local = index[where] - self.offsets[part]
            pieces.append(self.parts[part].get_batch(local))
            positions.append(where)
        keys = list(pieces[0])
        values = in_order(positions, *([p[key] for p in pieces] for key in keys))
        return dict(zip(keys, values, strict=True))


def collate_batch(data: Any) -> Any:
    """Collate for :class:`BatchedSlices` loaders: a finished batch dict passes through."""
    return data if isinstance(data, dict) else default_collate(data)
