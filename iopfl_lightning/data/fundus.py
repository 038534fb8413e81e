"""Fundus optic disc/cup segmentation in the BEAL/DoFE layout.

Layout::

    <root>/Domain{1..4}/{train,test}/ROIs/image/<name>.png   RGB fundus ROI (800x800 originals)
    <root>/Domain{1..4}/{train,test}/ROIs/mask/<name>.png    RGB or grey: 0 = cup,
                                                              128 = disc rim, 255 = background

Labels produced: 0 = background, 1 = disc rim, 2 = cup. The optic disc is rim + cup (labels 1 and
2); combining them for evaluation is left to the metrics. Each image is its own case with N = 1.
Images are scaled to ``[0, 1]`` float32 (``/ 255``). Pass ``size`` to resize (image bilinear,
mask nearest): 800x800 float32 RGB is 7.7 MB per image, so real runs should resize.
Validation images are carved from train with the same rule as the PNG slices (:func:`carve_val`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .cases import Case, DataError, SiteSplits, make_case, reading, require_path
from .png_slices import carve_val

log = logging.getLogger(__name__)

FUNDUS_DOMAINS: tuple[str, ...] = ("Domain1", "Domain2", "Domain3", "Domain4")
FUNDUS_CLASSES: tuple[str, ...] = ("background", "disc_rim", "cup")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# Declared grey value -> label.
_MASK_LABELS = {255: 0, 128: 1, 0: 2}


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` keyed by file stem."""
    require_path(folder, "folder")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}


def _resized(img: Image.Image, size: int | None, resample: Image.Resampling) -> Image.Image:
    """``img`` resized to ``size x size`` (unchanged when ``size`` is None)."""
    return img if size is None else img.resize((size, size), resample)


def _read_image(path: Path, size: int | None) -> np.ndarray:
    """RGB image as ``[1, H, W, 3]`` float32 in ``[0, 1]``."""
    with reading(path), Image.open(path) as img:
        rgb = _resized(img.convert("RGB"), size, Image.Resampling.BILINEAR)
        return (np.asarray(rgb, dtype=np.float32) / 255.0)[None]


def mask_to_labels(raw: np.ndarray, path: Path, snap: bool = False) -> np.ndarray:
    """Grey mask values (0 cup, 128 rim, 255 bg) -> labels (0 bg, 1 rim, 2 cup).

    With ``snap=True`` values in between are assigned to the nearest declared value (for masks
    saved with anti-aliasing); otherwise any other value is a DataError naming file and value.
    """
    if snap:
        return np.where(raw < 64, 2, np.where(raw < 192, 1, 0)).astype(np.uint8)
    labels = np.full(raw.shape, 255, dtype=np.uint8)
    for value, label in _MASK_LABELS.items():
        labels[raw == value] = label
    if (labels == 255).any():
        raise DataError(
            f"{path}: mask value {int(raw[labels == 255][0])} is not one of 0 (cup), "
            "128 (disc rim), 255 (background)"
        )
    return labels


def _read_mask(path: Path, size: int | None, snap: bool) -> np.ndarray:
    """Mask as ``[1, H, W]`` labels; an RGB mask must have equal channels."""
    with reading(path), Image.open(path) as img:
        img = _resized(img, size, Image.Resampling.NEAREST)
        raw = np.asarray(img)
    if raw.ndim == 3:
        if not (raw[..., :3] == raw[..., :1]).all():
            raise DataError(f"{path}: colour mask channels differ; expected grey values")
        raw = raw[..., 0]
    return mask_to_labels(raw, path, snap)[None]


def read_fundus_split(split_dir: Path, size: int | None = None, snap: bool = False) -> list[Case]:
    """Cases of one ``<Domain>/<split>`` folder, paired by file stem."""
    images = _files_by_stem(split_dir / "ROIs" / "image")
    masks = _files_by_stem(split_dir / "ROIs" / "mask")
    if images.keys() != masks.keys():
        lonely = [str(images[s]) for s in sorted(images.keys() - masks.keys())]
        lonely += [str(masks[s]) for s in sorted(masks.keys() - images.keys())]
        raise DataError(f"unpaired fundus files: {', '.join(lonely)}")
    cases = []
    for stem, image_path in images.items():
        image, mask = _read_image(image_path, size), _read_mask(masks[stem], size, snap)
        cases.append(make_case(stem, image, mask, 3, str(image_path), str(masks[stem])))
    return cases


def read_fundus(
    root: str | Path,
    domain: str,
    size: int | None = None,
    val_fraction: float = 0.2,
    snap: bool = False,
) -> SiteSplits:
    """Read one fundus domain into train/val/test cases (labels 0 bg, 1 disc rim, 2 cup).

    Args:
        root: folder holding ``Domain1`` .. ``Domain4``.
        domain: domain folder name, e.g. ``"Domain2"``.
        size: resize every image and mask to ``size x size`` (None keeps the originals).
        val_fraction: fraction of train images carved off as val.
        snap: map in-between mask values to the nearest declared value instead of failing.
    """
    if size is not None and size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    folder = require_path(Path(root) / domain, f"fundus domain folder of {domain!r}")
    train = read_fundus_split(folder / "train", size, snap)
    test = read_fundus_split(folder / "test", size, snap)
    if not train and not test:
        raise DataError(f"domain {domain!r} has no samples under {folder}")
    train, val = carve_val(train, val_fraction, domain)
    log.info("read %s: %d train, %d val, %d test", domain, len(train), len(val), len(test))
    return {"train": train, "val": val, "test": test}
