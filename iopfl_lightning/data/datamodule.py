"""LightningDataModule serving several sites as federated clients plus held-out sites.

Sites in ``sites`` but not in ``outside`` are the clients (``inside_sites``; client index = position).
``outside`` sites never train; they appear only in the test loaders and in
:meth:`MultiSiteDataModule.outside_dataloader` (unlabelled images for test-time routing).

Loaders (batches are dicts, see :mod:`iopfl_lightning.data.dataset`):

- ``train_dataloader()``: one concatenated dataset with a :class:`ClientBatchSampler`, so an epoch
  is one round (clients contiguous, ascending). Call :meth:`configure_rounds` first to set
  participation and local epochs.
- ``val_dataloader()``: one loader per inside site; ``"client"`` = client index.
- ``test_dataloader()`` / ``predict_dataloader()``: one loader per site of ``eval_sites`` (inside
  then outside); ``"client"`` = position in ``eval_sites``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader

from .batching import BatchedSlices, collate_batch
from .cases import SPLITS, DataError, SiteSplits, count_slices
from .dataset import Normalize, SiteDataset, TransformSpec, build_transform
from .device_cache import CachedSite
from .fundus import FUNDUS_DOMAINS, read_fundus
from .npy import PROSTATE_SITES, read_iopfl_npy
from .png_slices import PNG_SITE_ALIASES, folder_name, read_png_slices
from .sampler import ClientBatchSampler, Participants
from .synthetic import SITE_STYLES, make_synthetic_sites

log = logging.getLogger(__name__)

Format = Literal["synthetic", "iopfl_npy", "png_slices", "fundus"]
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "size": 64,
    "slices": 8,
    "cases_per_split": {"train": 4, "val": 2, "test": 2},
    "seed": None,  # None = the datamodule's seed
}


def known_sites(format: Format, root: Path | None) -> list[str]:
    """Valid site names of ``format`` (PNG slices also accept every folder under ``root``)."""
    if format == "synthetic":
        return list(SITE_STYLES)
    if format == "fundus":
        return list(FUNDUS_DOMAINS)
    names = list(PROSTATE_SITES)
    if format == "png_slices" and root is not None and root.is_dir():
        aliases = set(PNG_SITE_ALIASES.values())
        names += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in names)
        names += sorted(aliases - set(names))
    return names


def default_sites(format: Format, root: Path | None) -> list[str]:
    """Sites used when ``sites=None``.

    Synthetic: every ``SITE_STYLES`` entry. Real formats: the format's standard names whose
    folder exists under ``root`` (PNG: also through the hospital alias, e.g. ISBI -> RUNMC), then,
    for PNG slices, any other site folder that is not such an alias.
    """
    if format == "synthetic":
        return list(SITE_STYLES)
    assert root is not None
    standard = FUNDUS_DOMAINS if format == "fundus" else PROSTATE_SITES
    found = []
    for site in standard:
        alias = PNG_SITE_ALIASES.get(site) if format == "png_slices" else None
        if (root / site).is_dir() or (alias and (root / alias).is_dir()):
            found.append(site)
    if format == "png_slices":
        used = set(found) | {PNG_SITE_ALIASES[s] for s in found if s in PNG_SITE_ALIASES}
        found += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in used)
    if not found:
        raise ValueError(f"sites=None: no {format} site folders under root {str(root)!r}")
    return found


def sample_keys(batch: dict) -> list[tuple[int, int]]:
    """``(case, slice)`` of every sample of ``batch`` (``keys`` when the datamodule already read
    them on the CPU, before the batch moved to the device)."""
    keys = batch.get("keys")
    if keys is None:
        keys = list(zip(batch["case"].tolist(), batch["slice"].tolist(), strict=True))
    return keys


class MultiSiteDataModule(LightningDataModule):
    """Multi-site segmentation data as federated clients (see the module docstring).

    Args:
        format: data source; real formats need ``root``.
        root: data folder of a real format.
        sites: sites to use, in client order (None = every site found, see
            :func:`default_sites`: synthetic the keys of ``SITE_STYLES``, prostate the six IOP-FL
            names, fundus ``Domain1..4``).
        outside: held-out sites among ``sites`` (None = none). On the command line
            ``--data.outside UCL``, ``--data.outside UCL,HK``, ``--data.outside "[UCL, HK]"`` or
            repeated ``--data.outside+ UCL --data.outside+ HK``.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (None = ``batch_size``).
        num_workers: DataLoader worker processes.
        num_classes: label classes (None = 2, fundus 3).
        image_size: resize slices to this square size (fundus: applied while reading).
        train_transform: albumentations pipeline, or dicts (see :func:`build_transform`); none by
            default, as in the paper.
        synthetic: overrides of ``SYNTHETIC_DEFAULTS`` (size, slices, cases_per_split, seed).
        pairing: PNG slices: pair image/mask files by ``"name"`` or sorted ``"order"``.
        mask_inverted: PNG slices: the low mask value is the foreground (the real sample's way).
        val_fraction: PNG slices and fundus: fraction of train cases carved off as val.
        normalize: ``"none"`` (keep reader intensities) or per-slice ``"zscore"``.
        seed: seed of the training shuffles (and of synthetic data unless overridden).
        pin_memory: DataLoader ``pin_memory``.
        train_on: ``inside`` (federated training on the clients) or ``outside``: test-time
            routing, where ``train_dataloader`` yields the outside site's test images WITHOUT
            masks (shuffled, seeded per epoch), there is no validation, and the test loaders
            cover the outside sites only.
        device_cache: finish every split a loader serves once (resize, normalize) and keep it
            on the trainer's device; batches are then index gathers there (no workers, no
            per-batch host-to-device copy; see :mod:`iopfl_lightning.data.device_cache`).
            Same batches as without it. Needs device memory for the images (float32) and
            masks (uint8) and no ``train_transform``; ``num_workers`` is then ignored.
    """

    def __init__(
        self,
        format: Format = "synthetic",
        root: str | None = None,
        sites: list[str] | None = None,
        outside: list[str] | str | None = None,
        batch_size: int = 5,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        num_classes: int | None = None,
        image_size: int | None = None,
        train_transform: TransformSpec = None,
        synthetic: dict[str, Any] | None = None,
        pairing: Literal["name", "order"] = "name",
        mask_inverted: bool = True,
        val_fraction: float = 0.2,
        normalize: Normalize = "none",
        seed: int = 0,
        pin_memory: bool = False,
        train_on: Literal["inside", "outside"] = "inside",
        device_cache: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("format", format, ("synthetic", "iopfl_npy", "png_slices", "fundus"))
        _check_choice("pairing", pairing, ("name", "order"))
        _check_choice("normalize", normalize, ("none", "zscore"))
        _check_choice("train_on", train_on, ("inside", "outside"))
        self.format = format
        self.root = _check_root(format, root)
        if sites is None:
            sites = default_sites(format, self.root)
        self.sites = _check_sites(sites, known_sites(format, self.root))
        if format == "png_slices":
            _refuse_shared_folders(self.sites, self.root)
        self.outside_sites = _check_outside(outside, self.sites)
        if train_on == "outside" and len(self.outside_sites) != 1:
            raise ValueError(
                f"train_on='outside' needs exactly one outside site (--data.outside SITE), "
                f"got {self.outside_sites}"
            )
        self.train_on = train_on
        self.inside_sites = [s for s in self.sites if s not in self.outside_sites]
        if not self.inside_sites:
            raise ValueError(
                f"outside={self.outside_sites} leaves no training site among {self.sites}"
            )
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.num_classes = num_classes or (3 if format == "fundus" else 2)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.image_size, self.normalize, self.seed = image_size, normalize, seed
        self.train_transform = build_transform(train_transform)
        if device_cache and self.train_transform is not None:
            raise ValueError(
                "device_cache=True cannot be combined with a train_transform (albumentations "
                "runs per sample on the CPU); set one of them off"
            )
        self.device_cache = device_cache
        self._caches: dict[tuple, CachedSite] = {}
        self.synthetic = _check_synthetic(synthetic, seed)
        self.pairing, self.mask_inverted, self.val_fraction = pairing, mask_inverted, val_fraction
        self.participants: Participants | None = None
        self.local_epochs = 1
        self.pooled = False
        self.site_data: dict[str, SiteSplits] | None = None

    # ---- description -------------------------------------------------------------------------

    @property
    def eval_sites(self) -> list[str]:
        """Inside sites then outside sites: the order of the test loaders."""
        return self.inside_sites + self.outside_sites

    @property
    def in_channels(self) -> int:
        """Input channels: 3 for every format (adjacent slices, or RGB for fundus)."""
        return 3

    # ---- loading -----------------------------------------------------------------------------

    def _read_site(self, site: str) -> SiteSplits:
        """All splits of one site from the configured source."""
        if self.format == "iopfl_npy":
            return read_iopfl_npy(self.root, site, num_classes=self.num_classes)
        if self.format == "png_slices":
            return read_png_slices(
                self.root, site, self.pairing, self.val_fraction, self.mask_inverted,
                require_train=site in self.inside_sites,
            )
        if self.format == "fundus":
            return read_fundus(self.root, site, self.image_size, self.val_fraction)
        raise AssertionError(self.format)

    def _load(self) -> dict[str, SiteSplits]:
        if self.format == "synthetic":
            data = make_synthetic_sites(self.eval_sites, **self.synthetic)
        else:
            data = {site: self._read_site(site) for site in self.eval_sites}
        _check_loaded(data, self.inside_sites, self.in_channels, self.num_classes)
        return data

    def setup(self, stage: str | None = None) -> None:
        """Load every site once (later calls do nothing)."""
        if self.site_data is None:
            self.site_data = self._load()

    def _splits(self) -> dict[str, SiteSplits]:
        """Loaded data of every site (loads on first use, so helpers work before ``setup``)."""
        self.setup()
        assert self.site_data is not None
        return self.site_data

    def dataset(self, site: str, split: str, labels: bool = True) -> SiteDataset:
        """The dataset of ``site``/``split`` (an inside site's train split uses the train
        transform and its client index; anything else its evaluation index, no transform)."""
        cases = self._splits()[site][split]
        training = split == "train" and site in self.inside_sites
        index = self.inside_sites.index(site) if training else self.eval_sites.index(site)
        transform = self.train_transform if training else None
        return SiteDataset(cases, index, transform, self.image_size, self.normalize, labels)

    def client_sample_counts(self) -> list[int]:
        """Training slices per client, in ``inside_sites`` order (FedAvg weights)."""
        return [count_slices(self._splits()[site]["train"]) for site in self.inside_sites]

    # ---- rounds and loaders ------------------------------------------------------------------

    def configure_rounds(
        self, participants: Participants | None, local_epochs: int = 1, pooled: bool = False
    ) -> None:
        """Set who trains in each round (``participants(epoch)`` -> client indices; None = all),
        how many passes each makes, and whether the clients' data is pooled into one shuffled
        stream (centralized training); takes effect in the next ``train_dataloader()``."""
        if local_epochs <= 0:
            raise ValueError(f"local_epochs must be positive, got {local_epochs}")
        self.participants, self.local_epochs = participants, local_epochs
        self.pooled = pooled

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def train_batch_sampler(self) -> ClientBatchSampler:
        """The round-structured batch sampler over the inside sites' training data."""
        return ClientBatchSampler(
            self.client_sample_counts(),
            self.batch_size,
            seed=self.seed,
            participants=self.participants,
            local_epochs=self.local_epochs,
            epoch=self._current_epoch(),
            pooled=self.pooled,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_on == "outside":
            return self.outside_dataloader(shuffle=True)
        sources = [(site, "train", True) for site in self.inside_sites]
        return self._loader(sources, concat=True, batch_sampler=self.train_batch_sampler())

    def _loader(self, sources: list[tuple[str, str, bool]], concat: bool = False,
                **kwargs) -> DataLoader:
        """A loader over the (site, split, labels) ``sources``, concatenated in order."""
        if "batch_sampler" not in kwargs:
            kwargs.setdefault("batch_size", self.eval_batch_size)
            kwargs.setdefault("shuffle", False)
        datasets = [self.dataset(site, split, labels=labels) for site, split, labels in sources]
        dataset = ConcatDataset(datasets) if concat or len(datasets) > 1 else datasets[0]
        parts = [self._cached(source, ds) for source, ds in zip(sources, datasets, strict=True)] \
            if self.device_cache else None
        workers = 0 if self.device_cache else self.num_workers  # batches are device gathers
        return DataLoader(
            BatchedSlices(dataset, parts),  # one fetch per batch, not per slice
            collate_fn=collate_batch,
            num_workers=workers,
            pin_memory=self.pin_memory and not self.device_cache,
            persistent_workers=workers > 0,
            **kwargs,
        )

    def release_device_cache(self) -> None:
        """Drop the device-resident copies of ``device_cache`` (GPU memory back, e.g. after a
        fit in a notebook); the next loader that needs one builds it again."""
        self._caches.clear()

    def _cache_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _cached(self, source: tuple[str, str, bool], dataset: SiteDataset) -> CachedSite:
        """The device-resident copy of a (site, split, labels) source, made on first use."""
        device = self._cache_device()
        key = (*source, str(device))
        if key not in self._caches:
            site, split, labels = source
            name = f"site {site!r} {split}" + ("" if labels else " (unlabelled)")
            self._caches[key] = CachedSite(dataset, device, name)
        return self._caches[key]

    def val_dataloader(self) -> list[DataLoader]:
        if self.train_on == "outside":
            return []  # no labels of the new site may steer test-time fitting
        return [self._loader([(site, "val", True)]) for site in self.inside_sites]

    @property
    def test_sites(self) -> list[str]:
        """Sites of the test loaders, in order (outside sites only when ``train_on='outside'``)."""
        return self.outside_sites if self.train_on == "outside" else self.eval_sites

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader([(site, "test", True)]) for site in self.test_sites]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Adds, read on the CPU before the batch moves (on a GPU, reading them after would
        wait for every queued kernel): ``client_id`` (a Python int) for the federated callback,
        and ``keys``, the (case, slice) pairs that key test-time routing's online predictions."""
        if isinstance(batch, dict) and "client" in batch and batch["client"].numel():
            batch["client_id"] = int(batch["client"][0])
        if isinstance(batch, dict) and "case" in batch and "slice" in batch:
            batch["keys"] = sample_keys(batch)
        return batch

    def outside_dataloader(
        self,
        split: str = "test",
        site: str | None = None,
        labels: bool = False,
        batch_size: int | None = None,
        shuffle: bool = False,
    ) -> DataLoader:
        """Images of an outside site (default: the only one), without masks unless ``labels``.

        For test-time routing, which must never see the new site's labels.
        """
        if site is None:
            if len(self.outside_sites) != 1:
                raise ValueError(
                    f"site=None needs exactly one outside site, have {self.outside_sites}"
                )
            site = self.outside_sites[0]
        if site not in self.outside_sites:
            raise ValueError(f"site {site!r} is not an outside site; outside: {self.outside_sites}")
        _check_choice("split", split, SPLITS)
        size = batch_size or self.eval_batch_size
        if not shuffle:
            return self._loader([(site, split, labels)], batch_size=size)
        # shuffled per epoch from (seed, epoch) like the training batches: the same order
        # whatever the number of workers (a DataLoader generator also seeds the workers, so
        # its stream moved with num_workers) and after a restart at any epoch
        count = len(self.dataset(site, split, labels=labels))
        return self._loader([(site, split, labels)],
                            batch_sampler=ClientBatchSampler([count], size, seed=self.seed))


# ---- argument checks -------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_root(format: str, root: str | None) -> Path | None:
    if format == "synthetic":
        return None if root is None else Path(root)
    if root is None:
        raise ValueError(f"root is required for format={format!r}")
    if not Path(root).is_dir():
        raise ValueError(f"root {root!r} (format={format!r}) is not a folder")
    return Path(root)


def _check_sites(sites: list[str], valid: list[str]) -> list[str]:
    unknown = [s for s in sites if s not in valid]
    if unknown:
        raise ValueError(f"sites: unknown site(s) {unknown}; valid sites: {valid}")
    _refuse_repeats("sites", sites)
    if not sites:
        raise ValueError("sites: empty list; give at least one site or None for all")
    return list(sites)


def _refuse_shared_folders(sites: list[str], root: Path) -> None:
    """An IOP-FL name and its hospital alias (ISBI, RUNMC) would read one folder twice: the
    same images as two sites, possibly one inside and one "unseen" outside."""
    by_folder: dict[str, list[str]] = {}
    for site in sites:
        by_folder.setdefault(folder_name(root, site), []).append(site)
    shared = {folder: names for folder, names in by_folder.items() if len(names) > 1}
    if shared:
        folder, names = next(iter(shared.items()))
        raise ValueError(f"sites: {names} all read folder {root / folder}; list that site once")


def _check_outside(outside: list[str] | str | None, sites: list[str]) -> list[str]:
    if isinstance(outside, str):
        outside = [s.strip() for s in outside.split(",") if s.strip()]
    outside = list(outside or [])
    missing = [s for s in outside if s not in sites]
    if missing:
        raise ValueError(f"outside: site(s) {missing} are not among sites {sites}")
    _refuse_repeats("outside", outside)
    return outside


def _refuse_repeats(name: str, sites: list[str]) -> None:
    twice = sorted({s for s in sites if sites.count(s) > 1})
    if twice:
        raise ValueError(f"{name}: site(s) {twice} listed more than once")


def _check_synthetic(overrides: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    unknown = sorted(set(overrides or {}) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ValueError(f"synthetic: unknown key(s) {unknown}; valid: {list(SYNTHETIC_DEFAULTS)}")
    config = {**SYNTHETIC_DEFAULTS, **(overrides or {})}
    if config["seed"] is None:
        config["seed"] = seed
    return config


def _check_loaded(
    data: dict[str, SiteSplits], inside: list[str], channels: int, num_classes: int
) -> None:
    """Fail before training on empty sites and inconsistent channel counts."""
    for site, splits in data.items():
        if site in inside and count_slices(splits["train"]) == 0:
            raise DataError(f"site {site!r} has no training samples")
        if count_slices(splits["test"]) == 0:
            raise DataError(f"site {site!r} has no test samples")
        if site in inside and count_slices(splits["val"]) == 0:
            log.warning("site %s has no validation samples: its per-round validation scores "
                        "will be missing; add cases to its val split to monitor it", site)
        for split, cases in splits.items():
            for case in cases:
                if case.image.shape[-1] != channels:
                    raise DataError(
                        f"site {site!r} {split} case {case.name!r}: {case.image.shape[-1]} "
                        f"channels, expected {channels}"
                    )
    log.info("loaded sites %s (%d classes)", list(data), num_classes)
