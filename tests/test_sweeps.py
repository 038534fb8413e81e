"""The wandb sweeps in experiments/sweeps/ without a wandb server.

Each sweep's ``command`` is expanded the way ``wandb agent`` expands it (wandb's own
``create_sweep_command_args`` formats the ``${args}``), then:

- every parameter value (``value``, each of ``values``, ``min`` and ``max`` of a distribution)
  is accepted by the CLI parser, lands at its key in the resolved config (``--print_config``),
  and is accepted by the constructor of the class it configures;
- for the sweeps over generated sites, one seeded sampled combination runs a tiny fit on the
  experiment's tiny twin with the experiment's (wandb) logger, offline, and logs the sweep's
  metric.
"""

from __future__ import annotations

import csv
import importlib
import math
import random
from pathlib import Path

import pytest
import wandb
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from iopfl_lightning.cli import main
from tests.helpers import REPO, TINY_CONFIGS

SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
# experiment config of a sweep -> its tiny twin, for sweeps that run on generated sites
TWINS = {"experiments/demo.yaml": "demo_tiny.yaml",
         "experiments/outside_demo.yaml": "outside_demo_tiny.yaml"}
# the metric each module logs that a sweep may optimize (checked by the tiny fits)
METRIC_BY_MODEL = {"SegmentationModule": "val/personalized/dice_mean",
                   "RoutingModule": "test/routed/dice_mean"}
TOP_KEYS = {"program", "entity", "project", "description", "name", "method", "metric",
            "parameters", "early_terminate", "command", "run_cap"}
DISTRIBUTIONS = {"uniform", "int_uniform", "log_uniform_values"}
AGENT_PREFIX = ["${env}", "python", "-m", "iopfl_lightning"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _values(spec: dict) -> list:
    """The values a parameter can take at its edges: its value, each of its values, or min/max."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def _sample(spec: dict, rng: random.Random):
    """One draw, as the sweep controller would make it."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    low, high, kind = spec["min"], spec["max"], spec["distribution"]
    if kind == "int_uniform":
        return rng.randint(low, high)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def _argv(sweep: dict, values: dict, configs: dict[str, Path]) -> list[str]:
    """The agent's command line after ``python -m iopfl_lightning``; ``configs`` maps each
    ``--config`` path of the sweep to the file to use here."""
    command = sweep["command"]
    assert command[:4] == AGENT_PREFIX and command[-1] == "${args}", command
    middle = [str(configs.get(arg, arg)) for arg in command[4:-1]]
    agent = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    return [*middle, *agent["args"]]


def _repo_configs(sweep: dict) -> dict[str, Path]:
    return {arg: REPO / arg for arg in sweep["command"] if str(arg).endswith(".yaml")}


def _resolved(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    assert stop.value.code in (0, None), argv
    return yaml.safe_load(capsys.readouterr().out)


def _lookup(config: dict, key: str) -> tuple[object, dict | None]:
    """The value at a dotted sweep key and the class node (class_path/init_args) holding it.
    A list (trainer.callbacks) is entered at its last element, as jsonargparse does."""
    node, owner = config, None
    for part in key.split("."):
        if isinstance(node, list):
            node = node[-1]
        if isinstance(node, dict) and "class_path" in node:
            owner = node
        node = node[part]
    return node, owner


def _same(given, resolved) -> bool:
    if isinstance(resolved, list) and not isinstance(given, list):
        return resolved == [given]
    if isinstance(given, float):
        return math.isclose(float(resolved), given, rel_tol=1e-9)
    return str(resolved) == str(given)


def _instantiate(owner: dict, routing_space: Path) -> object:
    """Builds the configured class, so its range checks run (alpha < 1, lr > 0 ...)."""
    module, name = owner["class_path"].rsplit(".", 1)
    init_args = dict(owner.get("init_args") or {})
    if "routing_space" in init_args:  # the sweep's path exists only after the real federation
        init_args["routing_space"] = str(routing_space)
    return getattr(importlib.import_module(module), name)(**init_args)


def _metric_values(log_dir: Path, metric: str) -> list[float]:
    with open(log_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and metric in rows[0], f"{metric} not logged in {log_dir / 'metrics.csv'}"
    return [float(r[metric]) for r in rows if r[metric] not in ("", None)]


@pytest.fixture(scope="module")
def routing_space(tmp_path_factory) -> Path:
    """A tiny federation trained with UCL held out: the experts of the routing sweeps."""
    root = tmp_path_factory.mktemp("heldout_UCL")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        cli = main(["fit", "--config", str(TINY_CONFIGS / "demo_tiny.yaml"),
                    "--data.outside", "UCL", "--trainer.max_epochs", "1",
                    "--trainer.enable_checkpointing", "false", "--test_after_fit", "false"])
        return Path(cli.trainer.log_dir).resolve() / "routing_space.pt"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_a_wandb_sweep(path: Path) -> None:
    sweep = _load(path)
    assert set(sweep) <= TOP_KEYS, f"{path}: unknown keys {set(sweep) - TOP_KEYS}"
    assert (REPO / sweep["program"]).is_file(), f"{path}: program {sweep['program']}"
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("minimize", "maximize")
    for key, config in _repo_configs(sweep).items():
        assert config.is_file(), f"{path}: --config {key} does not exist"
    for name, spec in sweep["parameters"].items():
        kinds = {"value", "values", "distribution"} & set(spec)
        assert len(kinds) == 1, f"{path}: {name} needs one of value/values/distribution"
        if "distribution" in spec:
            assert spec["distribution"] in DISTRIBUTIONS, f"{path}: {name}"
            assert spec["min"] < spec["max"], f"{path}: {name}"
            assert spec["distribution"] != "log_uniform_values" or spec["min"] > 0


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_value_parses_and_constructs(path: Path, routing_space: Path, capsys) -> None:
    """Value i of every parameter together (cycling), until every value has been given."""
    sweep = _load(path)
    edges = {name: _values(spec) for name, spec in sweep["parameters"].items()}
    for i in range(max(len(v) for v in edges.values())):
        values = {name: vals[i % len(vals)] for name, vals in edges.items()}
        config = _resolved(_argv(sweep, values, _repo_configs(sweep)), capsys)
        owners = {}
        for name, given in values.items():
            resolved, owner = _lookup(config, name)
            assert _same(given, resolved), f"{path.name}: {name}={given!r} became {resolved!r}"
            if owner is not None:
                owners[id(owner)] = owner
        for owner in owners.values():
            _instantiate(owner, routing_space)
        model = config["model"]["class_path"].rsplit(".", 1)[1]
        assert sweep["metric"]["name"] == METRIC_BY_MODEL[model], path.name


FIT_SWEEPS = [p for p in SWEEPS if set(_load(p)["command"]) & set(TWINS)]


def _logger_class(config: Path) -> str:
    logger = (_load(config).get("trainer") or {}).get("logger")
    assert isinstance(logger, dict) and "class_path" in logger, f"{config}: trainer.logger"
    return logger["class_path"]


@pytest.mark.parametrize("path", FIT_SWEEPS, ids=lambda p: p.stem)
def test_sampled_combination_runs_a_tiny_fit(path, routing_space, tmp_path, monkeypatch):
    """The twin replaces the experiment config but logs with the experiment's logger class
    (wandb, offline here), as the sweep's runs do."""
    sweep = _load(path)
    monkeypatch.chdir(tmp_path)  # the configs' relative run folders land in tmp_path
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rng = random.Random(0)
    values = {name: _sample(spec, rng) for name, spec in sweep["parameters"].items()}
    if "model.init_args.routing_space" in values:
        values["model.init_args.routing_space"] = str(routing_space)
    configs = _repo_configs(sweep)
    (experiment,) = [k for k in configs if k in TWINS]
    configs[experiment] = TINY_CONFIGS / TWINS[experiment]
    argv = _argv(sweep, values, configs)
    try:
        cli = main([*argv, f"--trainer.logger={_logger_class(REPO / experiment)}",
                    "--trainer.max_epochs=1", "--trainer.enable_checkpointing=false"])
    finally:
        wandb.finish()
    log_dir = Path(cli.trainer.log_dir).resolve()
    assert log_dir.is_relative_to(tmp_path), log_dir
    scores = _metric_values(log_dir, sweep["metric"]["name"])
    assert scores and all(0.0 <= s <= 1.0 for s in scores), scores
    assert (log_dir / "results.csv").is_file()
    assert list(log_dir.rglob("offline-run-*")), f"no offline wandb run under {log_dir}"
    fed = [c for c in cli.trainer.callbacks if type(c).__name__ == "FederatedTrainer"]
    for name, given in values.items():
        arg = name.rsplit(".", 1)[1]
        if name.startswith("model.init_args."):
            assert _same(given, cli.model.hparams[arg]), name
        elif name.startswith("trainer.callbacks.init_args."):
            assert _same(given, getattr(fed[0], arg)), name
