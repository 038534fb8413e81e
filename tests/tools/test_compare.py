"""The comparison command: method specs, per-run configs, and a tiny end-to-end run."""

import csv

import pytest
import yaml

from iopfl_lightning.tools import compare as compare_mod
from iopfl_lightning.tools.compare import main, parse_method, run_config

TINY = "tests/configs/compare_cpu_tiny.yaml"
REAL = "experiments/compare_cpu.yaml"


def _args(section):
    return section.get("init_args", section)


def test_twin_mirrors_the_comparison_config():
    full, tiny = (yaml.safe_load(open(path)) for path in (REAL, TINY))
    for section in ("model", "data"):
        assert set(_args(tiny[section])) <= set(_args(full[section])), section
    classes = [[c["class_path"] for c in cfg["trainer"]["callbacks"]] for cfg in (full, tiny)]
    assert classes[0] == classes[1]


def test_method_specs_parse_arguments_and_refuse_unknown_names():
    assert parse_method("fedavg") == ("fedavg", {})
    assert parse_method("fedprox:mu=0.1") == ("fedprox", {"mu": 0.1})
    assert parse_method("fedper:local_modules=[head]") == ("fedper", {"local_modules": ["head"]})
    assert parse_method("fedper:local_modules=[head, up4],lr=0.1") == (
        "fedper", {"local_modules": ["head", "up4"], "lr": 0.1})
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("fedsomething")
    with pytest.raises(ValueError, match="key=value"):
        parse_method("fedprox:mu")


def test_run_config_sets_method_seeds_and_folder_but_keeps_the_data(tmp_path):
    base = yaml.safe_load(open(TINY))
    cfg = run_config(base, "iopfl:alpha=0.5", 3, tmp_path)
    fed = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("FederatedTrainer")][0]
    assert fed["init_args"]["method"] == "iopfl" and fed["init_args"]["seed"] == 3
    assert fed["init_args"]["method_args"] == {"alpha": 0.5}
    assert cfg["seed_everything"] == 3 and cfg["data"]["seed"] == 3
    assert cfg["data"]["synthetic"]["seed"] == base["data"].get("seed", 0)  # same sites
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path)
    assert "method" not in str(base)  # the loaded config is not modified


def test_compare_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    argv = ["--config", TINY, "--methods", "fedavg", "iopfl", "--seeds", "0",
            "--out", str(tmp_path), "--", "--trainer.max_epochs", "1"]
    rows = main(argv)
    assert {r["method"] for r in rows} == {"fedavg", "iopfl"}
    with open(tmp_path / "compare.csv") as handle:
        table = list(csv.DictReader(handle))
    shown = {(r["method"], r["model"]) for r in table if r["deployed"] == "True"}
    assert shown == {("fedavg", "global"), ("iopfl", "personalized")}
    sites = yaml.safe_load(open(TINY))["data"]["sites"]
    assert {r["site"] for r in table} == {*sites, "mean"}
    markdown = (tmp_path / "compare.md").read_text()
    assert "| **mean over sites** |" in markdown and "fedavg" in markdown
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert plots == sorted(f"compare_{s}.png" for s in [*sites, "mean"])

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished run was fitted again")

    monkeypatch.setattr("iopfl_lightning.cli.main", no_fit)
    extra = ["--trainer.max_epochs", "1"]
    assert len(compare_mod.compare(TINY, ["fedavg"], [0], tmp_path, extra)) == len(sites) * 1
    assert "arguments `--trainer.max_epochs 1`" in (tmp_path / "compare.md").read_text()
    with pytest.raises(ValueError, match=r"fedavg/seed0: the results there were made with "
                                         "other settings"):
        compare_mod.compare(TINY, ["fedavg"], [0], tmp_path, ["--trainer.max_epochs", "2"])


def test_the_mean_compares_the_deployed_models_on_the_same_sites():
    """A held-out site (UCL) has a global row but no personalized one: the mean over sites
    leaves it out for every method; per-site normalization (personalized rows of fedavg, as
    with norm_policy local) is what fedavg deploys then."""
    from iopfl_lightning.tools.compare_table import summarize, to_markdown

    def rows(method, personalized):
        out = [{"method": method, "seed": 0, "site": s, "model": "global", "dice": d, "hd95": 1.0}
               for s, d in (("A", 0.8), ("B", 0.8), ("UCL", 0.2))]
        if personalized:
            out += [{"method": method, "seed": 0, "site": s, "model": "personalized",
                     "dice": 0.82, "hd95": 1.0} for s in ("A", "B")]
        return out

    table = summarize(rows("fedavg", False) + rows("iopfl", True),
                      {"fedavg": "global", "iopfl": "personalized"})
    means = {(r.method, r.model): r.dice_mean for r in table.itertuples() if r.site == "mean"}
    assert means[("fedavg", "global")] == pytest.approx(0.8)  # not 0.6 with UCL
    assert means[("iopfl", "personalized")] == pytest.approx(0.82)
    assert "| **mean over A, B** | **0.8000** | **0.8200** |" in to_markdown(table)
    local_norms = summarize(rows("fedavg", True), {"fedavg": "global"})
    assert set(local_norms[local_norms["deployed"]]["model"]) == {"personalized"}
