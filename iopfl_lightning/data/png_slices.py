"""Per-site 2D PNG slices: ``<root>/<SITE>/{train,test}/{image,mask}/CC_SS.png``.

``CC`` is the case and ``SS`` the slice number. Slices of one case are stacked in slice order and
each slice gets 3 channels from its neighbours (i-1, i, i+1, clamped at the ends of the case), the
same input the IOP-FL prostate format stores. Images are read as 8-bit grey (colour converted)
or as 16-bit grey and scaled to ``[0, 1]`` float32 by their bit depth (``/ 255`` or
``/ 65535``); any further intensity normalisation is the datamodule's choice.

Masks hold two declared grey values (default 0 and 255). With ``mask_inverted=True`` (the real
multi-site sample: 0 = prostate, 255 = background) the low value is the foreground; otherwise the
high value is. Any other value is an error naming the file and the value.

There is no ``val`` folder, so validation cases are carved from ``train`` by :func:`carve_val`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .cases import Case, DataError, SiteSplits, make_case, reading, require_path

log = logging.getLogger(__name__)

# IOP-FL site names whose PNG folders are named after the hospital instead.
PNG_SITE_ALIASES: dict[str, str] = {"ISBI": "RUNMC", "ISBI_1.5": "BMC"}
_NAME = re.compile(r"^(?P<case>.+)_(?P<slice>\d+)\.png$")


def folder_name(root: Path, site: str) -> str:
    """Name of the folder ``site`` reads: its own, or for an IOP-FL name without one, its
    hospital's (ISBI -> RUNMC). Nothing is required to exist."""
    alias = PNG_SITE_ALIASES.get(site)
    if not (root / site).is_dir() and alias and (root / alias).is_dir():
        return alias
    return site


def site_folder(root: Path, site: str) -> Path:
    """Folder of ``site``; IOP-FL names fall back to their hospital folder (ISBI -> RUNMC)."""
    name = folder_name(root, site)
    if name != site:
        log.info("site %s read from folder %s", site, name)
        return root / name
    return require_path(root / site, f"site folder of {site!r}")


def _key(path: Path) -> tuple[str, int]:
    """(case, slice) parsed from ``CC_SS.png``."""
    match = _NAME.match(path.name)
    if not match:
        raise DataError(f"{path}: file name does not follow CC_SS.png (case_slice)")
    return match["case"], int(match["slice"])


def _list_pngs(folder: Path) -> list[Path]:
    """PNG files of ``folder`` sorted by (case, slice)."""
    require_path(folder, "folder")
    return sorted(folder.glob("*.png"), key=_key)


def pair_files(
    image_dir: Path, mask_dir: Path, pairing: Literal["name", "order"]
) -> list[tuple[Path, Path]]:
    """Pair image and mask files by identical name, or by position in the sorted lists."""
    images, masks = _list_pngs(image_dir), _list_pngs(mask_dir)
    if pairing == "name":
        image_names, mask_names = {p.name for p in images}, {p.name for p in masks}
        if image_names != mask_names:
            lonely = [str(image_dir / n) for n in sorted(image_names - mask_names)]
            lonely += [str(mask_dir / n) for n in sorted(mask_names - image_names)]
            raise DataError(
                "unpaired files (pairing='name' needs identical image/mask names; "
                f"pairing='order' pairs sorted lists): {', '.join(lonely)}"
            )
        return [(p, mask_dir / p.name) for p in images]
    if len(images) != len(masks):
        raise DataError(
            f"pairing='order' needs as many masks as images: {len(images)} in {image_dir}, "
            f"{len(masks)} in {mask_dir}"
        )
    for image, mask in zip(images, masks, strict=True):
        if image.name != mask.name:
            log.warning("pairing by order: image %s with mask %s", image, mask)
    return list(zip(images, masks, strict=True))


_GREY_16 = ("I;16", "I;16B", "I;16L")  # 16-bit grey PNGs, as Pillow opens them


def _read_grey(path: Path) -> np.ndarray:
    """Grey pixels of ``path`` at their own depth: uint8, or uint16 for a 16-bit PNG (which
    an 8-bit conversion would clip at 255). Colour images are converted to 8-bit grey."""
    with reading(path), Image.open(path) as img:
        if img.mode in _GREY_16:
            return np.asarray(img).astype(np.uint16)  # native byte order
        if img.mode in ("I", "F"):
            raise DataError(f"{path}: 32-bit PNG mode {img.mode!r} is not supported; save "
                            "the slices as 8- or 16-bit grey")
        return np.asarray(img if img.mode == "L" else img.convert("L"))


def _unit_range(pixels: np.ndarray) -> np.ndarray:
    """Pixels scaled to ``[0, 1]`` by their bit depth (/ 255 or / 65535)."""
    return pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)


def _read_mask(path: Path, values: tuple[int, int], inverted: bool) -> np.ndarray:
    """Binary label mask of ``path``: 1 = foreground, 0 = background."""
    raw = _read_grey(path)
    low, high = values
    bad = (raw != low) & (raw != high)
    if bad.any():
        raise DataError(f"{path}: mask value {int(raw[bad][0])} is not one of {values}")
    return (raw == (low if inverted else high)).astype(np.uint8)


def adjacent_channels(slices: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, H, W, 3]`` with channels (i-1, i, i+1), clamped at the ends."""
    n = slices.shape[0]
    idx = np.clip(np.arange(n)[:, None] + np.array([-1, 0, 1]), 0, n - 1)
    return np.moveaxis(slices[idx], 1, -1)


def _build_case(
    name: str, pairs: list[tuple[Path, Path]], values: tuple[int, int], inverted: bool
) -> Case:
    """Stack the slices of one case into a validated :class:`Case`."""
    images, masks = [], []
    for image_path, mask_path in pairs:
        image, mask = _unit_range(_read_grey(image_path)), _read_mask(mask_path, values, inverted)
        if image.shape != mask.shape:
            raise DataError(
                f"image/mask shape mismatch: {image_path} has shape {image.shape}, "
                f"{mask_path} has shape {mask.shape}"
            )
        if images and image.shape != images[0].shape:
            raise DataError(
                f"{image_path}: shape {image.shape} differs from {pairs[0][0]} "
                f"({images[0].shape}) in the same case"
            )
        images.append(image)
        masks.append(mask)
    volume = adjacent_channels(np.stack(images))
    source = f"{pairs[0][0].parent}/{name}_*.png"
    return make_case(name, volume, np.stack(masks), 2, source, f"{pairs[0][1].parent}")


def read_png_split(
    split_dir: Path,
    pairing: Literal["name", "order"],
    values: tuple[int, int],
    inverted: bool,
) -> list[Case]:
    """All cases of one ``train`` or ``test`` folder, grouped by the image file's case name."""
    groups: dict[str, list[tuple[Path, Path]]] = {}
    for image, mask in pair_files(split_dir / "image", split_dir / "mask", pairing):
        groups.setdefault(_key(image)[0], []).append((image, mask))
    return [_build_case(name, pairs, values, inverted) for name, pairs in groups.items()]


def carve_val(train: list[Case], val_fraction: float, site: str) -> tuple[list[Case], list[Case]]:
    """Split train cases into (train, val) deterministically.

    Rule: cases sorted by name; the last ``max(1, round(val_fraction * n))`` become val. With a
    single train case it serves as both train and val (logged); ``val_fraction=0`` gives no val.
    """
    cases = sorted(train, key=lambda c: c.name)
    if val_fraction <= 0 or not cases:
        return cases, []
    if len(cases) == 1:
        log.warning(
            "site %s has one train case (%s): used for both train and val", site, cases[0].name
        )
        return cases, list(cases)
    n_val = min(len(cases) - 1, max(1, math.floor(val_fraction * len(cases) + 0.5)))
    return cases[:-n_val], cases[-n_val:]


def _warn_if_mostly_foreground(cases: list[Case], site: str, inverted: bool) -> None:
    """Log a warning when most pixels are foreground: ``mask_inverted`` is probably wrong."""
    pixels = sum(case.mask.size for case in cases)
    if pixels and sum(int(case.mask.sum()) for case in cases) > pixels / 2:
        log.warning(
            "site %s: most mask pixels are foreground; is mask_inverted=%s right?", site, inverted
        )


def read_png_slices(
    root: str | Path,
    site: str,
    pairing: Literal["name", "order"] = "name",
    val_fraction: float = 0.2,
    mask_inverted: bool = True,
    mask_values: tuple[int, int] = (0, 255),
    require_train: bool = True,
) -> SiteSplits:
    """Read one site of per-slice PNGs into train/val/test cases (labels 0 = bg, 1 = organ).

    Args:
        root: folder holding ``<SITE>/{train,test}/{image,mask}``.
        site: site folder name (``ISBI``/``ISBI_1.5`` fall back to ``RUNMC``/``BMC``).
        pairing: ``"name"`` requires identical image/mask names; ``"order"`` pairs the sorted
            lists and logs a warning for each pair whose names differ.
        val_fraction: fraction of train cases carved off as val (see :func:`carve_val`).
        mask_inverted: the low mask value is the foreground (true for the real sample).
        mask_values: the two allowed grey values ``(low, high)``.
        require_train: False for a held-out (outside) site, which never trains: it may have
            a ``test`` folder only.
    """
    if pairing not in ("name", "order"):
        raise ValueError(f"pairing must be 'name' or 'order', got {pairing!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    folder = site_folder(Path(root), site)
    train = read_png_split(folder / "train", pairing, mask_values, mask_inverted) \
        if require_train or (folder / "train").is_dir() else []
    test = read_png_split(folder / "test", pairing, mask_values, mask_inverted)
    if not train and not test:
        raise DataError(f"site {site!r} has no samples under {folder}")
    _warn_if_mostly_foreground(train + test, site, mask_inverted)
    train, val = carve_val(train, val_fraction, site)
    return {"train": train, "val": val, "test": test}
