"""Synthetic multi-site generator: determinism, shapes, and real differences between sites."""

import numpy as np

from iopfl_lightning.data import SITE_STYLES, make_synthetic_sites, site_style
from iopfl_lightning.data.synthetic import SiteStyle, make_synthetic_case

SMALL = {"cases_per_split": {"train": 3, "val": 1, "test": 1}, "slices": 6, "size": 32}


def _arrays(sites):
    return [(c.image, c.mask) for s in sites.values() for cs in s.values() for c in cs]


def test_same_seed_identical_other_seed_different():
    a, b = make_synthetic_sites(seed=3, **SMALL), make_synthetic_sites(seed=3, **SMALL)
    for (ia, ma), (ib, mb) in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    c = make_synthetic_sites(seed=4, **SMALL)
    assert not np.array_equal(a["HK"]["train"][0].image, c["HK"]["train"][0].image)


def test_site_data_independent_of_other_sites():
    alone = make_synthetic_sites(sites=("UCL",), **SMALL)["UCL"]["test"][0]
    together = make_synthetic_sites(**SMALL)["UCL"]["test"][0]
    np.testing.assert_array_equal(alone.image, together.image)


def test_sites_generated_in_threads_equal_one_site_at_a_time():
    """Sites are generated concurrently; each must still get exactly its own stream."""
    sites = ("UCL", "HK", "BIDMC", "ISBI")
    together = make_synthetic_sites(sites=sites, seed=5, **SMALL)
    assert list(together) == list(sites)
    for site in sites:
        alone = make_synthetic_sites(sites=(site,), seed=5, **SMALL)[site]
        for split, cases in alone.items():
            for a, b in zip(cases, together[site][split], strict=True):
                assert a.name == b.name
                np.testing.assert_array_equal(a.image, b.image)
                np.testing.assert_array_equal(a.mask, b.mask)


def test_shapes_dtypes_ranges_and_names():
    sites = make_synthetic_sites(**SMALL)
    assert list(sites) == ["BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL"]
    splits = sites["BIDMC"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "val": 1, "test": 1}
    names = [c.name for cs in splits.values() for c in cs]
    assert names == [f"Case{i:02d}" for i in range(5)]  # unique across splits
    case = splits["train"][0]
    assert case.image.shape == (6, 32, 32, 3) and case.image.dtype == np.float32
    assert case.mask.shape == (6, 32, 32) and set(np.unique(case.mask)) <= {0, 1}
    assert 0 <= case.image.min() and case.image.max() <= 1
    assert case.mask.any()


def test_channels_are_adjacent_slices():
    case = make_synthetic_sites(sites=("HK",), **SMALL)["HK"]["train"][0]
    np.testing.assert_array_equal(case.image[:-1, ..., 2], case.image[1:, ..., 1])
    np.testing.assert_array_equal(case.image[1:, ..., 0], case.image[:-1, ..., 1])


def test_organ_varies_over_slices_and_between_cases():
    cases = make_synthetic_sites(sites=("ISBI",), **SMALL)["ISBI"]["train"]
    areas = cases[0].mask.sum(axis=(1, 2))
    assert areas.max() > areas.min()
    assert not np.array_equal(cases[0].mask, cases[1].mask)


def test_sites_differ_in_intensity_statistics():
    sites = make_synthetic_sites(**SMALL)
    stats = {}
    for site, splits in sites.items():
        pixels = np.concatenate([c.image[..., 1].ravel() for c in splits["train"]])
        stats[site] = (pixels.mean(), pixels.std())
    means = sorted(m for m, _ in stats.values())
    stds = sorted(s for _, s in stats.values())
    assert means[-1] - means[0] > 0.2
    assert stds[-1] / stds[0] > 1.5
    # inversion: ISBI's organ is darker than its surroundings, HK's brighter
    for site, sign in (("ISBI", -1), ("HK", 1)):
        case = sites[site]["train"][0]
        inside = case.image[..., 1][case.mask == 1].mean()
        ring = case.image[..., 1][
            (case.mask == 0) & (np.abs(case.image[..., 1] - 0.5) < 0.5)
        ].mean()
        assert sign * (inside - ring) > 0


def test_annotation_style_dilates_or_erodes_the_same_organ():
    def case(scale):
        rng = np.random.default_rng(7)
        return make_synthetic_case(rng, "c", SiteStyle(mask_scale=scale), slices=4, size=48)

    base, wide, tight = case(1.0), case(1.3), case(0.75)
    np.testing.assert_array_equal(base.image, wide.image)  # same scan, other annotator
    assert (wide.mask >= base.mask).all() and (tight.mask <= base.mask).all()
    assert wide.mask.sum() > 1.4 * base.mask.sum() and tight.mask.sum() < 0.7 * base.mask.sum()


def test_default_sites_have_distinct_annotation_styles():
    scales = {s.mask_scale for s in SITE_STYLES.values()}
    assert min(scales) <= 0.8 and max(scales) >= 1.25 and len(scales) >= 4


def test_unknown_site_names_get_a_stable_style():
    assert site_style("Hospital7") == site_style("Hospital7")
    assert site_style("Hospital7") != site_style("Hospital8")
