"""Run config, node config and experiment checks: clear errors before anything is trained."""

import pytest
import yaml

from iopfl_lightning.flower.experiment import load_experiment
from iopfl_lightning.flower.settings import resolve_settings, resolve_site, site_dir
from tests.flower.conftest import SITES, TINY_CONFIG


def test_run_config_defaults_overrides_and_errors():
    settings = resolve_settings({"config": "a.yaml", "num-rounds": 3}, {"round-timeout": 5})
    assert (settings.num_rounds, settings.round_timeout, settings.test_at_end) == (3, 5.0, True)
    bad = [
        ({}, "'config'"),
        ({"config": "a.yaml", "rounds": 2}, "unknown key"),
        ({"config": "a.yaml", "num-rounds": "2"}, "'num-rounds' must be int"),
        ({"config": "a.yaml", "resume": 1}, "'resume' must be bool"),
        ({"config": "a.yaml", "min-replies": -1}, "'min-replies' must be >= 0"),
        ({"config": "a.yaml", "round-timeout": 0}, "'round-timeout' must be positive"),
    ]
    for run_config, message in bad:
        with pytest.raises(ValueError, match=message):
            resolve_settings(run_config)


def test_node_identity_and_folder(tmp_path):
    assert resolve_site({"site-name": "HK"}, SITES) == ("HK", 1)
    assert resolve_site({"partition-id": 2, "num-partitions": 3}, SITES) == ("UCL", 2)
    for node, message in (({"site-name": "RUNMC"}, "not an inside site"),
                          ({"partition-id": 3}, "partition-id 3"), ({}, "site-name")):
        with pytest.raises(ValueError, match=message):
            resolve_site(node, SITES)
    settings = resolve_settings({"config": "a.yaml", "site-root": str(tmp_path)})
    assert site_dir({}, settings, "HK") == tmp_path / "HK"
    assert site_dir({"site-dir": "/srv/x"}, settings, "HK").as_posix() == "/srv/x"


def _variant(tmp_path, edit) -> str:
    config = yaml.safe_load(open(TINY_CONFIG))
    edit(config)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _callback(config) -> dict:
    return config["trainer"]["callbacks"][0]["init_args"]


def test_experiments_the_adapter_cannot_run_are_refused(tmp_path):
    cases = [
        (lambda c: _callback(c).update(method="fedbn"), "method='fedbn' is not supported"),
        (lambda c: _callback(c).update(optimizer_state="keep"), "optimizer_state='keep'"),
        (lambda c: c["data"].pop("sites"), "data.sites must list"),
        (lambda c: c["trainer"].pop("callbacks"), "one FederatedTrainer"),
        (lambda c: c["model"]["init_args"].update(bogus=1), "not a valid experiment config"),
        (lambda c: c["trainer"].update(precision="bf16-true"),
         "trainer.precision='bf16-true' is not supported by the Flower adapter"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            load_experiment(_variant(tmp_path, edit))
    with pytest.raises(ValueError, match="missing.yaml"):
        load_experiment(str(tmp_path / "missing.yaml"))
