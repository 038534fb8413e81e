"""IOP-FL preprocessed .npy format: round trip and bad-data errors."""

import numpy as np
import pytest

from iopfl_lightning.data import DataError, read_iopfl_npy, write_iopfl_npy


def test_round_trip_is_identical(tmp_path, tiny_sites):
    write_iopfl_npy(tiny_sites, tmp_path)
    for site, splits in tiny_sites.items():
        back = read_iopfl_npy(tmp_path, site)
        assert list(back) == ["train", "val", "test"]
        for split, cases in splits.items():
            assert [c.name for c in back[split]] == [c.name for c in cases]
            for orig, read in zip(cases, back[split], strict=True):
                np.testing.assert_array_equal(read.image, orig.image)
                np.testing.assert_array_equal(read.mask, orig.mask)
                assert isinstance(read.image, np.memmap)  # opened with mmap_mode="r"
                assert read.image.dtype == np.float32


def test_split_lines_with_or_without_suffix(tmp_path, tiny_sites):
    write_iopfl_npy(tiny_sites, tmp_path)
    (tmp_path / "HK_train.txt").write_text("# comment\nCase00\n\nCase01.npy\n")
    assert [c.name for c in read_iopfl_npy(tmp_path, "HK")["train"]] == ["Case00", "Case01"]


def test_case_listed_twice(tmp_path, tiny_sites):
    write_iopfl_npy(tiny_sites, tmp_path)
    (tmp_path / "HK_train.txt").write_text("Case00.npy\nCase00\n")
    with pytest.raises(DataError, match=r"HK_train\.txt: case 'Case00' listed twice"):
        read_iopfl_npy(tmp_path, "HK")


def test_case_in_two_split_lists_is_refused_naming_both(tmp_path, tiny_sites):
    write_iopfl_npy(tiny_sites, tmp_path)
    train = (tmp_path / "HK_train.txt").read_text().split()
    with (tmp_path / "HK_test.txt").open("a") as test_list:
        test_list.write(f"\n{train[0]}\n")
    with pytest.raises(DataError, match=rf"case '{train[0].removesuffix('.npy')}' of site 'HK' "
                                        r"is listed in both .*HK_train\.txt and .*HK_test\.txt"):
        read_iopfl_npy(tmp_path, "HK")


def test_missing_split_file_named(tmp_path, tiny_sites):
    write_iopfl_npy(tiny_sites, tmp_path)
    (tmp_path / "HK_val.txt").unlink()
    with pytest.raises(DataError, match=r"missing split file: .*HK_val\.txt"):
        read_iopfl_npy(tmp_path, "HK")


def test_missing_site_folder_named(tmp_path):
    with pytest.raises(DataError, match=r"missing site folder of 'UCL': .*UCL"):
        read_iopfl_npy(tmp_path, "UCL")


def test_missing_case_file_named(tmp_path, tiny_sites):
    write_iopfl_npy(tiny_sites, tmp_path)
    (tmp_path / "HK" / "Case01_segmentation.npy").unlink()
    with pytest.raises(DataError, match=r"missing case file: .*Case01_segmentation\.npy"):
        read_iopfl_npy(tmp_path, "HK")


def _write_case(root, image, mask, site="X"):
    (root / site).mkdir(parents=True, exist_ok=True)
    np.save(root / site / "Case00.npy", image)
    np.save(root / site / "Case00_segmentation.npy", mask)
    for split in ("train", "val", "test"):
        (root / f"{site}_{split}.txt").write_text("Case00.npy\n" if split == "train" else "")


def test_shape_mismatch_names_both_files(tmp_path):
    _write_case(tmp_path, np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 6), np.uint8))
    with pytest.raises(
        DataError,
        match=r"Case00\.npy has shape \(2, 8, 8, 3\).*Case00_segmentation\.npy has shape \(2, 8, 6\)",
    ):
        read_iopfl_npy(tmp_path, "X")


def test_nan_named(tmp_path):
    image = np.zeros((2, 8, 8, 3), np.float32)
    image[1, 0, 0, 0] = np.nan
    _write_case(tmp_path, image, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"Case00\.npy: NaN or inf"):
        read_iopfl_npy(tmp_path, "X")


def test_bad_label_named(tmp_path):
    mask = np.zeros((2, 8, 8), np.uint8)
    mask[0, 0, 0] = 255
    _write_case(tmp_path, np.zeros((2, 8, 8, 3), np.float32), mask)
    with pytest.raises(DataError, match=r"Case00_segmentation\.npy: mask label 255"):
        read_iopfl_npy(tmp_path, "X")


def test_float_masks_as_stored_by_reference_accepted(tmp_path):
    _write_case(tmp_path, np.zeros((2, 8, 8, 3), np.float32), np.ones((2, 8, 8), np.float32))
    mask = read_iopfl_npy(tmp_path, "X")["train"][0].mask
    assert np.issubdtype(mask.dtype, np.integer) and mask.max() == 1


def test_empty_site(tmp_path):
    (tmp_path / "X").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / f"X_{split}.txt").write_text("")
    with pytest.raises(DataError, match="site 'X' has no samples"):
        read_iopfl_npy(tmp_path, "X")


def test_duplicate_names_refused_on_write(tmp_path, tiny_sites):
    splits = tiny_sites["HK"]
    bad = {"HK": {"train": splits["train"], "val": splits["train"][:1], "test": []}}
    with pytest.raises(DataError, match="case name 'Case00' used twice"):
        write_iopfl_npy(bad, tmp_path)
