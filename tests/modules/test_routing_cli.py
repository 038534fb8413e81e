"""Outside configs end to end through the CLI, and the leave-one-site-out matrix tool."""

from __future__ import annotations

import pytest

from iopfl_lightning.data import make_synthetic_sites, write_iopfl_npy
from iopfl_lightning.tools.loso import run_matrix
from tests.data.test_fundus import make_domain
from tests.helpers import REPO, TINY_CONFIGS, fit_rows, load_twin
from tests.modules.test_routing import write_space

MODELS = ["global", "uniform", "ensemble", "tent", "routed"]


def test_outside_twins_mirror_their_experiment_configs():
    pairs = {"outside_demo.yaml": "outside_demo_tiny.yaml",
             "prostate/outside.yaml": "prostate_outside_tiny.yaml",
             "fundus/outside.yaml": "fundus_outside_tiny.yaml"}
    for real, twin in pairs.items():
        full, tiny = load_twin(real, twin)
        assert tiny["model"]["class_path"] == full["model"]["class_path"], real
        assert full["data"]["train_on"] == tiny["data"]["train_on"] == "outside"


def test_prostate_outside_twin(tmp_path):
    sites = make_synthetic_sites(cases_per_split={"train": 1, "val": 1, "test": 1}, slices=3,
                                 size=32, seed=1)
    write_iopfl_npy(sites, tmp_path / "data")
    space = write_space(tmp_path / "space.pt", sites=[s for s in sites if s != "UCL"])
    rows = fit_rows("prostate_outside_tiny.yaml", tmp_path, "--data.root", str(tmp_path / "data"),
                  "--data.outside", "[UCL]", "--model.routing_space", space)
    assert [(r["site"], r["model"]) for r in rows] == [("UCL", m) for m in MODELS]


def test_fundus_outside_twin_three_classes(tmp_path):
    for domain in ("Domain1", "Domain2", "Domain3", "Domain4"):
        make_domain(tmp_path / "fundus", domain)
    space = write_space(tmp_path / "space.pt", sites=["Domain2", "Domain3", "Domain4"],
                        num_classes=3)
    rows = fit_rows("fundus_outside_tiny.yaml", tmp_path, "--data.root", str(tmp_path / "fundus"),
                  "--data.outside", "[Domain1]", "--model.routing_space", space)
    assert [r["model"] for r in rows] == MODELS
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)


def test_loso_matrix_on_the_demo_twins(tmp_path):
    args = (str(TINY_CONFIGS / "demo_tiny.yaml"), str(TINY_CONFIGS / "outside_demo_tiny.yaml"), tmp_path)
    rows = run_matrix(*args, sites=["UCL"], extra=["--trainer.max_epochs", "1"])
    assert [(r["site"], r["model"]) for r in rows] == [("UCL", m) for m in MODELS]
    table = (tmp_path / "results.md").read_text()
    assert "**mean**" in table and "routed Dice" in table
    # resumes from the per-site results made with the same settings, refuses other ones
    again = run_matrix(*args, sites=["UCL"], extra=["--trainer.max_epochs", "1"])
    assert [r["dice"] for r in again] == [r["dice"] for r in rows]
    with pytest.raises(ValueError, match="UCL: the results there were made with other settings"):
        run_matrix(*args, sites=["UCL"])


def test_gpu_overlay_on_the_prostate_outside_twin_runs_on_cpu(tmp_path):
    """experiments/gpu.yaml also applies to test-time routing (its module has channels_last;
    the device cache serves the outside site's unlabelled images)."""
    sites = make_synthetic_sites(cases_per_split={"train": 1, "val": 1, "test": 1}, slices=3,
                                 size=32, seed=1)
    write_iopfl_npy(sites, tmp_path / "data")
    space = write_space(tmp_path / "space.pt", sites=[s for s in sites if s != "UCL"])
    rows = fit_rows("prostate_outside_tiny.yaml", tmp_path, "--config",
                    str(REPO / "experiments" / "gpu.yaml"), "--trainer.accelerator", "cpu",
                    "--data.root", str(tmp_path / "data"), "--data.outside", "[UCL]",
                    "--model.routing_space", space)
    assert [(r["site"], r["model"]) for r in rows] == [("UCL", m) for m in MODELS]
