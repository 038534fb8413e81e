"""Batch-at-once loading equals collating the items one by one."""

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, default_collate

from iopfl_lightning.data.batching import BatchedSlices, collate_batch
from iopfl_lightning.data.cases import make_case
from iopfl_lightning.data.dataset import SiteDataset, build_transform


def _cases(seed: int, sizes=((5, 12, 12), (3, 12, 12), (4, 10, 14))):
    rng = np.random.default_rng(seed)
    cases = []
    for i, (n, h, w) in enumerate(sizes):
        image = rng.random((n, h, w, 3), dtype=np.float32) * (i + 1)
        mask = (rng.random((n, h, w)) > 0.6).astype(np.uint8)
        cases.append(make_case(f"Case{i:02d}", image, mask, 2, "img", "mask"))
    return cases


def _one_by_one(dataset, indices):
    return default_collate([dataset[int(i)] for i in indices])


def _assert_same(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("normalize", ["none", "zscore"])
def test_batch_equals_items_across_cases_in_any_order(normalize):
    ds = SiteDataset(_cases(0), client=3, image_size=16, normalize=normalize)
    indices = [7, 0, 11, 4, 5, 2, 9]  # three cases, shuffled, one resized from a 10x14 case
    got = ds.get_batch(indices)
    assert got["image"].shape == (7, 3, 16, 16) and got["image"].is_contiguous()
    _assert_same(got, _one_by_one(ds, indices), atol=1e-6 if normalize == "zscore" else 0.0)
    assert got["client"].tolist() == [3] * 7


def test_unlabelled_batch_has_no_mask():
    ds = SiteDataset(_cases(1), client=0, image_size=12, labels=False)
    assert "mask" not in ds.get_batch([0, 1])


def test_transform_falls_back_to_items():
    flip = build_transform({"__class_fullname__": "HorizontalFlip", "p": 1.0})
    ds = SiteDataset(_cases(2), client=0, transform=flip, image_size=12)
    _assert_same(ds.get_batch([1, 6, 3]), _one_by_one(ds, [1, 6, 3]))


def test_concat_batches_mixing_clients_keep_sample_order():
    a = SiteDataset(_cases(3), client=0, image_size=12)
    b = SiteDataset(_cases(4), client=1, image_size=12)
    wrapped = BatchedSlices(ConcatDataset([a, b]))
    indices = [13, 2, 20, 0, 12]  # pooled batch: clients 1, 0, 1, 0, 1
    got = wrapped.__getitems__(indices)
    _assert_same(got, _one_by_one(ConcatDataset([a, b]), indices))
    assert got["client"].tolist() == [1, 0, 1, 0, 1]


def test_loader_yields_the_same_batches_as_a_plain_loader():
    ds = SiteDataset(_cases(5), client=2, image_size=12, normalize="zscore")
    plain = list(DataLoader(ds, batch_size=4))
    batched = list(DataLoader(BatchedSlices(ds), batch_size=4, collate_fn=collate_batch))
    assert len(plain) == len(batched) == 3
    for got, want in zip(batched, plain, strict=True):
        _assert_same(got, want, atol=1e-6)


def test_refuses_other_datasets():
    with pytest.raises(TypeError, match="SiteDataset"):
        BatchedSlices(ConcatDataset([torch.utils.data.TensorDataset(torch.zeros(2))]))


def test_augmentation_is_a_function_of_torchs_random_state():
    """albumentations' own generator is reseeded from torch's for every slice: seed_everything
    repeats a run's augmentations, and loader workers (seeded apart by the DataLoader, anew
    every epoch) do not copy each other's."""
    spec = [{"__class_fullname__": "HorizontalFlip", "p": 0.5},
            {"__class_fullname__": "RandomRotate90", "p": 1.0}]
    ds = SiteDataset(_cases(7, sizes=((8, 12, 12),)), client=0, transform=build_transform(spec))

    def augmented(seed):
        torch.manual_seed(seed)
        return torch.stack([ds[i]["image"] for i in range(len(ds))])

    assert torch.equal(augmented(0), augmented(0))
    assert not torch.equal(augmented(0), augmented(1))


def test_resized_masks_stay_on_the_images_pixel_grid():
    """A centred square resized 64 -> 21 px: the mask's centroid is the image's (nearest-exact
    samples pixel centres like the bilinear image; plain nearest shifted it half a pixel)."""
    square = np.zeros((1, 64, 64), np.uint8)
    square[0, 20:44, 20:44] = 1
    image = np.repeat(square[..., None].astype(np.float32), 3, axis=-1)
    ds = SiteDataset([make_case("C", image, square, 2, "img", "mask")], client=0, image_size=21)
    item = ds[0]
    grid = torch.arange(21, dtype=torch.float32)

    def centroid(weights):
        return float((weights.sum(1) * grid).sum() / weights.sum())

    assert centroid(item["mask"].float()) == pytest.approx(centroid(item["image"][0]), abs=0.05)
