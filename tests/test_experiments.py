"""Each experiment config has a tiny twin under tests/configs that runs end to end here."""

import csv
from pathlib import Path

import yaml

from iopfl_lightning.cli import main
from iopfl_lightning.data import make_synthetic_sites, write_iopfl_npy
from tests.data.conftest import REAL_SAMPLE
from tests.data.test_fundus import make_domain

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs"


def _fit(config: str, tmp_path: Path, *extra: str) -> list[dict]:
    cli = main(["fit", "--config", str(TINY / config), *extra,
                "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path)])
    with open(Path(cli.trainer.log_dir) / "results.csv") as handle:
        return list(csv.DictReader(handle))


def _args(section: dict) -> dict:
    return section.get("init_args", section)


def test_twins_mirror_their_experiment_configs():
    pairs = {"prostate/inside.yaml": "prostate_inside_tiny.yaml",
             "fundus/inside.yaml": "fundus_inside_tiny.yaml",
             "demo.yaml": "demo_tiny.yaml"}
    for real, twin in pairs.items():
        full = yaml.safe_load((REPO / "experiments" / real).read_text())
        tiny = yaml.safe_load((TINY / twin).read_text())
        # the twin changes values (sizes, rounds), never adds options the real config lacks
        for section in ("model", "data"):
            assert set(_args(tiny[section])) <= set(_args(full[section])), (real, section)
        assert [c["class_path"] for c in tiny["trainer"]["callbacks"]] == [
            c["class_path"] for c in full["trainer"]["callbacks"]
        ], real


def test_prostate_inside_twin_on_npy_sites(tmp_path):
    sites = make_synthetic_sites(
        cases_per_split={"train": 1, "val": 1, "test": 1}, slices=3, size=32, seed=1
    )
    write_iopfl_npy(sites, tmp_path / "data")
    rows = _fit("prostate_inside_tiny.yaml", tmp_path, "--data.root", str(tmp_path / "data"))
    assert {r["site"] for r in rows} == set(sites)
    assert {r["model"] for r in rows} == {"global", "personalized"}


def test_fundus_inside_twin_on_generated_domains(tmp_path):
    for domain in ("Domain1", "Domain2", "Domain3", "Domain4"):
        make_domain(tmp_path / "fundus", domain)
    rows = _fit("fundus_inside_tiny.yaml", tmp_path, "--data.root", str(tmp_path / "fundus"))
    assert len(rows) == 8 and all(0 <= float(r["dice"]) <= 1 for r in rows)


def test_real_prostate_png_sample_smoke_run(tmp_path):
    if not REAL_SAMPLE.is_dir():
        import pytest

        pytest.skip(f"real sample absent at {REAL_SAMPLE}")
    rows = _fit(
        "prostate_inside_tiny.yaml", tmp_path,
        "--data.format", "png_slices", "--data.root", str(REAL_SAMPLE),
        "--data.sites", "null", "--data.pairing", "order", "--data.image_size", "32",
        "--trainer.max_epochs", "1",
    )
    assert len({r["site"] for r in rows}) == 6
