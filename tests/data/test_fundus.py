"""Fundus disc/cup reader on generated fixtures in the BEAL/DoFE layout."""

import numpy as np
import pytest

from iopfl_lightning.data import DataError, read_fundus

from .conftest import write_png

SIZE = 20


def _mask_values() -> np.ndarray:
    """Grey mask: background 255, a disc-rim ring 128, a cup 0 in the middle."""
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    mask[4:16, 4:16] = 128
    mask[8:12, 8:12] = 0
    return mask


def make_domain(root, domain="Domain1", names=("a", "b", "c"), rgb_mask=True):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in names:
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            mask = _mask_values()
            if rgb_mask:
                mask = np.repeat(mask[..., None], 3, axis=-1)
            write_png(root / domain / split / "ROIs/image" / f"{name}.png", image)
            write_png(root / domain / split / "ROIs/mask" / f"{name}.png", mask)
    return root


@pytest.mark.parametrize("rgb_mask", [True, False])
def test_labels_background_rim_cup(tmp_path, rgb_mask):
    out = read_fundus(make_domain(tmp_path, rgb_mask=rgb_mask), "Domain1")
    assert [c.name for c in out["train"]] == ["a", "b"] and [c.name for c in out["val"]] == ["c"]
    case = out["test"][0]
    assert case.image.shape == (1, SIZE, SIZE, 3) and case.image.dtype == np.float32
    assert case.image.max() <= 1.0
    assert case.mask.shape == (1, SIZE, SIZE)
    assert case.mask[0, 0, 0] == 0 and case.mask[0, 5, 5] == 1 and case.mask[0, 10, 10] == 2
    assert (case.mask == 2).sum() == 16 and (case.mask == 1).sum() == 144 - 16


def test_resize(tmp_path):
    case = read_fundus(make_domain(tmp_path), "Domain1", size=10)["train"][0]
    assert case.image.shape == (1, 10, 10, 3) and case.mask.shape == (1, 10, 10)
    assert set(np.unique(case.mask)) == {0, 1, 2}  # nearest keeps labels exact


def test_unexpected_mask_value_names_file_and_value(tmp_path):
    make_domain(tmp_path, rgb_mask=False)
    bad = _mask_values()
    bad[0, 0] = 200
    write_png(tmp_path / "Domain1/test/ROIs/mask/b.png", bad)
    with pytest.raises(DataError, match=r"Domain1/test/ROIs/mask/b\.png: mask value 200"):
        read_fundus(tmp_path, "Domain1")
    out = read_fundus(tmp_path, "Domain1", snap=True)
    assert out["test"][1].mask[0, 0, 0] == 0  # 200 snaps to background


def test_unpaired_files_listed(tmp_path):
    make_domain(tmp_path)
    (tmp_path / "Domain1/train/ROIs/mask/b.png").unlink()
    with pytest.raises(DataError, match=r"unpaired fundus files: .*train/ROIs/image/b\.png"):
        read_fundus(tmp_path, "Domain1")


def test_shape_mismatch_names_both(tmp_path):
    make_domain(tmp_path, rgb_mask=False)
    write_png(tmp_path / "Domain1/train/ROIs/mask/a.png", np.full((SIZE, SIZE + 1), 255, np.uint8))
    with pytest.raises(
        DataError, match=r"image/a\.png has shape .*mask/a\.png has shape \(1, 20, 21\)"
    ):
        read_fundus(tmp_path, "Domain1")


def test_missing_domain_and_empty_domain(tmp_path):
    with pytest.raises(DataError, match=r"missing fundus domain folder of 'Domain3'"):
        read_fundus(tmp_path, "Domain3")
    for split in ("train", "test"):
        for kind in ("image", "mask"):
            (tmp_path / "Domain2" / split / "ROIs" / kind).mkdir(parents=True)
    with pytest.raises(DataError, match="domain 'Domain2' has no samples"):
        read_fundus(tmp_path, "Domain2")
