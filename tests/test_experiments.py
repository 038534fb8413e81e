"""Each experiment config has a tiny twin under tests/configs that runs end to end here."""

import yaml

from iopfl_lightning.data import make_synthetic_sites, write_iopfl_npy
from tests.data.conftest import REAL_SAMPLE
from tests.data.test_fundus import make_domain
from tests.helpers import REPO, eager_compiles, fit_rows, load_twin


def test_twins_mirror_their_experiment_configs():
    pairs = {"prostate/inside.yaml": "prostate_inside_tiny.yaml",
             "fundus/inside.yaml": "fundus_inside_tiny.yaml",
             "demo.yaml": "demo_tiny.yaml"}
    for real, twin in pairs.items():
        full, tiny = load_twin(real, twin)
        assert [c["class_path"] for c in tiny["trainer"]["callbacks"]] == [
            c["class_path"] for c in full["trainer"]["callbacks"]
        ], real


def test_prostate_inside_twin_on_npy_sites(tmp_path):
    sites = make_synthetic_sites(
        cases_per_split={"train": 1, "val": 1, "test": 1}, slices=3, size=32, seed=1
    )
    write_iopfl_npy(sites, tmp_path / "data")
    rows = fit_rows("prostate_inside_tiny.yaml", tmp_path, "--data.root", str(tmp_path / "data"))
    assert {r["site"] for r in rows} == set(sites)
    assert {r["model"] for r in rows} == {"global", "personalized"}


def test_fundus_inside_twin_on_generated_domains(tmp_path):
    for domain in ("Domain1", "Domain2", "Domain3", "Domain4"):
        make_domain(tmp_path / "fundus", domain)
    rows = fit_rows("fundus_inside_tiny.yaml", tmp_path, "--data.root", str(tmp_path / "fundus"))
    assert len(rows) == 8 and all(0 <= float(r["dice"]) <= 1 for r in rows)


def test_real_prostate_png_sample_smoke_run(tmp_path):
    if not REAL_SAMPLE.is_dir():
        import pytest

        pytest.skip(f"real sample absent at {REAL_SAMPLE}")
    rows = fit_rows(
        "prostate_inside_tiny.yaml", tmp_path,
        "--data.format", "png_slices", "--data.root", str(REAL_SAMPLE),
        "--data.sites", "null", "--data.pairing", "order", "--data.image_size", "32",
        "--trainer.max_epochs", "1",
    )
    assert len({r["site"] for r in rows}) == 6


GPU_OVERLAY = str(REPO / "experiments" / "gpu.yaml")


def test_gpu_overlay_on_the_prostate_inside_twin_runs_on_cpu(tmp_path):
    """experiments/gpu.yaml's keys apply on top of an inside config (bf16 autocast,
    channels_last and the device cache also run on a CPU; cuDNN autotuning does nothing here)."""
    sites = make_synthetic_sites(
        cases_per_split={"train": 1, "val": 1, "test": 1}, slices=3, size=32, seed=1
    )
    write_iopfl_npy(sites, tmp_path / "data")
    rows = fit_rows("prostate_inside_tiny.yaml", tmp_path, "--config", GPU_OVERLAY,
                    "--trainer.accelerator", "cpu", "--data.root", str(tmp_path / "data"))
    assert {r["site"] for r in rows} == set(sites)
    cfg = yaml.safe_load((tmp_path / "version_0" / "config.yaml").read_text())
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["benchmark"] is True
    assert cfg["model"]["init_args"]["channels_last"] is True and cfg["data"]["device_cache"]


def test_cpu_bf16_overlay_trains_the_prostate_inside_twin_in_bf16_channels_last(tmp_path):
    sites = make_synthetic_sites(
        cases_per_split={"train": 1, "val": 1, "test": 1}, slices=3, size=32, seed=1
    )
    write_iopfl_npy(sites, tmp_path / "data")
    rows = fit_rows("prostate_inside_tiny.yaml", tmp_path, "--config",
                    str(REPO / "experiments" / "cpu_bf16.yaml"), "--data.root",
                    str(tmp_path / "data"))
    assert {r["site"] for r in rows} == set(sites)
    cfg = yaml.safe_load((tmp_path / "version_0" / "config.yaml").read_text())
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["model"]["init_args"]["channels_last"] is True


def test_gpu_compile_overlay_compiles_the_training_forward(tmp_path, monkeypatch):
    """experiments/gpu_compile.yaml after gpu.yaml: the inside twin trains through
    torch.compile in reduce-overhead mode (the eager backend here: CPU, no code generation)."""
    calls = eager_compiles(monkeypatch)
    sites = make_synthetic_sites(
        cases_per_split={"train": 1, "val": 1, "test": 1}, slices=3, size=32, seed=1
    )
    write_iopfl_npy(sites, tmp_path / "data")
    rows = fit_rows("prostate_inside_tiny.yaml", tmp_path, "--config", GPU_OVERLAY,
                    "--config", str(REPO / "experiments" / "gpu_compile.yaml"),
                    "--trainer.accelerator", "cpu", "--data.root", str(tmp_path / "data"))
    assert [kwargs for _, kwargs in calls] == [{"mode": "reduce-overhead"}, {}]  # train, eval
    assert {r["site"] for r in rows} == set(sites)
