"""The in-memory unit every reader produces: a :class:`Case` (one 3D scan or one 2D image).

All readers return :data:`SiteSplits` (``{"train": [...], "val": [...], "test": [...]}``) so the
datamodule never needs to know which file format a site came from. The checks here are shared
by all readers so that bad data fails early, with a message naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")


class DataError(ValueError):
    """Raised for data that cannot be used as is; the message names the file and the problem."""


@dataclass
class Case:
    """One case of one site split.

    Attributes:
        name: identifier unique within a site split, e.g. ``"Case03"`` or ``"00"``.
        image: ``[N, H, W, C]`` float32 (may be a read-only ``np.load`` memory map). For prostate,
            C = 3 adjacent slices (i-1, i, i+1); for fundus, RGB.
        mask: ``[N, H, W]`` integer class labels in ``[0, num_classes)``.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray

    @property
    def num_slices(self) -> int:
        """Number of 2D slices (training samples) in this case."""
        return int(self.image.shape[0])


SiteSplits = dict[str, list[Case]]


def require_path(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise a DataError naming it (``what`` says what it is)."""
    if not path.exists():
        raise DataError(f"missing {what}: {path}")
    return path


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Re-raise a decoder's error (truncated or corrupt file) as a DataError naming ``path``."""
    try:
        yield
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def check_dtype(array: np.ndarray, source: str, what: str) -> None:
    """Images and masks must hold real numbers (bool, int, uint or float), nothing else."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{source}: {what} has dtype {array.dtype}; expected real numbers")


def check_finite(image: np.ndarray, source: str, chunk: int = 16) -> None:
    """Raise if ``image`` has NaN/inf pixels; scans in slice chunks so memory maps stay cheap."""
    if not np.issubdtype(image.dtype, np.floating):
        return
    for start in range(0, image.shape[0], chunk):
        block = image[start : start + chunk]
        if not np.isfinite(block).all():
            bad = int(start + np.argwhere(~np.isfinite(block))[0][0])
            raise DataError(f"{source}: NaN or inf pixel values (first in slice {bad})")


def as_label_mask(mask: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """Check ``mask`` holds integer labels in ``[0, num_classes)`` and return it as integers.

    Integer masks are returned unchanged (a memory map stays a memory map); float masks that hold
    whole numbers (the IOP-FL preprocessed files do) are converted to uint8/int64.
    """
    if mask.size == 0:
        return mask
    if not np.issubdtype(mask.dtype, np.integer):
        if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
            raise DataError(f"{source}: mask has NaN or inf values")
        rounded = np.rint(mask)
        off = rounded != mask
        if off.any():
            raise DataError(
                f"{source}: mask value {float(mask[off].flat[0])} is not an integer label"
            )
        mask = rounded.astype(np.uint8 if num_classes <= 256 else np.int64)
    low, high = mask.min(), mask.max()
    if low < 0 or high >= num_classes:
        bad = mask[(mask < 0) | (mask >= num_classes)].flat[0]
        raise DataError(
            f"{source}: mask label {int(bad)} outside the declared classes [0, {num_classes})"
        )
    return mask


def make_case(
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    num_classes: int,
    image_source: str,
    mask_source: str,
) -> Case:
    """Validate one image/mask pair and wrap it in a :class:`Case`.

    Checks: image is ``[N, H, W, C]`` float, mask ``[N, H, W]`` (a trailing singleton axis is
    squeezed), matching ``N, H, W``, finite pixels, labels within the declared classes.
    """
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if image.ndim != 4:
        raise DataError(f"{image_source}: image must be [N, H, W, C], got shape {image.shape}")
    if mask.ndim != 3 or mask.shape != image.shape[:3]:
        raise DataError(
            f"image/mask shape mismatch: {image_source} has shape {image.shape}, "
            f"{mask_source} has shape {mask.shape} (expected [N, H, W] = {image.shape[:3]})"
        )
    check_dtype(image, image_source, "image")
    check_dtype(mask, mask_source, "mask")
    if image.dtype != np.float32:
        image = image.astype(np.float32)
    check_finite(image, image_source)
    mask = as_label_mask(mask, num_classes, mask_source)
    return Case(name=name, image=image, mask=mask)


def count_slices(cases: list[Case]) -> int:
    """Total number of 2D slices in ``cases``."""
    return sum(case.num_slices for case in cases)
