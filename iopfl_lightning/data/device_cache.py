"""Device-resident slices: a site split finished once and kept on the training device.

With ``MultiSiteDataModule(device_cache=True)`` every split a loader serves is read, resized
and normalized once (through :meth:`SiteDataset.get_batch`, so the tensors are the ones the
ordinary loaders would produce), stacked and moved to the trainer's device. A batch is then an
index gather on that device: no loader workers, no shared-memory transfer of images, no
host-to-device copy of each batch. On a GPU that is what feeds a small 2D UNet fast enough; on
the CPU it still saves the per-batch gather, resize and z-score.

Images stay float32 (results are identical to the loader path); masks are kept as uint8 and
widened to int64 per batch. Only what the batches need travels: ``client``, ``case`` and
``slice`` stay on the CPU like the ordinary loaders' (the federated callback reads the client
index there without a device synchronisation), and Lightning moves them with the batch.
A per-sample albumentations transform cannot run on cached tensors, so it is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .dataset import SiteDataset

log = logging.getLogger(__name__)

CHUNK = 256  # slices finished per step while filling (bounds host memory while caching)
FREE_FRACTION = 0.8  # a cache may take at most this share of the device's free memory


def cache_bytes(dataset: SiteDataset, image_shape: Sequence[int]) -> int:
    """Device bytes of ``dataset`` cached with finished images of ``image_shape`` [C, H, W]."""
    c, h, w = image_shape
    per_slice = 4 * c * h * w + (h * w if dataset.labels else 0)
    return len(dataset) * per_slice


def _free_bytes(device: torch.device) -> int | None:
    """Free memory where the cache would live: CUDA's free memory, or the host's available
    memory (Linux ``/proc/meminfo``) for the CPU; None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _check_room(device: torch.device, needed: int, what: str) -> None:
    free = _free_bytes(device)
    if free is not None and needed > FREE_FRACTION * free:
        raise MemoryError(
            f"device_cache: {what} needs {needed / 2**30:.2f} GiB on {device} but only "
            f"{free / 2**30:.2f} GiB are free (at most {FREE_FRACTION:.0%} may be used); set "
            "data.device_cache=false, lower data.image_size or use fewer sites"
        )


class CachedSite:
    """The finished slices of one :class:`SiteDataset`, on ``device``; same batches as its
    :meth:`~SiteDataset.get_batch`, except that ``image`` and ``mask`` are already on the device.
    """

    def __init__(self, dataset: SiteDataset, device: torch.device | str, name: str = "") -> None:
        if dataset.transform is not None:
            raise ValueError(
                f"device_cache: {name or 'dataset'} has a train_transform; an albumentations "
                "transform runs per sample on the CPU and cannot run on cached tensors. Set "
                "data.device_cache=false or data.train_transform=null"
            )
        self.device = torch.device(device)
        self.client = dataset.client
        self.labels = dataset.labels
        self.case_index = torch.from_numpy(dataset.case_index.astype(np.int64))
        self.slice_index = torch.from_numpy(dataset.slice_index.astype(np.int64))
        self.image, self.mask = self._fill(dataset, name)

    def _fill(self, dataset: SiteDataset, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = len(dataset)
        image = mask = None
        for start in range(0, n, CHUNK):
            part = dataset.get_batch(np.arange(start, min(start + CHUNK, n)))
            if image is None:  # sizes are known after the first finished chunk
                needed = cache_bytes(dataset, part["image"].shape[1:])
                _check_room(self.device, needed, name or "a split")
                log.info("device_cache: %s, %d slices, %.1f MiB on %s", name or "split", n,
                         needed / 2**20, self.device)
                image = torch.empty((n, *part["image"].shape[1:]), device=self.device)
                if self.labels:
                    mask = torch.empty((n, *part["mask"].shape[1:]), dtype=torch.uint8,
                                       device=self.device)
            stop = start + len(part["image"])
            image[start:stop].copy_(part["image"])
            if mask is not None:
                if part["mask"].numel() and int(part["mask"].max()) > 255:
                    raise ValueError(f"device_cache: {name or 'split'} has mask labels above 255")
                mask[start:stop].copy_(part["mask"])
        if image is None:
            image = torch.empty((0, 0, 0, 0), device=self.device)
        return image, mask

    def __len__(self) -> int:
        return len(self.case_index)

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        on_device = index.to(self.device, non_blocking=True)
        batch = {
            "image": self.image[on_device],
            "client": torch.full((len(index),), self.client, dtype=torch.int64),
            "case": self.case_index[index],
            "slice": self.slice_index[index],
        }
        if self.labels:
            batch["mask"] = self.mask[on_device].long()
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.get_batch([index]).items()}
