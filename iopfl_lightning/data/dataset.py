"""Torch dataset over the slices of one site split, and the train-transform builder.

Every item is a dict ``{"image": float32 [C, H, W], "mask": int64 [H, W], "client": int64 [],
"case": int64 [], "slice": int64 []}``; the default collate turns the scalars into ``[B]``.

Per item: optional albumentations transform on the HWC numpy image and mask, optional resize
(image bilinear, mask nearest-exact: the same pixel grid), optional per-slice z-score (``normalize="zscore"``: subtract the
mean and divide by the standard deviation of the slice's pixels over all channels).
:meth:`SiteDataset.get_batch` does the same for a whole batch at once (one gather per case, one
resize and one z-score per batch); without an albumentations transform it equals collating the
items one by one (see :mod:`iopfl_lightning.data.batching`). By default
intensities stay as the reader produced them (``[0, 1]`` for PNG, fundus and synthetic data;
as stored for the IOP-FL ``.npy`` files), as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from .cases import Case

TransformSpec = list[dict[str, Any]] | dict[str, Any] | None
Normalize = Literal["none", "zscore"]


def build_transform(spec: Any) -> A.BaseCompose | A.BasicTransform | None:
    """Build an albumentations pipeline from Python objects or YAML-friendly dicts.

    Accepted: None; an albumentations transform or Compose; a dict in albumentations'
    serialised form (``{"__class_fullname__": "HorizontalFlip", "p": 0.5}``, optionally wrapped in
    ``{"transform": ...}``, as ``A.to_dict`` writes); or a list of such dicts, composed in order.
    In a LightningCLI YAML::

        data:
          train_transform:
            - {__class_fullname__: HorizontalFlip, p: 0.5}
            - {__class_fullname__: RandomRotate90, p: 0.5}
    """
    if spec is None or isinstance(spec, A.BaseCompose | A.BasicTransform):
        return spec
    if isinstance(spec, dict):
        return A.from_dict(spec if "transform" in spec else {"transform": spec})
    if isinstance(spec, list | tuple):
        return A.Compose([build_transform(item) for item in spec])
    raise ValueError(
        f"train_transform must be None, an albumentations transform, a dict or a list of dicts; "
        f"got {type(spec).__name__}"
    )


class SiteDataset(Dataset):
    """The 2D slices of a list of cases, tagged with a client (or eval-site) index.

    Args:
        cases: cases of one site split; ``case`` in a batch is the position in this list.
        client: index written into every item's ``"client"``.
        transform: albumentations pipeline applied to ``image=HWC float32, mask=HW``.
        image_size: resize to ``image_size x image_size`` (None keeps the stored size).
        normalize: ``"none"`` or per-slice ``"zscore"``.
        labels: include ``"mask"`` (False for unlabelled test-time adaptation data).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        client: int,
        transform: Any = None,
        image_size: int | None = None,
        normalize: Normalize = "none",
        labels: bool = True,
    ) -> None:
        self.cases = list(cases)
        self.client = client
        self.transform = transform
        self.image_size = image_size
        self.normalize = normalize
        self.labels = labels
        counts = [case.num_slices for case in self.cases]
        self.case_index = np.repeat(np.arange(len(counts)), counts)
        self.slice_index = np.concatenate([np.arange(n) for n in counts] or [np.zeros(0, int)])

    def __len__(self) -> int:
        return len(self.case_index)

    def _resize(
        self, image: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resize one ``[C, H, W]`` image and ``[H, W]`` mask (or a batch: ``[B, C, H, W]``
        and ``[B, H, W]``) to ``image_size``; a ``None`` mask stays ``None``."""
        size = self.image_size
        if size is None or image.shape[-2:] == (size, size):
            return image, mask
        single = image.dim() == 3
        images = F.interpolate(image[None] if single else image, (size, size), mode="bilinear",
                               align_corners=False)
        if mask is not None:
            masks = (mask[None] if single else mask)[:, None].float()
            # nearest-exact samples pixel centres as the bilinear image does ("nearest" would
            # shift the mask by up to half a pixel against the image)
            mask = F.interpolate(masks, (size, size), mode="nearest-exact")[:, 0].long()
            mask = mask[0] if single else mask
        return (images[0] if single else images), mask

    @staticmethod
    def _zscore(images: torch.Tensor) -> torch.Tensor:
        """Per-slice z-score of ``[B, C, H, W]`` images over all channels and pixels (sample
        std). Two passes through the centred values: exact like ``Tensor.std`` and, unlike
        ``std(dim=1)`` on one thread, as fast per slice as a whole-tensor reduction."""
        n = images[0].numel()
        centred = images - images.flatten(1).mean(1).view(-1, 1, 1, 1)
        var = centred.flatten(1).pow(2).sum(1) / max(n - 1, 1)
        return centred / var.sqrt().clamp_min(1e-6).view(-1, 1, 1, 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case_idx, slice_idx = int(self.case_index[index]), int(self.slice_index[index])
        case = self.cases[case_idx]
        image, mask = case.image[slice_idx], case.mask[slice_idx]
        if self.transform is not None:
            # albumentations draws from its own generator, which no seed reaches and every
            # loader worker copies: reseed it from torch's, which seed_everything and the
            # DataLoader seed (per worker, per epoch), so augmentations repeat run to run only
            self.transform.set_random_seed(int(torch.randint(2**31 - 1, ())))
            out = self.transform(image=np.asarray(image), mask=np.asarray(mask))
            image, mask = out["image"], out["mask"]
        image_t = torch.from_numpy(np.array(image.transpose(2, 0, 1), dtype=np.float32))
        mask_t = torch.from_numpy(np.array(mask, dtype=np.int64))
        image_t, mask_t = self._resize(image_t, mask_t)
        if self.normalize == "zscore":
            image_t = self._zscore(image_t[None])[0]
        item = {
            "image": image_t,
            "client": torch.tensor(self.client, dtype=torch.int64),
            "case": torch.tensor(case_idx, dtype=torch.int64),
            "slice": torch.tensor(slice_idx, dtype=torch.int64),
        }
        if self.labels:
            item["mask"] = mask_t
        return item

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The collated batch of ``indices``, fetched as a batch: per case in the batch one
        gather of its slices (a memory-mapped case reads just those), then one resize and one
        z-score for the whole batch. With an albumentations transform (per sample by nature)
        the items are built one by one and collated."""
        if self.transform is not None:
            return default_collate([self[int(i)] for i in indices])
        index = np.asarray(indices, dtype=np.int64)
        case_idx, slice_idx = self.case_index[index], self.slice_index[index]
        positions, images, masks = [], [], []
        for case_id in np.unique(case_idx):
            where = np.flatnonzero(case_idx == case_id)
            image, mask = self._gather(self.cases[case_id], slice_idx[where])
            positions.append(where)
            images.append(image)
            masks.append(mask)
        image_t, *mask_t = in_order(positions, images, *([masks] if self.labels else []))
        if self.normalize == "zscore":
            image_t = self._zscore(image_t)
        batch = {
            "image": image_t,
            "client": torch.full((len(index),), self.client, dtype=torch.int64),
            "case": torch.from_numpy(case_idx.copy()),
            "slice": torch.from_numpy(slice_idx.copy()),
        }
        if self.labels:
            batch["mask"] = mask_t[0]
        return batch

    def _gather(self, case: Case, slices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slices of one case as ``[n, C, H, W]`` float32 and ``[n, H, W]`` int64 (``None``
        without labels: unlabelled data never reads its masks), resized."""
        image = np.ascontiguousarray(case.image[slices].transpose(0, 3, 1, 2), dtype=np.float32)
        mask = torch.from_numpy(np.asarray(case.mask[slices], dtype=np.int64)) if self.labels else None
        return self._resize(torch.from_numpy(image), mask)


def in_order(positions: list[np.ndarray], *parts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Concatenate tensors fetched per group (case or dataset) and put their rows back at the
    batch ``positions`` of each group (sorted within a group). One group, the usual case, is
    already in order: no copy."""
    if len(positions) == 1:
        return tuple(p[0] for p in parts)
    order = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))
    return tuple(torch.cat(p)[order.to(p[0].device)] for p in parts)
