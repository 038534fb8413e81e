"""IOP-FL preprocessed prostate format (``.npy`` volumes plus split lists).

Layout::

    <root>/<SITE>/CaseNN.npy               float [N, H, W, 3]  (slices i-1, i, i+1)
    <root>/<SITE>/CaseNN_segmentation.npy  [N, H, W]           (labels 0 = background, 1 = prostate)
    <root>/<SITE>_train.txt                one case per line
    <root>/<SITE>_val.txt
    <root>/<SITE>_test.txt

A split-list line may be ``Case00.npy`` (as the reference code's lists are written) or just
``Case00``; blank lines and lines starting with ``#`` are ignored. Volumes are opened with
``mmap_mode="r"`` so only the slices a batch touches are read from disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .cases import SPLITS, Case, DataError, SiteSplits, make_case, require_path

log = logging.getLogger(__name__)

PROSTATE_SITES: tuple[str, ...] = ("BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL")


def split_file(root: Path, site: str, split: str) -> Path:
    """Path of the split list of ``site``/``split``."""
    return root / f"{site}_{split}.txt"


def read_split_list(path: Path) -> list[str]:
    """Case names listed in ``path`` (``.npy`` suffix stripped, duplicates rejected)."""
    require_path(path, "split file")
    names: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.removesuffix(".npy")
        if name in names:
            raise DataError(f"{path}: case {name!r} listed twice")
        names.append(name)
    return names


def _refuse_shared_cases(root: Path, site: str, lists: dict[str, list[str]]) -> None:
    """A case in two split lists would be trained on and then scored as unseen."""
    first: dict[str, str] = {}
    for split, names in lists.items():
        for name in names:
            if name in first:
                raise DataError(f"case {name!r} of site {site!r} is listed in both "
                                f"{split_file(root, site, first[name])} and "
                                f"{split_file(root, site, split)}: a case belongs to one split")
            first[name] = split


def _load(path: Path) -> np.ndarray:
    """Memory-map one ``.npy`` file, naming it if it is missing or unreadable."""
    require_path(path, "case file")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def read_npy_case(site_dir: Path, name: str, num_classes: int = 2) -> Case:
    """Load and validate ``<site_dir>/<name>.npy`` and its ``_segmentation.npy`` mask."""
    image_path = site_dir / f"{name}.npy"
    mask_path = site_dir / f"{name}_segmentation.npy"
    image, mask = _load(image_path), _load(mask_path)
    return make_case(name, image, mask, num_classes, str(image_path), str(mask_path))


def read_iopfl_npy(
    root: str | Path,
    site: str,
    splits: Iterable[str] = SPLITS,
    num_classes: int = 2,
) -> SiteSplits:
    """Read one site of the IOP-FL preprocessed prostate format.

    Args:
        root: folder holding ``<SITE>/`` folders and ``<SITE>_<split>.txt`` lists.
        site: site folder name, e.g. ``"BIDMC"`` or ``"ISBI_1.5"``.
        splits: which split lists to read.
        num_classes: labels must lie in ``[0, num_classes)``.

    Raises:
        DataError: missing folder/list/file, a case in two split lists, shape mismatch,
            NaN/inf, bad label, empty site.
    """
    root = Path(root)
    site_dir = require_path(root / site, f"site folder of {site!r}")
    lists = {split: read_split_list(split_file(root, site, split)) for split in splits}
    _refuse_shared_cases(root, site, lists)
    out: SiteSplits = {split: [read_npy_case(site_dir, name, num_classes) for name in names]
                       for split, names in lists.items()}
    if not any(case.num_slices for cases in out.values() for case in cases):
        raise DataError(f"site {site!r} has no samples under {root}")
    log.info("read %s from %s: %s", site, root, {k: len(v) for k, v in out.items()})
    return out


def write_iopfl_npy(sites: dict[str, SiteSplits], root: str | Path) -> Path:
    """Write ``{site: SiteSplits}`` in the IOP-FL format so :func:`read_iopfl_npy` reads it back.

    Case names must be unique within a site across splits (they share one folder).
    """
    root = Path(root)
    for site, splits in sites.items():
        site_dir = root / site
        site_dir.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        for split, cases in splits.items():
            for case in cases:
                if case.name in seen:
                    raise DataError(f"site {site!r}: case name {case.name!r} used twice")
                seen.add(case.name)
                np.save(site_dir / f"{case.name}.npy", np.asarray(case.image, np.float32))
                np.save(site_dir / f"{case.name}_segmentation.npy", np.asarray(case.mask))
            lines = "".join(f"{case.name}.npy\n" for case in cases)
            split_file(root, site, split).write_text(lines)
    return root
