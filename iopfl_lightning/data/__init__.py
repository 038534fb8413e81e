"""Multi-site segmentation data: readers, synthetic sites, the round-structured sampler and
the LightningDataModule that serves sites as federated clients."""

from .cases import SPLITS, Case, DataError, SiteSplits, make_case
from .datamodule import SYNTHETIC_DEFAULTS, MultiSiteDataModule, default_sites, known_sites
from .dataset import SiteDataset, build_transform
from .fundus import FUNDUS_CLASSES, FUNDUS_DOMAINS, read_fundus
from .npy import PROSTATE_SITES, read_iopfl_npy, write_iopfl_npy
from .png_slices import PNG_SITE_ALIASES, adjacent_channels, carve_val, read_png_slices
from .sampler import ClientBatchSampler
from .synthetic import SITE_STYLES, SiteStyle, make_synthetic_sites, site_style

__all__ = [
    "FUNDUS_CLASSES",
    "FUNDUS_DOMAINS",
    "PNG_SITE_ALIASES",
    "PROSTATE_SITES",
    "SITE_STYLES",
    "SPLITS",
    "SYNTHETIC_DEFAULTS",
    "Case",
    "ClientBatchSampler",
    "DataError",
    "MultiSiteDataModule",
    "SiteDataset",
    "SiteSplits",
    "SiteStyle",
    "adjacent_channels",
    "build_transform",
    "carve_val",
    "default_sites",
    "known_sites",
    "make_case",
    "make_synthetic_sites",
    "read_fundus",
    "read_iopfl_npy",
    "read_png_slices",
    "site_style",
    "write_iopfl_npy",
]
