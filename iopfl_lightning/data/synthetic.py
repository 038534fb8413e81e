"""Seeded synthetic multi-site "prostate-like" data for demos, tests and benchmarks.

Every site shares one anatomy: a body outline, a smooth ellipsoid-like organ whose outline wobbles
(angular harmonics that drift over slices) and two unlabelled neighbours (a bright bladder-like
blob above, a dark rectum-like blob below), all with smooth texture. Sites then differ the way
scanners and hospitals do (see :data:`SITE_STYLES`):

- acquisition: field of view (zoom), blur, multiplicative bias field, intensity curve (gamma and
  a partial inversion), contrast/brightness, noise level;
- annotation style: the label is ``distance < mask_scale`` where the organ's true boundary is at
  distance 1, so ``mask_scale > 1`` is a site that draws generously (dilated) and ``< 1`` a
  conservative one (eroded). A single global model cannot satisfy all annotators at once, which
  is what personalization is for; the shared anatomy is what federation exploits.

Images are ``[N, H, W, 3]`` float32 in ``[0, 1]`` (channels = slices i-1, i, i+1, taken from real
neighbouring slices: each case is generated with one extra slice at either end); masks are
``[N, H, W]`` uint8 in {0, 1}. Everything is vectorised numpy; the same seed gives identical arrays.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from .cases import SPLITS, Case, SiteSplits
from .npy import PROSTATE_SITES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteStyle:
    """How one synthetic site acquires and annotates images (see the module docstring)."""

    gamma: float = 1.0
    invert: float = 0.0  # 0 = plain intensities, 1 = fully inverted
    contrast: float = 1.0
    brightness: float = 0.0
    noise: float = 0.04
    blur: float = 0.0  # Gaussian sigma in pixels at size 64
    bias: float = 0.0  # strength of the multiplicative bias field
    zoom: float = 1.0  # field of view: > 1 magnifies the anatomy
    mask_scale: float = 1.0  # annotation style: > 1 dilated, < 1 eroded


SITE_STYLES: dict[str, SiteStyle] = {
    "BIDMC": SiteStyle(
        gamma=2.2, contrast=0.7, noise=0.03, blur=1.0, bias=0.35, zoom=1.0, mask_scale=1.0
    ),
    "HK": SiteStyle(
        gamma=1.0, contrast=1.1, noise=0.09, blur=0.0, bias=0.1, zoom=0.8, mask_scale=1.3
    ),
    "I2CVB": SiteStyle(
        gamma=0.6, contrast=0.9, noise=0.02, blur=1.6, bias=0.45, zoom=1.3, mask_scale=0.75
    ),
    "ISBI": SiteStyle(
        gamma=1.0,
        invert=0.8,
        contrast=0.8,
        noise=0.05,
        blur=0.6,
        bias=0.2,
        zoom=1.0,
        mask_scale=1.0,
    ),
    "ISBI_1.5": SiteStyle(
        gamma=1.5, contrast=0.5, brightness=0.1, noise=0.11, blur=0.3, zoom=1.15, mask_scale=1.15
    ),
    "UCL": SiteStyle(
        gamma=0.8, invert=0.4, contrast=1.3, noise=0.03, bias=0.25, zoom=0.9, mask_scale=0.85
    ),
}


def _stable_hash(name: str) -> int:
    """Process-independent integer for ``name`` (Python's ``hash`` is salted per process)."""
    return zlib.crc32(name.encode())


def site_style(site: str) -> SiteStyle:
    """Style of ``site``: the table entry, or one drawn from a generator seeded by the name."""
    if site in SITE_STYLES:
        return SITE_STYLES[site]
    rng = np.random.default_rng(_stable_hash(site))
    return SiteStyle(
        gamma=float(rng.uniform(0.5, 2.2)),
        invert=float(rng.choice([0.0, 0.0, 0.6])),
        contrast=float(rng.uniform(0.5, 1.3)),
        noise=float(rng.uniform(0.02, 0.1)),
        blur=float(rng.uniform(0.0, 1.5)),
        bias=float(rng.uniform(0.0, 0.4)),
        zoom=float(rng.uniform(0.8, 1.3)),
        mask_scale=float(rng.choice([0.75, 0.85, 1.0, 1.15, 1.3])),
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth random texture with zero mean and unit standard deviation.

    Drawn on a grid of at most 64 pixels a side and upsampled (the texture is smooth, and
    filtering 384-pixel noise with a wide kernel is what would otherwise dominate the cost).
    """
    slices, size = shape[0], shape[-1]
    coarse = min(size, 64)
    scale = coarse / size
    field = gaussian_filter(
        rng.standard_normal((slices, coarse, coarse)), (0.7, sigma * scale, sigma * scale)
    )
    if coarse != size:
        field = zoom(
            field, (1, size / coarse, size / coarse), order=1, grid_mode=True, mode="nearest"
        )
    return (field - field.mean()) / (field.std() + 1e-8)


def _blob_distance(y, x, z, cy, cx, ry, rx, angle) -> np.ndarray:
    """Normalised elliptical distance (1 on the outline) of a rotated ellipse on every slice."""
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = y - cy, x - cx
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    return np.sqrt((u / rx) ** 2 + (v / ry) ** 2) + 0 * z


def _organ_distance(rng: np.random.Generator, y, x, z) -> np.ndarray:
    """Distance to a random ellipsoid-like organ whose outline wobbles smoothly over slices."""
    cy, cx = rng.uniform(-0.1, 0.1, 2)
    ry, rx = rng.uniform(0.22, 0.36, 2)
    z_extent = rng.uniform(0.9, 1.3)
    theta = np.arctan2(y - cy, x - cx)
    base, drift = rng.uniform(0, 2 * np.pi, 2), rng.uniform(-1, 1, 2)
    wobble = 1 + rng.uniform(0.05, 0.15) * np.cos(2 * theta + base[0] + drift[0] * z)
    wobble += rng.uniform(0.03, 0.1) * np.cos(3 * theta + base[1] + drift[1] * z)
    profile = np.sqrt(np.clip(1 - (z / z_extent) ** 2, 0.05, 1))
    tilt = rng.uniform(-0.4, 0.4)
    return _blob_distance(y, x, z, cy, cx, ry, rx, tilt) / (wobble * profile)


def _anatomy(rng: np.random.Generator, slices: int, size: int, fov_zoom: float):
    """Latent tissue intensities ``[S+2, H, W]`` in about [0, 1] and the organ distance map."""
    axis = np.linspace(-1, 1, size) / fov_zoom
    z = np.linspace(-1, 1, slices + 2)[:, None, None]
    y, x = axis[None, :, None], axis[None, None, :]
    organ = _organ_distance(rng, y, x, z)
    body = _blob_distance(y, x, z, 0.0, 0.0, 0.85, 1.05, 0.0)
    bladder = _blob_distance(
        y, x, z, -0.45 + rng.uniform(-0.05, 0.05), rng.uniform(-0.1, 0.1), 0.18, 0.28, 0.0
    )
    rectum = _blob_distance(
        y, x, z, 0.45 + rng.uniform(-0.05, 0.05), rng.uniform(-0.1, 0.1), 0.14, 0.16, 0.0
    )
    shape = (slices + 2, size, size)
    texture = _smooth_field(rng, shape, size / 24)
    latent = np.where(body < 1, 0.38 + 0.06 * texture, 0.04)
    latent = np.where(bladder < 1, 0.85 + 0.03 * texture, latent)
    latent = np.where(rectum < 1, 0.18 + 0.04 * texture, latent)
    edge = np.clip((1.0 - organ) / 0.08, 0, 1)  # soft organ boundary, half a pixel or so wide
    organ_tissue = 0.6 + 0.08 * _smooth_field(rng, shape, size / 40)
    latent = latent * (1 - edge) + organ_tissue * edge
    return latent, organ


def _acquire(rng: np.random.Generator, latent: np.ndarray, style: SiteStyle) -> np.ndarray:
    """Apply a site's scanner: blur, bias field, intensity curve, contrast, noise; clip to [0, 1]."""
    size = latent.shape[-1]
    image = latent
    if style.blur > 0:
        image = gaussian_filter(image, sigma=(0, style.blur * size / 64, style.blur * size / 64))
    if style.bias > 0:
        axis = np.linspace(-1, 1, size)
        a, b, c = rng.uniform(-1, 1, 3)
        field = a * axis[:, None] + b * axis[None, :] + c * axis[:, None] * axis[None, :]
        image = image * np.exp(style.bias * field)[None]
    image = np.clip(image, 0, 1) ** style.gamma
    image = (1 - style.invert) * image + style.invert * (1 - image)
    image = (image - 0.5) * style.contrast + 0.5 + style.brightness
    image = image + style.noise * rng.standard_normal(image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def make_synthetic_case(
    rng: np.random.Generator, name: str, style: SiteStyle, slices: int = 8, size: int = 64
) -> Case:
    """One synthetic case: ``slices`` slices of ``size x size`` with 3 adjacent-slice channels."""
    latent, organ = _anatomy(rng, slices, size, style.zoom)
    volume = _acquire(rng, latent, style)
    image = np.stack([volume[:-2], volume[1:-1], volume[2:]], axis=-1)
    mask = (organ[1:-1] < style.mask_scale).astype(np.uint8)
    return Case(name=name, image=np.ascontiguousarray(image), mask=mask)


def make_synthetic_sites(
    sites: Sequence[str] = PROSTATE_SITES,
    cases_per_split: Mapping[str, int] | None = None,
    slices: int = 8,
    size: int = 64,
    seed: int = 0,
) -> dict[str, SiteSplits]:
    """Generate ``{site: {"train": [...], "val": [...], "test": [...]}}``.

    Each site's stream is seeded from ``(seed, site name)``, so a site's data does not depend on
    which other sites are generated. Case names (``Case00``, ``Case01``, ...) are unique within a
    site across splits.
    """
    counts = dict(cases_per_split or {"train": 4, "val": 2, "test": 2})
    if slices <= 0 or size < 8:
        raise ValueError(f"need slices > 0 and size >= 8, got slices={slices}, size={size}")
    unknown = set(counts) - set(SPLITS)
    if unknown or any(n < 0 for n in counts.values()):
        raise ValueError(f"cases_per_split must map {SPLITS} to counts >= 0, got {counts}")
    # One thread per site: each site has its own stream, so the arrays are the same as in a
    # serial loop, and scipy.ndimage and numpy release the GIL for most of the work.
    workers = min(len(sites), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        generated = pool.map(lambda site: _make_site(site, counts, slices, size, seed), sites)
        out = dict(zip(sites, generated, strict=True))
    log.info("generated %d synthetic sites (%s, seed %d)", len(out), counts, seed)
    return out


def _make_site(site: str, counts: Mapping[str, int], slices: int, size: int,
               seed: int) -> SiteSplits:
    rng = np.random.default_rng([seed, _stable_hash(site)])
    style, index, splits = site_style(site), 0, {}
    for split in SPLITS:
        splits[split] = []
        for _ in range(counts.get(split, 0)):
            splits[split].append(make_synthetic_case(rng, f"Case{index:02d}", style, slices, size))
            index += 1
    return splits
