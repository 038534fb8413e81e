"""Device-resident data gives the same batches (and the same training) as the ordinary loaders."""

import numpy as np
import pytest
import torch

from iopfl_lightning.data.cases import make_case
from iopfl_lightning.data.dataset import SiteDataset, build_transform
from iopfl_lightning.data.device_cache import CachedSite, cache_bytes
from iopfl_lightning.federated import FederatedTrainer
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

FLIP = {"__class_fullname__": "HorizontalFlip", "p": 1.0}


def _cases(seed, sizes=((5, 12, 12), (3, 10, 14))):
    rng = np.random.default_rng(seed)
    return [make_case(f"Case{i}", rng.random((n, h, w, 3), dtype=np.float32) * (i + 2),
                      (rng.random((n, h, w)) > 0.5).astype(np.uint8), 2, "img", "mask")
            for i, (n, h, w) in enumerate(sizes)]


def _assert_equal_batches(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("labels", [True, False])
def test_cached_batches_equal_the_dataset_batches(labels, monkeypatch):
    monkeypatch.setattr("iopfl_lightning.data.device_cache.CHUNK", 3)  # fill in several chunks
    ds = SiteDataset(_cases(0), client=2, image_size=16, normalize="zscore", labels=labels)
    cached = CachedSite(ds, "cpu")
    assert len(cached) == len(ds) == 8
    assert cached.image.shape == (8, 3, 16, 16)
    assert cached.mask is None if not labels else cached.mask.dtype == torch.uint8
    for indices in ([0], [7, 2, 5, 0], list(range(8))):
        _assert_equal_batches(cached.get_batch(indices), ds.get_batch(indices))
    item = cached[6]
    assert item["image"].shape == (3, 16, 16) and int(item["client"]) == 2
    assert cache_bytes(ds, (3, 16, 16)) == 8 * (4 * 3 * 16 * 16 + (16 * 16 if labels else 0))


def test_cache_refuses_a_transform_and_wide_labels():
    ds = SiteDataset(_cases(1), client=0, transform=build_transform(FLIP))
    with pytest.raises(ValueError, match="site 'X' train has a train_transform"):
        CachedSite(ds, "cpu", name="site 'X' train")
    wide = [make_case("Wide", np.zeros((2, 4, 4, 3), np.float32),
                      np.full((2, 4, 4), 300, np.int64), 400, "img", "mask")]
    with pytest.raises(ValueError, match="mask labels above 255"):
        CachedSite(SiteDataset(wide, client=0), "cpu", name="wide")
    with pytest.raises(ValueError, match="device_cache=True cannot be combined"):
        tiny_datamodule(device_cache=True, train_transform=[FLIP])


def _all_batches(loaders):
    return [list(loader) for loader in loaders]


def test_datamodule_loaders_serve_the_same_batches_cached():
    plain = tiny_datamodule(batch_size=2, normalize="zscore", outside=["UCL"])
    cached = tiny_datamodule(batch_size=2, normalize="zscore", outside=["UCL"], device_cache=True,
                             num_workers=2)  # workers are ignored: batches are gathers
    for dm in (plain, cached):
        dm.configure_rounds(None)
    loaders = {
        "train": lambda dm: [dm.train_dataloader()],
        "val": lambda dm: dm.val_dataloader(),
        "test": lambda dm: dm.test_dataloader(),
        "outside": lambda dm: [dm.outside_dataloader(shuffle=True)],
    }
    for name, make in loaders.items():
        got, want = _all_batches(make(cached)), _all_batches(make(plain))
        assert [len(g) for g in got] == [len(w) for w in want] and got, name
        for got_loader, want_loader in zip(got, want, strict=True):
            for g, w in zip(got_loader, want_loader, strict=True):
                _assert_equal_batches(g, w)
    assert cached.train_dataloader().num_workers == 0
    assert "mask" not in next(iter(cached.outside_dataloader()))
    # each split is finished once and reused by later loaders
    count = len(cached._caches)
    cached.val_dataloader()
    cached.train_dataloader()
    assert len(cached._caches) == count


def test_pooled_batches_mixing_clients_are_gathered_in_order():
    plain, cached = tiny_datamodule(batch_size=5), tiny_datamodule(batch_size=5, device_cache=True)
    for dm in (plain, cached):
        dm.configure_rounds(None, pooled=True)
    for g, w in zip(cached.train_dataloader(), plain.train_dataloader(), strict=True):
        _assert_equal_batches(g, w)


def test_federated_training_is_identical_with_the_device_cache(tmp_path):
    states = []
    for cache in (False, True):
        fed = FederatedTrainer(alpha=0.3)
        trainer = tiny_trainer(2, [fed], tmp_path / str(cache))
        trainer.fit(tiny_module(), datamodule=tiny_datamodule(device_cache=cache))
        states.append((fed.global_state, fed.personalized))
    (g0, p0), (g1, p1) = states
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    for client in p0:
        for k in p0[client]:
            assert torch.equal(p0[client][k], p1[client][k]), (client, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cache_lives_on_the_gpu_and_batches_need_no_copy():
    ds = SiteDataset(_cases(2), client=0, image_size=16)
    cached = CachedSite(ds, "cuda")
    batch = cached.get_batch([4, 1])
    assert batch["image"].is_cuda and batch["mask"].is_cuda and not batch["client"].is_cuda
    want = ds.get_batch([4, 1])
    assert torch.equal(batch["image"].cpu(), want["image"])
    assert torch.equal(batch["mask"].cpu(), want["mask"])


def test_a_cache_that_does_not_fit_is_refused_with_the_sizes(monkeypatch):
    ds = SiteDataset(_cases(3), client=0, image_size=16)
    monkeypatch.setattr("iopfl_lightning.data.device_cache._free_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match=r"site 'HK' val needs 0.00 GiB on cpu but only"):
        CachedSite(ds, "cpu", name="site 'HK' val")
    monkeypatch.setattr("iopfl_lightning.data.device_cache._free_bytes", lambda device: None)
    assert len(CachedSite(ds, "cpu")) == len(ds)  # unknown free memory: no refusal
