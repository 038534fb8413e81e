"""Per-site PNG slices: generated fixtures and the real six-site sample."""

import logging

import numpy as np
import pytest

from iopfl_lightning.data import DataError, carve_val, read_png_slices

from .conftest import write_png

SIZE = 8


def _slice_image(case: int, s: int) -> np.ndarray:
    """Constant image whose value encodes (case, slice)."""
    return np.full((SIZE, SIZE), 10 * case + s, np.uint8)


def _mask(fg_value=0, bg_value=255) -> np.ndarray:
    mask = np.full((SIZE, SIZE), bg_value, np.uint8)
    mask[2:5, 3:6] = fg_value
    return mask


def make_site(root, site="S", cases=None, test_cases=None):
    """Write ``{case: n_slices}`` train cases and test cases in the PNG layout (inverted masks)."""
    cases = cases if cases is not None else {0: 4, 1: 3}
    test_cases = test_cases if test_cases is not None else {2: 2}
    for split, spec in (("train", cases), ("test", test_cases)):
        for case, n in spec.items():
            for s in range(n):
                name = f"{case:02d}_{s:02d}.png"
                write_png(root / site / split / "image" / name, _slice_image(case, s))
                write_png(root / site / split / "mask" / name, _mask())
    return root


def test_cases_grouped_with_adjacent_channels(tmp_path):
    out = read_png_slices(make_site(tmp_path), "S", val_fraction=0.2)
    assert [c.name for c in out["train"]] == ["00"]
    assert [c.name for c in out["val"]] == ["01"]  # last train case by name becomes val
    assert [c.name for c in out["test"]] == ["02"]
    case = out["train"][0]
    assert case.image.shape == (4, SIZE, SIZE, 3) and case.image.dtype == np.float32
    values = np.rint(case.image[:, 0, 0, :] * 255).astype(int)
    # channels (i-1, i, i+1), clamped at both ends of the case
    np.testing.assert_array_equal(values, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])


def test_images_scaled_to_unit_range(tmp_path):
    root = tmp_path
    write_png(root / "S/train/image/00_00.png", np.full((SIZE, SIZE), 255, np.uint8))
    write_png(root / "S/train/mask/00_00.png", _mask())
    write_png(root / "S/test/image/01_00.png", np.zeros((SIZE, SIZE), np.uint8))
    write_png(root / "S/test/mask/01_00.png", _mask())
    out = read_png_slices(root, "S")
    assert out["train"][0].image.max() == 1.0 and out["test"][0].image.max() == 0.0


def test_16_bit_slices_are_scaled_by_their_depth_and_32_bit_ones_refused(tmp_path):
    """A 16-bit export of an 8-bit slice reads as the same image (an 8-bit conversion would
    clip it at 255: nearly all white); a 16-bit mask is compared with the declared values."""
    from PIL import Image

    make_site(tmp_path / "8")
    make_site(tmp_path / "16")
    for path in (tmp_path / "16/S").glob("*/image/*.png"):
        pixels = np.asarray(Image.open(path)).astype(np.uint16) * 257  # 8 -> 16 bit, exact
        Image.fromarray(pixels).save(path)
        assert Image.open(path).mode == "I;16"
    eight, sixteen = read_png_slices(tmp_path / "8", "S"), read_png_slices(tmp_path / "16", "S")
    for split in eight:
        for a, b in zip(eight[split], sixteen[split], strict=True):
            np.testing.assert_allclose(b.image, a.image, rtol=1e-6, atol=0)
            np.testing.assert_array_equal(b.mask, a.mask)
    mask = tmp_path / "16/S/train/mask/00_00.png"
    Image.fromarray(_mask().astype(np.uint16) * 257).save(mask)
    with pytest.raises(DataError, match=r"00_00\.png: mask value 65535 is not one of"):
        read_png_slices(tmp_path / "16", "S")
    image = tmp_path / "8/S/train/image/00_00.png"
    # Pillow writes no 32-bit PNG; older versions open 16-bit ones as mode I, so a TIFF stands in
    Image.fromarray(np.zeros((SIZE, SIZE), np.int32)).save(image, format="TIFF")
    with pytest.raises(DataError, match=r"00_00\.png: 32-bit PNG mode 'I' is not supported"):
        read_png_slices(tmp_path / "8", "S")


def test_inverted_masks_map_low_value_to_foreground(tmp_path):
    case = read_png_slices(make_site(tmp_path), "S")["train"][0]
    assert set(np.unique(case.mask)) == {0, 1}
    assert case.mask[0, 2:5, 3:6].all() and case.mask[0].sum() == 9


def test_not_inverted_masks(tmp_path):
    case = read_png_slices(make_site(tmp_path), "S", mask_inverted=False)["train"][0]
    assert case.mask[0].sum() == SIZE * SIZE - 9


def test_unexpected_mask_value_names_file_and_value(tmp_path):
    make_site(tmp_path)
    bad = _mask()
    bad[0, 0] = 7
    write_png(tmp_path / "S/train/mask/01_01.png", bad)
    with pytest.raises(
        DataError, match=r"S/train/mask/01_01\.png: mask value 7 is not one of \(0, 255\)"
    ):
        read_png_slices(tmp_path, "S")


def test_name_pairing_lists_unpaired_files(tmp_path):
    make_site(tmp_path)
    (tmp_path / "S/train/mask/01_02.png").rename(tmp_path / "S/train/mask/01_09.png")
    with pytest.raises(DataError, match=r"unpaired files.*image/01_02\.png.*mask/01_09\.png"):
        read_png_slices(tmp_path, "S", pairing="name")


def test_order_pairing_warns_for_each_renamed_pair(tmp_path, caplog):
    make_site(tmp_path)
    (tmp_path / "S/train/mask/01_02.png").rename(tmp_path / "S/train/mask/01_09.png")
    with caplog.at_level(logging.WARNING):
        out = read_png_slices(tmp_path, "S", pairing="order")
    assert out["val"][0].num_slices == 3
    warned = [r.getMessage() for r in caplog.records if "pairing by order" in r.getMessage()]
    assert len(warned) == 1 and "01_02.png" in warned[0] and "01_09.png" in warned[0]


def test_order_pairing_needs_equal_counts(tmp_path):
    make_site(tmp_path)
    (tmp_path / "S/train/mask/01_02.png").unlink()
    with pytest.raises(DataError, match=r"as many masks as images: 7 in .*image, 6 in .*mask"):
        read_png_slices(tmp_path, "S", pairing="order")


def test_image_mask_shape_mismatch_names_both(tmp_path):
    make_site(tmp_path)
    write_png(tmp_path / "S/test/mask/02_01.png", np.full((SIZE, SIZE + 2), 255, np.uint8))
    with pytest.raises(
        DataError, match=r"image/02_01\.png has shape \(8, 8\).*mask/02_01\.png has shape \(8, 10\)"
    ):
        read_png_slices(tmp_path, "S")


def test_bad_file_name(tmp_path):
    make_site(tmp_path)
    write_png(tmp_path / "S/test/image/slice.png", _slice_image(0, 0))
    with pytest.raises(DataError, match=r"slice\.png: file name does not follow CC_SS\.png"):
        read_png_slices(tmp_path, "S")


def test_missing_site_and_split_folders(tmp_path):
    with pytest.raises(DataError, match=r"missing site folder of 'S'"):
        read_png_slices(tmp_path, "S")
    make_site(tmp_path, test_cases={})
    with pytest.raises(DataError, match=r"missing folder: .*S/test/image"):
        read_png_slices(tmp_path, "S")


def test_empty_site(tmp_path):
    for split in ("train", "test"):
        for kind in ("image", "mask"):
            (tmp_path / "S" / split / kind).mkdir(parents=True)
    with pytest.raises(DataError, match="site 'S' has no samples"):
        read_png_slices(tmp_path, "S")


def test_iopfl_names_fall_back_to_hospital_folders(tmp_path):
    make_site(tmp_path, site="RUNMC")
    assert read_png_slices(tmp_path, "ISBI")["test"][0].name == "02"


def test_single_train_case_is_also_val(tmp_path, caplog):
    make_site(tmp_path, cases={5: 2})
    with caplog.at_level(logging.WARNING):
        out = read_png_slices(tmp_path, "S")
    assert out["train"][0] is out["val"][0]
    assert "one train case (05)" in caplog.text


def test_carve_val_rule():
    cases = [type("C", (), {"name": n})() for n in ["c", "a", "e", "b", "d"]]
    train, val = carve_val(cases, 0.4, "S")
    assert [c.name for c in train] == ["a", "b", "c"] and [c.name for c in val] == ["d", "e"]
    train, val = carve_val(cases, 0.0, "S")
    assert len(train) == 5 and val == []


# ---- the real six-site sample -------------------------------------------------------------

SITES = ("BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL")


@pytest.mark.parametrize("site", SITES)
def test_real_sample_loads_with_order_pairing(real_sample, site):
    out = read_png_slices(real_sample, site, pairing="order")
    for split in ("train", "val", "test"):
        (case,) = out[split]
        assert case.image.shape == (3, 384, 384, 3) and case.image.dtype == np.float32
        assert 0 <= case.image.min() and case.image.max() <= 1
        assert set(np.unique(case.mask)) <= {0, 1}
        # inverted masks: the prostate is a small part of the slice
        assert 0 < case.mask.mean() < 0.2


def test_real_sample_name_pairing_fails_on_i2cvb(real_sample):
    with pytest.raises(
        DataError,
        match=r"unpaired files.*I2CVB/train/image/00_03\.png.*I2CVB/train/mask/00_00\.png",
    ):
        read_png_slices(real_sample, "I2CVB", pairing="name")


def test_real_sample_order_pairing_warns_about_i2cvb(real_sample, caplog):
    with caplog.at_level(logging.WARNING):
        read_png_slices(real_sample, "I2CVB", pairing="order")
    assert sum("pairing by order" in r.getMessage() for r in caplog.records) == 3
