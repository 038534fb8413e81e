"""MultiSiteDataModule: batches, loaders, rounds, argument errors, and a real Trainer run."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from iopfl_lightning.data import DataError, MultiSiteDataModule, write_iopfl_npy

from .test_fundus import make_domain

TINY = {"size": 16, "slices": 4, "cases_per_split": {"train": 2, "val": 1, "test": 1}}


def tiny_dm(**kwargs) -> MultiSiteDataModule:
    kwargs.setdefault("synthetic", TINY)
    return MultiSiteDataModule(**kwargs)


def test_sites_and_counts():
    dm = tiny_dm(sites=["HK", "UCL", "ISBI"], outside=["UCL"])
    assert dm.inside_sites == ["HK", "ISBI"] and dm.outside_sites == ["UCL"]
    assert dm.eval_sites == ["HK", "ISBI", "UCL"]
    assert dm.num_classes == 2 and dm.in_channels == 3
    assert dm.client_sample_counts() == [8, 8]
    assert MultiSiteDataModule().inside_sites == ["BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL"]


def test_train_batches_keys_dtypes_shapes_and_client_order():
    dm = tiny_dm(sites=["HK", "UCL", "ISBI"], outside=["UCL"], batch_size=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 2 * 3
    batch = batches[0]
    assert set(batch) == {"image", "mask", "client", "case", "slice"}
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (3, 3, 16, 16)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (3, 16, 16)
    for key in ("client", "case", "slice"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (3,)
    clients = [b["client"].unique().tolist() for b in batches]
    assert clients == [[0]] * 3 + [[1]] * 3  # one client per batch, contiguous
    # (case, slice) tags point at the right data
    case = dm.site_data["HK"]["train"][int(batch["case"][0])]
    np.testing.assert_array_equal(
        batch["image"][0].numpy(), case.image[int(batch["slice"][0])].transpose(2, 0, 1)
    )


def test_eval_loaders():
    dm = tiny_dm(sites=["HK", "UCL", "ISBI"], outside=["UCL"], batch_size=3, eval_batch_size=2)
    val, test = dm.val_dataloader(), dm.test_dataloader()
    assert len(val) == 2 and len(test) == 3 and len(dm.predict_dataloader()) == 3
    for index, loader in enumerate(test):
        tags = torch.cat([b["client"] for b in loader])
        assert (tags == index).all() and len(tags) == 4
        assert next(iter(loader))["image"].shape[0] == 2
    # no shuffling: slices come in stored order
    slices = torch.cat([b["slice"] for b in val[0]]).tolist()
    assert slices == [0, 1, 2, 3]


def test_outside_loader_has_no_labels_by_default():
    dm = tiny_dm(sites=["HK", "UCL"], outside=["UCL"])
    batch = next(iter(dm.outside_dataloader()))
    assert "mask" not in batch and batch["image"].shape[1:] == (3, 16, 16)
    assert "mask" in next(iter(dm.outside_dataloader(labels=True)))
    with pytest.raises(ValueError, match=r"'HK' is not an outside site"):
        dm.outside_dataloader(site="HK")


def test_configure_rounds():
    dm = tiny_dm(sites=["BIDMC", "HK", "ISBI"], batch_size=4)
    dm.configure_rounds(lambda epoch: [2] if epoch == 0 else [0, 1], local_epochs=2)
    loader = dm.train_dataloader()
    assert len(loader) == 4 and {int(b["client"][0]) for b in loader} == {2}
    loader.batch_sampler.sampler.set_epoch(1)
    assert len(loader) == 8 and [int(b["client"][0]) for b in loader] == [0] * 4 + [1] * 4


def test_setup_is_idempotent():
    dm = tiny_dm(sites=["HK"])
    dm.setup("fit")
    data = dm.site_data
    dm.setup("test")
    assert dm.site_data is data


def test_resize_normalize_and_transform():
    dm = tiny_dm(
        sites=["HK"],
        image_size=8,
        normalize="zscore",
        train_transform=[{"__class_fullname__": "HorizontalFlip", "p": 1.0}],
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[-2:] == (8, 8) and batch["mask"].shape[-2:] == (8, 8)
    assert torch.allclose(batch["image"].mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5)
    flipped = tiny_dm(
        sites=["HK"], train_transform={"__class_fullname__": "HorizontalFlip", "p": 1.0}
    )
    plain = tiny_dm(sites=["HK"])
    a, b = flipped.dataset("HK", "train")[0], plain.dataset("HK", "train")[0]
    assert torch.equal(a["image"], b["image"].flip(-1)) and torch.equal(
        a["mask"], b["mask"].flip(-1)
    )


def test_npy_png_and_fundus_formats(tmp_path, tiny_sites, real_sample):
    write_iopfl_npy(tiny_sites, tmp_path / "npy")
    dm = MultiSiteDataModule("iopfl_npy", str(tmp_path / "npy"), sites=["BIDMC", "HK"])
    assert dm.client_sample_counts() == [8, 8]
    make_domain(tmp_path / "fundus", "Domain1")
    make_domain(tmp_path / "fundus", "Domain4")
    dm = MultiSiteDataModule(
        "fundus", str(tmp_path / "fundus"), sites=["Domain1", "Domain4"], image_size=12
    )
    batch = next(iter(dm.train_dataloader()))
    assert dm.num_classes == 3 and batch["image"].shape == (2, 3, 12, 12)
    dm = MultiSiteDataModule("png_slices", str(real_sample), outside=["UCL"], pairing="order")
    assert dm.eval_sites == ["BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL"]
    assert dm.client_sample_counts() == [3] * 5 and len(dm.test_dataloader()) == 6
    with pytest.raises(DataError, match="I2CVB"):
        MultiSiteDataModule("png_slices", str(real_sample), pairing="name").setup()
    # ISBI reads the RUNMC folder: listing both would load one hospital as two sites
    with pytest.raises(ValueError, match=r"sites: \['ISBI', 'RUNMC'\] all read folder .*RUNMC"):
        MultiSiteDataModule("png_slices", str(real_sample), sites=["ISBI", "RUNMC", "HK"],
                            outside=["RUNMC"], pairing="order")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sites": ["HK", "Mars"]}, r"sites: unknown site\(s\) \['Mars'\]; valid sites: \['BIDMC'"),
        ({"sites": ["HK", "UCL", "HK"]}, r"sites: site\(s\) \['HK'\] listed more than once"),
        (
            {"sites": ["HK", "UCL"], "outside": ["ISBI"]},
            r"outside: site\(s\) \['ISBI'\] are not among sites",
        ),
        ({"sites": ["HK"], "outside": ["HK"]}, "leaves no training site"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"eval_batch_size": -1}, "eval_batch_size must be positive, got -1"),
        ({"format": "dicom"}, r"format must be one of .*got 'dicom'"),
        ({"format": "iopfl_npy"}, r"root is required for format='iopfl_npy'"),
        (
            {"format": "png_slices", "root": "/no/such/dir"},
            r"root '/no/such/dir' .* is not a folder",
        ),
        ({"synthetic": {"sizes": 3}}, r"synthetic: unknown key\(s\) \['sizes'\]"),
        ({"pairing": "fuzzy"}, r"pairing must be one of .*'fuzzy'"),
        ({"image_size": 0}, "image_size must be positive"),
        ({"format": "fundus", "root": "/"}, r"sites=None: no fundus site folders under root '/'"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_dm(**kwargs)


def test_site_without_training_samples():
    dm = tiny_dm(
        sites=["HK"], synthetic={**TINY, "cases_per_split": {"train": 0, "val": 1, "test": 1}}
    )
    with pytest.raises(DataError, match="site 'HK' has no training samples"):
        dm.setup("fit")


class _Recorder(pl.LightningModule):
    """Records (epoch, client, first index) of every training batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        clients = batch["client"].unique().tolist()
        self.seen.append(
            (self.current_epoch, clients, batch["case"].tolist(), batch["slice"].tolist())
        )
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, tmp_path, reload: bool) -> _Recorder:
    model = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        reload_dataloaders_every_n_epochs=int(reload),
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    return model


def _expected(dm, epoch):
    """(case, slice) lists of the sampler's seeded plan for ``epoch``."""
    sizes = [0, *np.cumsum(dm.client_sample_counts())]
    out = []
    for client, batch in dm.train_batch_sampler().plan(epoch):
        dataset = dm.dataset(dm.inside_sites[client], "train")
        items = [dataset[i - sizes[client]] for i in batch]
        out.append(([int(x["case"]) for x in items], [int(x["slice"]) for x in items]))
    return out


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_trainer_reloads_for_varying_participation(tmp_path):
    dm = tiny_dm(sites=["BIDMC", "HK", "ISBI"], batch_size=3)
    dm.configure_rounds(lambda epoch: [0, 2] if epoch == 0 else [1])
    model = _fit(dm, tmp_path, reload=True)
    by_epoch = {e: [c for ep, cs, _, _ in model.seen if ep == e for c in cs] for e in (0, 1)}
    assert by_epoch == {0: [0, 0, 0, 2, 2, 2], 1: [1, 1, 1]}
    for epoch in (0, 1):
        assert [(c, s) for ep, _, c, s in model.seen if ep == epoch] == _expected(dm, epoch)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_lightning_calls_set_epoch_through_the_hook(tmp_path):
    dm = tiny_dm(sites=["BIDMC", "HK"], batch_size=3)
    model = _fit(dm, tmp_path, reload=False)
    assert _expected(dm, 0) != _expected(dm, 1)
    for epoch in (0, 1):
        assert [(c, s) for ep, _, c, s in model.seen if ep == epoch] == _expected(dm, epoch)


def test_outside_given_as_comma_string():
    dm = tiny_dm(sites=["HK", "UCL", "ISBI"], outside="UCL, ISBI")
    assert dm.outside_sites == ["UCL", "ISBI"] and dm.inside_sites == ["HK"]


def test_train_on_outside_serves_unlabelled_target_images():
    dm = tiny_dm(sites=["HK", "UCL", "ISBI"], outside=["UCL"], train_on="outside", batch_size=2)
    assert dm.test_sites == ["UCL"] and dm.val_dataloader() == []
    loader = dm.train_dataloader()
    batches = list(loader)
    assert all("mask" not in b for b in batches)
    assert all((b["client"] == 2).all() for b in batches)  # UCL's index in eval_sites
    keys = [(int(c), int(s)) for b in batches for c, s in zip(b["case"], b["slice"], strict=True)]
    assert sorted(keys) == [(0, s) for s in range(4)] and keys != sorted(keys)  # shuffled, complete
    (test,) = dm.test_dataloader()
    assert "mask" in next(iter(test)) and (next(iter(test))["client"] == 2).all()
    assert tiny_dm(sites=["HK", "UCL"], outside=["UCL"]).test_sites == ["HK", "UCL"]


def test_train_on_outside_needs_one_outside_site():
    with pytest.raises(ValueError, match=r"train_on='outside' needs exactly one outside site"):
        tiny_dm(sites=["HK", "UCL"], train_on="outside")


def test_an_outside_png_site_may_have_a_test_folder_only(tmp_path):
    """A held-out site never trains, so it needs no train folder; an inside site does."""
    import shutil

    from tests.data.test_png_slices import make_site

    for site in ("A", "B", "NEW"):
        make_site(tmp_path, site, cases={0: 4, 1: 3, 2: 2})
    shutil.rmtree(tmp_path / "NEW" / "train")
    dm = MultiSiteDataModule("png_slices", str(tmp_path), sites=["A", "B", "NEW"],
                             outside=["NEW"], batch_size=2)
    dm.setup()
    assert dm.test_sites == ["A", "B", "NEW"] and len(dm.test_dataloader()) == 3
    with pytest.raises(DataError, match=r"NEW/train"):
        MultiSiteDataModule("png_slices", str(tmp_path), sites=["A", "NEW"],
                            batch_size=2).setup()


def test_the_shuffled_outside_loader_is_seeded_per_epoch_whatever_the_workers():
    """Test-time routing's loader: each epoch's order comes from (seed, epoch), as the
    training batches' do; workers and the device cache do not move it."""
    def orders(**kwargs):
        dm = tiny_dm(sites=["BIDMC", "UCL"], outside=["UCL"], train_on="outside", batch_size=2,
                     seed=3, **kwargs)
        dm.setup("fit")
        loader, out = dm.train_dataloader(), []
        for epoch in range(3):
            loader.batch_sampler.set_epoch(epoch)  # what Lightning does every epoch
            out.append([(int(c), int(s)) for b in loader
                        for c, s in zip(b["case"], b["slice"], strict=True)])
        return out

    plain = orders()
    assert orders(num_workers=1) == plain == orders(device_cache=True)
    assert plain[0] != plain[1] and sorted(plain[0]) == sorted(plain[1])
    assert "mask" not in next(iter(tiny_dm(sites=["BIDMC", "UCL"], outside=["UCL"])
                                   .outside_dataloader(shuffle=True)))


def test_an_outside_sites_train_split_loads_untransformed():
    dm = tiny_dm(sites=["BIDMC", "UCL"], outside=["UCL"],
                 train_transform=[{"__class_fullname__": "HorizontalFlip", "p": 1.0}])
    batch = next(iter(dm.outside_dataloader(split="train")))
    plain = next(iter(tiny_dm(sites=["BIDMC", "UCL"], outside=["UCL"])
                      .outside_dataloader(split="train")))
    assert torch.equal(batch["image"], plain["image"]) and int(batch["client"][0]) == 1
