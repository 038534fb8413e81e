"""At the end of ``test`` the run folder gets the bar chart, the overlays and (routing) the
routing heatmap next to results.csv, and the table is logged."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from iopfl_lightning.modules.routing import RoutingModule
from iopfl_lightning.nets.routed import routed_layers
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer
from tests.modules.test_routing import outside_dm, write_space


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_segmentation_test_writes_pictures_and_logs_the_table(tmp_path, caplog):
    module, dm = tiny_module(overlay_cases=1), tiny_datamodule()
    with caplog.at_level(logging.INFO, logger="iopfl_lightning"):
        tiny_trainer(1, [], tmp_path).test(module, datamodule=dm, verbose=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"results.csv", "results.md",
                                                    "site_bars.png", "overlays.png"}
    width, height = _png_size(tmp_path / "overlays.png")
    assert height > width  # one row per site (3), one column (global only)
    assert "| **mean** |" in caplog.text and "overlays.png" in caplog.text


def test_overlay_cases_zero_skips_the_overlays(tmp_path):
    tiny_trainer(1, [], tmp_path).test(tiny_module(overlay_cases=0), datamodule=tiny_datamodule(),
                                       verbose=False)
    assert (tmp_path / "site_bars.png").is_file() and not (tmp_path / "overlays.png").exists()
    with pytest.raises(ValueError, match="overlay_cases must be >= 0"):
        tiny_module(overlay_cases=-1)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_routing_writes_the_heatmap_of_the_reported_pass(tmp_path, mode):
    space = write_space(tmp_path / "routing_space.pt")
    pl.seed_everything(0, verbose=False)
    module = RoutingModule(space, eval_mode=mode, baselines=["global"], overlay_cases=1)
    trainer = tiny_trainer(2 if mode == "online" else 1, [], tmp_path / "run")
    trainer.fit(module, datamodule=outside_dm())
    trainer.test(module, datamodule=outside_dm(), verbose=False)
    means = module._mixtures.mean()
    assert list(means) == [name for name, _ in routed_layers(module.net)]
    weights = torch.stack(list(means.values()))
    assert weights.shape[1] == 3 and torch.allclose(weights.sum(1), torch.ones(len(weights)))
    folder = tmp_path / "run"
    assert {"overlays.png", "routing_weights.png", "site_bars.png"} <= {
        p.name for p in folder.iterdir()}
    width, height = _png_size(folder / "overlays.png")
    assert width > height  # one case, two columns (global, routed)
