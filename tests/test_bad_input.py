"""Bad input, tried on purpose: one table, every row through a public entry point.

Each row builds one kind of bad input under ``tmp_path`` and calls a public entry point (the CLI
``main([...])``, ``MultiSiteDataModule``, ``read_routing_space``, ``RoutingModule``,
``FederatedTrainer``, a ``Trainer`` resuming a checkpoint). The error must be a clear one: its
message must contain the file, key or value at fault, and no checkpoint may have been written
(the error comes before training). The list is mirrored in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iopfl_lightning.checkpoint_io import AtomicCheckpointIO
from iopfl_lightning.cli import main
from iopfl_lightning.data import MultiSiteDataModule, make_synthetic_sites
from iopfl_lightning.data.npy import write_iopfl_npy
from iopfl_lightning.federated import FederatedTrainer, read_routing_space, write_routing_space
from iopfl_lightning.modules.routing import RoutingModule
from iopfl_lightning.modules.routing_experts import load_experts
from iopfl_lightning.nets import build_from_spec, net_spec
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "configs" / "demo_tiny.yaml"
SPEC = dict(net_spec("unet", in_channels=3, num_classes=2, features=4))


# ---------------------------------------------------------------- builders of good inputs


def npy_root(tmp: Path) -> Path:
    """Two valid sites in the IOP-FL .npy format (2 train, 1 val, 1 test case of 2 slices)."""
    root = tmp / "npy"
    if not root.exists():
        sites = make_synthetic_sites(
            sites=("BIDMC", "HK"), cases_per_split={"train": 2, "val": 1, "test": 1},
            slices=2, size=8,
        )
        write_iopfl_npy(sites, root)
    return root


def npy_dm(tmp: Path, **kwargs) -> Callable[[], object]:
    def load():
        dm = MultiSiteDataModule(format="iopfl_npy", root=str(npy_root(tmp)), **kwargs)
        dm.setup("fit")
        return dm
    return load


def png_root(tmp: Path) -> Path:
    """One valid PNG-slices site (HK): 2 train and 1 test case of 2 slices, 8x8."""
    root = tmp / "png"
    if not root.exists():
        rng = np.random.default_rng(0)
        for split, cases in (("train", ("00", "01")), ("test", ("02",))):
            for case in cases:
                for s in range(2):
                    for kind, values in (("image", rng.integers(0, 256, (8, 8))),
                                         ("mask", np.where(rng.random((8, 8)) > 0.5, 255, 0))):
                        path = root / "HK" / split / kind / f"{case}_{s}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(values.astype(np.uint8)).save(path)
    return root


def png_dm(tmp: Path) -> Callable[[], object]:
    def load():
        dm = MultiSiteDataModule(format="png_slices", root=str(png_root(tmp)), sites=["HK"])
        dm.setup("fit")
        return dm
    return load


def good_space(tmp: Path, name: str = "space.pt", **overrides) -> Path:
    torch.manual_seed(0)
    state = build_from_spec(SPEC).state_dict()
    kwargs = dict(net_spec=SPEC, sites=["BIDMC", "HK"], global_state=state,
                  personalized={"BIDMC": state, "HK": state}, rounds=1)
    kwargs.update(overrides)
    return write_routing_space(tmp / name, **kwargs)


def cli(tmp: Path, *args: str) -> Callable[[], object]:
    """The CLI on the demo twin; an argument error (SystemExit) becomes a ValueError carrying
    what the parser printed, so the row can check that the message names the key."""
    def run():
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return main(["fit", "--config", str(DEMO), "--trainer.default_root_dir", str(tmp),
                             "--trainer.logger.init_args.save_dir", str(tmp), *args])
        except SystemExit as exit_:
            raise ValueError(f"CLI exit {exit_.code}: {err.getvalue()}") from None
    return run


_CKPT: dict[str, Path] = {}


def federated_ckpt(tmp_factory) -> Path:
    """A real checkpoint of a 1-round, 3-site federated CLI fit (made once per session)."""
    if "path" not in _CKPT:
        root = tmp_factory.mktemp("ckpt")
        run = cli(root, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                  "--trainer.limit_val_batches", "0", "--test_after_fit", "false")()
        run.trainer.save_checkpoint(root / "good.ckpt")
        _CKPT["path"] = root / "good.ckpt"
    return _CKPT["path"]


def _write_marker(path: str) -> str:  # what a malicious pickle would run
    Path(path).write_text("code ran")
    return path


class Payload:
    """Unpickling this runs ``_write_marker`` (the classic ``__reduce__`` code-execution trick)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


# ---------------------------------------------------------------- the bad inputs


def truncated_npy(tmp):
    path = npy_root(tmp) / "BIDMC" / "Case00.npy"
    path.write_bytes(path.read_bytes()[:100])
    return npy_dm(tmp), [str(path)]


def corrupt_npy(tmp):
    path = npy_root(tmp) / "HK" / "Case00_segmentation.npy"
    path.write_bytes(b"this is not a numpy file" * 10)
    return npy_dm(tmp), [str(path)]


def pickled_npy(tmp):
    path = npy_root(tmp) / "BIDMC" / "Case01.npy"
    np.save(path, np.array([Payload(tmp / "npy_marker")], dtype=object), allow_pickle=True)
    return npy_dm(tmp), [str(path), "Python objects"]


def _rewrite_npy(tmp, name, change):
    path = npy_root(tmp) / "BIDMC" / name
    np.save(path, change(np.load(path)))
    return path


def nan_pixels(tmp):
    def change(a):
        a = a.copy()
        a[1, 3, 3, 0] = np.nan
        return a
    path = _rewrite_npy(tmp, "Case00.npy", change)
    return npy_dm(tmp), [str(path), "NaN or inf", "slice 1"]


def inf_pixels(tmp):
    def change(a):
        a = a.copy()
        a[0, 0, 0, 2] = -np.inf
        return a
    path = _rewrite_npy(tmp, "Case01.npy", change)
    return npy_dm(tmp), [str(path), "NaN or inf"]


def string_image(tmp):
    path = _rewrite_npy(tmp, "Case00.npy", lambda a: a.astype(str))
    return npy_dm(tmp), [str(path), "dtype <U"]


def complex_mask(tmp):
    path = _rewrite_npy(tmp, "Case00_segmentation.npy", lambda a: a.astype(np.complex64))
    return npy_dm(tmp), [str(path), "complex64"]


def label_out_of_range(tmp):
    def change(a):
        a = a.copy()
        a[0, 0, 0] = 7
        return a
    path = _rewrite_npy(tmp, "Case00_segmentation.npy", change)
    return npy_dm(tmp), [str(path), "label 7", "[0, 2)"]


def fractional_mask(tmp):
    path = _rewrite_npy(tmp, "Case01_segmentation.npy", lambda a: a.astype(np.float32) + 0.5)
    return npy_dm(tmp), [str(path), "not an integer label"]


def size_mismatch(tmp):
    path = _rewrite_npy(tmp, "Case00_segmentation.npy", lambda a: a[:, :6, :6])
    return npy_dm(tmp), [str(path), str(npy_root(tmp) / "BIDMC" / "Case00.npy"), "(2, 6, 6)"]


def image_not_4d(tmp):
    path = _rewrite_npy(tmp, "Case00.npy", lambda a: a[..., 0])
    return npy_dm(tmp), [str(path), "[N, H, W, C]"]


def wrong_channels(tmp):
    _rewrite_npy(tmp, "Case00.npy", lambda a: a[..., :2])
    return npy_dm(tmp), ["Case00", "2 channels, expected 3"]


def empty_site(tmp):
    root = npy_root(tmp)
    for split in ("train", "val", "test"):
        (root / f"HK_{split}.txt").write_text("")
    return npy_dm(tmp), ["'HK'", "no samples"]


def empty_training_split(tmp):
    (npy_root(tmp) / "HK_train.txt").write_text("# nothing here\n")
    return npy_dm(tmp), ["'HK'", "no training samples"]


def case_listed_twice(tmp):
    path = npy_root(tmp) / "BIDMC_train.txt"
    path.write_text("Case00.npy\nCase00\n")
    return npy_dm(tmp), [str(path), "'Case00' listed twice"]


def missing_case_file(tmp):
    (npy_root(tmp) / "BIDMC" / "Case01_segmentation.npy").unlink()
    return npy_dm(tmp), ["missing case file", "Case01_segmentation.npy"]


def missing_root(tmp):
    return (lambda: MultiSiteDataModule(format="iopfl_npy", root=str(tmp / "nowhere"))), [
        "nowhere", "is not a folder"]


def truncated_png(tmp):
    path = png_root(tmp) / "HK" / "train" / "image" / "01_1.png"
    path.write_bytes(path.read_bytes()[:60])
    return png_dm(tmp), [str(path), "cannot read"]


def corrupt_png(tmp):
    path = png_root(tmp) / "HK" / "test" / "mask" / "02_0.png"
    path.write_bytes(b"\x89PNG garbage" * 20)
    return png_dm(tmp), [str(path)]


def png_mask_value(tmp):
    path = png_root(tmp) / "HK" / "train" / "mask" / "00_0.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
    return png_dm(tmp), [str(path), "mask value 128"]


def png_size_mismatch(tmp):
    path = png_root(tmp) / "HK" / "train" / "mask" / "00_1.png"
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(path)
    return png_dm(tmp), [str(path), "(6, 8)"]


def png_unpaired(tmp):
    path = png_root(tmp) / "HK" / "test" / "mask" / "02_1.png"
    path.rename(path.with_name("02_9.png"))
    return png_dm(tmp), ["unpaired", "02_1.png", "02_9.png"]


def site_twice(tmp):
    return cli(tmp, "--data.sites", "[HK, BIDMC, HK]"), ["['HK']", "more than once"]


def unknown_site(tmp):
    return cli(tmp, "--data.sites", "[BIDMC, RUNMC]"), ["RUNMC", "unknown site"]


def outside_not_among_sites(tmp):
    return cli(tmp, "--data.outside", "I2CVB"), ["I2CVB", "not among sites"]


def outside_is_every_site(tmp):
    return cli(tmp, "--data.outside", "BIDMC,HK,UCL"), ["leaves no training site"]


def outside_site_inside_the_federation(tmp):
    space = good_space(tmp)  # trained on BIDMC and HK

    def run():
        module = RoutingModule(routing_space=str(space), baselines=[])
        dm = MultiSiteDataModule(sites=["BIDMC", "HK", "UCL"], outside="HK", train_on="outside",
                                 synthetic={"size": 16, "slices": 2})
        tiny_trainer(1, [], tmp).fit(module, datamodule=dm)
    return run, ["'HK'", "inside sites", str(space)]


def unknown_config_key(tmp):
    return cli(tmp, "--data.batchsize", "4"), ["batchsize"]


def unknown_key_in_yaml(tmp):
    config = tmp / "typo.yaml"
    config.write_text(DEMO.read_text().replace("  batch_size: 4", "  batch_size: 4\n  n_workers: 2"))
    run = cli(tmp, "--config", str(config))
    return run, ["n_workers"]


def wrong_type_config_value(tmp):
    return cli(tmp, "--data.batch_size", "four"), ["batch_size", "four"]


def unknown_choice(tmp):
    return cli(tmp, "--data.format", "dicom"), ["format", "dicom"]


def negative_batch_size(tmp):
    return cli(tmp, "--data.batch_size", "-3"), ["batch_size must be positive", "-3"]


def negative_rounds(tmp):
    return cli(tmp, "--trainer.max_epochs", "-5"), ["max_epochs", "-5"]


def zero_local_epochs(tmp):
    return (lambda: FederatedTrainer(local_epochs=0)), ["local_epochs", "0"]


def alpha_out_of_range(tmp):
    return (lambda: FederatedTrainer(alpha=1.0)), ["alpha must be in [0, 1)", "1.0"]


def client_fraction_out_of_range(tmp):
    return (lambda: FederatedTrainer(client_fraction=1.5)), ["client_fraction", "1.5"]


def negative_lr(tmp):
    return cli(tmp, "--model.init_args.lr", "-0.001"), ["lr must be positive", "-0.001"]


def routing_space_version_99(tmp):
    path = good_space(tmp)
    space = torch.load(path, weights_only=True)
    space["format_version"] = 99
    torch.save(space, path)
    return (lambda: read_routing_space(path)), [str(path), "format_version 99"]


def routing_space_missing_keys(tmp):
    path = tmp / "ckpt_as_space.pt"
    torch.save({"state_dict": {}, "epoch": 3}, path)
    return (lambda: read_routing_space(path)), [str(path), "missing keys", "format_version"]


def routing_space_other_architecture(tmp):
    wide = build_from_spec({**SPEC, "features": 8}).state_dict()
    path = good_space(tmp, personalized={"BIDMC": good_space_state(), "HK": wide})
    return (lambda: read_routing_space(path)), [str(path), "'HK'", "shape"]


def good_space_state():
    torch.manual_seed(0)
    return build_from_spec(SPEC).state_dict()


def routing_space_spec_mismatch(tmp):
    path = good_space(tmp, net_spec={**SPEC, "features": 8})  # states are features=4
    return (lambda: RoutingModule(routing_space=str(path))), [str(path), "features"]


def routing_space_model_of_a_stranger(tmp):
    state = good_space_state()
    path = good_space(tmp, personalized={"BIDMC": state, "UCL": state})
    return (lambda: read_routing_space(path)), [str(path), "['UCL']", "inside sites"]


def routing_space_without_any_model(tmp):
    path = good_space(tmp, personalized={})
    return (lambda: load_experts(path)), [str(path), "no personalized model"]


def truncated_routing_space(tmp):
    path = good_space(tmp)
    path.write_bytes(path.read_bytes()[:500])
    return (lambda: read_routing_space(path)), [str(path), "cannot load"]


def ckpt_state_lacks_keys(tmp, tmp_factory):
    ckpt = torch.load(federated_ckpt(tmp_factory), weights_only=True)
    key = next(k for k in ckpt["callbacks"] if "FederatedTrainer" in k)
    del ckpt["callbacks"][key]["personalized"], ckpt["callbacks"][key]["round"]
    path = tmp / "old.ckpt"
    torch.save(ckpt, path)
    return cli(tmp, "--ckpt_path", str(path)), ["lacks keys", "'round'", "'personalized'"]


def ckpt_other_architecture(tmp, tmp_factory):
    path = federated_ckpt(tmp_factory)  # features=4
    # the CLI rebuilds the model from the checkpoint's hyperparameters, so try a Trainer
    trainer = tiny_trainer(2, [FederatedTrainer()], tmp, limit_train_batches=1,
                           limit_val_batches=0)
    run = lambda: trainer.fit(tiny_module(features=8), datamodule=tiny_datamodule(),  # noqa: E731
                              ckpt_path=str(path))
    return run, ["size mismatch", "net.encoder1"]


def ckpt_other_sites(tmp, tmp_factory):
    path = federated_ckpt(tmp_factory)  # BIDMC, HK, UCL
    return cli(tmp, "--ckpt_path", str(path), "--data.sites", "[BIDMC, HK, I2CVB]"), [
        "trained on sites ['BIDMC', 'HK', 'UCL']", "I2CVB"]


def ckpt_missing(tmp):
    return cli(tmp, "--ckpt_path", str(tmp / "gone.ckpt")), ["gone.ckpt"]


@dataclass
class Row:
    build: Callable
    error: type[BaseException] | tuple[type[BaseException], ...] = ValueError
    needs_ckpt: bool = False


ROWS = {
    f.__name__: Row(f) for f in (
        truncated_npy, corrupt_npy, pickled_npy, nan_pixels, inf_pixels, string_image,
        complex_mask, label_out_of_range, fractional_mask, size_mismatch, image_not_4d,
        wrong_channels, empty_site, empty_training_split, case_listed_twice, missing_case_file,
        missing_root, truncated_png, corrupt_png, png_mask_value, png_size_mismatch, png_unpaired,
        site_twice, unknown_site, outside_not_among_sites, outside_is_every_site,
        outside_site_inside_the_federation, unknown_config_key, unknown_key_in_yaml,
        wrong_type_config_value, unknown_choice, negative_batch_size, zero_local_epochs,
        alpha_out_of_range, client_fraction_out_of_range, negative_lr, routing_space_version_99,
        routing_space_missing_keys, routing_space_other_architecture,
        routing_space_spec_mismatch, routing_space_model_of_a_stranger,
        routing_space_without_any_model, truncated_routing_space,
        ckpt_missing,
    )
}
ROWS["negative_rounds"] = Row(negative_rounds, Exception)  # Lightning's MisconfigurationException
for f in (ckpt_state_lacks_keys, ckpt_other_architecture, ckpt_other_sites):
    ROWS[f.__name__] = Row(f, (ValueError, RuntimeError), needs_ckpt=True)
ROWS["ckpt_missing"] = Row(ckpt_missing, (FileNotFoundError, ValueError))


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_gets_a_clear_early_error(name, tmp_path, tmp_path_factory):
    row = ROWS[name]
    call, expected = row.build(tmp_path, tmp_path_factory) if row.needs_ckpt else row.build(tmp_path)
    with pytest.raises(row.error) as info:
        call()
    message = str(info.value)
    for part in expected:
        assert part in message, f"{name}: {part!r} not in error message:\n{message}"
    assert not list(tmp_path.rglob("*.ckpt")) or name.startswith("ckpt_"), "training started"
    assert not list(tmp_path.rglob("routing_space.pt")), "training finished?!"
    assert not list(tmp_path.rglob("*marker*")), "pickled code ran"


def test_table_has_at_least_twenty_kinds():
    assert len(ROWS) >= 20
    doc = (REPO / "docs" / "reliability.md").read_text()
    undocumented = [n for n in ROWS if f"`{n}`" not in doc]
    assert not undocumented, f"list these in docs/reliability.md: {undocumented}"


# ---------------------------------------------------------------- safe loading (pickle payloads)


def test_payload_is_live_when_loaded_unsafely(tmp_path):
    """Control: the payload really runs code under ``weights_only=False``."""
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload(tmp_path / "marker")}, path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").read_text() == "code ran"


def test_routing_space_with_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = good_space(tmp_path)
    space = torch.load(path, weights_only=True)
    space["personalized"]["HK"]["evil"] = Payload(marker)
    torch.save(space, path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        read_routing_space(path)
    assert "weights_only" in str(info.value) and "_write_marker" in str(info.value)
    assert not marker.exists()


def test_ckpt_path_with_pickle_payload_is_refused_by_the_cli(tmp_path, tmp_path_factory):
    marker = tmp_path / "marker"
    ckpt = torch.load(federated_ckpt(tmp_path_factory), weights_only=True)
    ckpt["hyper_parameters"]["evil"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        cli(tmp_path, "--ckpt_path", str(path))()
    assert not marker.exists()
    assert isinstance(AtomicCheckpointIO().load_checkpoint(federated_ckpt(tmp_path_factory)), dict)


def test_model_arguments_replaced_by_the_checkpoint_are_named(tmp_path, tmp_path_factory, caplog):
    path = federated_ckpt(tmp_path_factory)  # lr 1e-3
    run = cli(tmp_path, "--ckpt_path", str(path), "--model.init_args.lr", "0.5",
              "--data.sites", "[BIDMC, HK]")  # stops at the sites check, before training
    with pytest.raises(ValueError, match="trained on sites"):
        run()
    assert "model lr=0.5 is ignored, the checkpoint's 0.001 is used" in caplog.text
    assert "in_channels=None" not in caplog.text  # None takes the data's: nothing overridden


def test_stock_lightning_trainer_also_refuses_the_payload(tmp_path, tmp_path_factory, monkeypatch):
    """Plain ``Trainer.fit(ckpt_path=...)`` in lightning 2.6.6 passes ``weights_only=None``, and
    torch >= 2.6 then defaults to True; setting TORCH_FORCE_WEIGHTS_ONLY_LOAD keeps it so."""
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    marker = tmp_path / "marker"
    ckpt = torch.load(federated_ckpt(tmp_path_factory), weights_only=True)
    ckpt["evil"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    trainer = tiny_trainer(2, [FederatedTrainer()], tmp_path, limit_train_batches=1,
                           limit_val_batches=0)
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer.fit(tiny_module(), datamodule=tiny_datamodule(), ckpt_path=str(path))
    assert not marker.exists()
