"""Shared validation of image/mask pairs (make_case)."""

import numpy as np
import pytest

from iopfl_lightning.data import DataError, make_case


def _pair(n=2, h=4, w=5, c=3):
    return np.zeros((n, h, w, c), np.float32), np.zeros((n, h, w), np.uint8)


def test_valid_pair_keeps_arrays():
    image, mask = _pair()
    case = make_case("c", image, mask, 2, "img", "msk")
    assert case.image is image and case.mask is mask and case.num_slices == 2


def test_shape_mismatch_names_both_files_and_shapes():
    image, _ = _pair()
    with pytest.raises(
        DataError, match=r"a\.npy has shape \(2, 4, 5, 3\).*b\.npy has shape \(2, 4, 4\)"
    ):
        make_case("c", image, np.zeros((2, 4, 4), np.uint8), 2, "a.npy", "b.npy")


def test_image_must_be_4d():
    with pytest.raises(DataError, match=r"a\.npy: image must be \[N, H, W, C\]"):
        make_case("c", np.zeros((2, 4, 5), np.float32), np.zeros((2, 4, 5)), 2, "a.npy", "b.npy")


def test_nan_pixels_rejected():
    image, mask = _pair()
    image[1, 2, 3, 0] = np.nan
    with pytest.raises(DataError, match=r"a\.npy: NaN or inf.*slice 1"):
        make_case("c", image, mask, 2, "a.npy", "b.npy")


def test_inf_pixels_rejected():
    image, mask = _pair()
    image[0, 0, 0, 2] = np.inf
    with pytest.raises(DataError, match="NaN or inf"):
        make_case("c", image, mask, 2, "a.npy", "b.npy")


def test_label_outside_classes_names_file_and_value():
    image, mask = _pair()
    mask[0, 1, 1] = 3
    with pytest.raises(
        DataError, match=r"b\.npy: mask label 3 outside the declared classes \[0, 2\)"
    ):
        make_case("c", image, mask, 2, "a.npy", "b.npy")


def test_negative_label_rejected():
    image, _ = _pair()
    mask = np.zeros((2, 4, 5), np.int64)
    mask[1, 0, 0] = -1
    with pytest.raises(DataError, match="mask label -1"):
        make_case("c", image, mask, 2, "a.npy", "b.npy")


def test_float_mask_with_whole_numbers_becomes_integer():
    image, _ = _pair()
    mask = np.ones((2, 4, 5, 1), np.float64)  # trailing singleton axis is squeezed
    case = make_case("c", image, mask, 2, "a.npy", "b.npy")
    assert case.mask.shape == (2, 4, 5) and np.issubdtype(case.mask.dtype, np.integer)


def test_fractional_mask_rejected():
    image, _ = _pair()
    mask = np.full((2, 4, 5), 0.5)
    with pytest.raises(DataError, match=r"b\.npy: mask value 0\.5 is not an integer label"):
        make_case("c", image, mask, 2, "a.npy", "b.npy")


def test_float64_image_converted_to_float32():
    _, mask = _pair()
    case = make_case("c", np.zeros((2, 4, 5, 3)), mask, 2, "a", "b")
    assert case.image.dtype == np.float32
