"""Batch-at-once loading: the datamodule's loaders fetch a whole batch per call.

PyTorch's DataLoader asks a dataset with ``__getitems__`` for all indices of a batch at once and
hands the result to ``collate_fn``. :class:`BatchedSlices` wraps a :class:`SiteDataset` (or a
``ConcatDataset`` of them, the training set of all clients) and answers with the finished batch
dict from :meth:`SiteDataset.get_batch`; :func:`collate_batch` passes that dict through. So the
per-slice Python work (one ``__getitem__``, transpose copy, resize and z-score per slice, then a
stack) becomes one gather per case and one resize and z-score per batch.

``SiteDataset`` itself keeps plain per-item access, so it still works with any DataLoader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, default_collate

from .dataset import SiteDataset, in_order


class BatchedSlices(Dataset):
    """A :class:`SiteDataset` or ``ConcatDataset`` of them, fetched a batch at a time."""

    def __init__(self, dataset: SiteDataset | ConcatDataset) -> None:
        parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        if not all(isinstance(part, SiteDataset) for part in parts):
            names = [type(p).__name__ for p in parts]
            raise TypeError(f"BatchedSlices needs SiteDataset parts, got {names}")
        self.dataset = dataset
        self.parts: list[SiteDataset] = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[index]

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
