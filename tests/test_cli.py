"""End to end through the CLI: the tiny twins of the experiment configs, and early errors."""

import csv
from pathlib import Path

import pytest

from iopfl_lightning.federated import read_routing_space
from tests.helpers import TINY_CONFIGS, run_cli


def test_demo_twin_runs_fit_then_test_and_writes_the_results_contract(tmp_path):
    cli = run_cli(["fit", "--config", str(TINY_CONFIGS / "demo_tiny.yaml")], tmp_path)
    run_dir = Path(cli.trainer.log_dir)
    with open(run_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"site", "model", "dice", "hd95"} <= set(rows[0])
    sites = cli.datamodule.inside_sites
    assert {(r["site"], r["model"]) for r in rows} == {
        (s, m) for s in sites for m in ("global", "personalized")
    }
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert "| site |" in (run_dir / "results.md").read_text()
    space = read_routing_space(run_dir / "routing_space.pt")
    assert space["sites"] == sites and space["rounds"] == 2


def test_leave_one_site_out_keeps_the_site_out_of_training(tmp_path):
    cli = run_cli(["fit", "--config", str(TINY_CONFIGS / "demo_tiny.yaml"), "--data.outside", "UCL"], tmp_path)
    run_dir = Path(cli.trainer.log_dir)
    space = read_routing_space(run_dir / "routing_space.pt")
    assert "UCL" not in space["sites"]
    with open(run_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows if r["site"] == "UCL"] == ["global"]


@pytest.mark.parametrize(
    "override, match",
    [
        (["--data.sites", "[BIDMC, NOWHERE]"], "NOWHERE"),
        (["--data.outside", "RUNMC"], "RUNMC"),
        (["--data.batch_size", "0"], "batch_size"),
        (["--data.sites", "[HK, HK]"], "more than once"),
    ],
)
def test_bad_data_arguments_fail_before_training(tmp_path, override, match):
    with pytest.raises((ValueError, SystemExit)) as info:
        run_cli(["fit", "--config", str(TINY_CONFIGS / "demo_tiny.yaml"), *override], tmp_path)
    assert match in str(info.value) or isinstance(info.value, SystemExit)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_subcommands_are_fit_validate_and_test(capsys):
    """``predict`` is not offered: no module here has a prediction output to write."""
    from iopfl_lightning.cli import IOPFLCLI

    assert set(IOPFLCLI.subcommands()) == {"fit", "validate", "test"}
    with pytest.raises(SystemExit):
        run_cli(["predict", "--config", str(TINY_CONFIGS / "demo_tiny.yaml")], "unused")
    assert "invalid choice: 'predict'" in capsys.readouterr().err
