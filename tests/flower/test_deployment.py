"""A real deployment on 127.0.0.1: SuperLink, three SuperNodes (one per site), ``flwr run``.

Two rounds on the tiny synthetic sites of tests/configs/demo_tiny.yaml. In round 2 UCL's
machine goes down (SIGTERM to its SuperNode and every process under it) while its ClientApp is
training: the round completes with the two other
sites (min-replies 2) and names UCL as missing. A new UCL SuperNode on the same site folder
then answers the final query with the personalized copy it finds on disk (from round 1). The
routing space written at the end is checked, and every process started is stopped by its id.
"""

import json

import torch

from iopfl_lightning.federated import read_routing_space
from iopfl_lightning.fileio import safe_torch_load
from tests.flower.loopback import Loopback
from tests.helpers import REPO, TINY_CONFIGS

SITES = ["BIDMC", "HK", "UCL"]


def _node_config(site: str, root) -> str:
    config = f'site-name="{site}" site-dir="{root / "sites" / site}"'
    if site == "UCL":  # a slow machine: the test stops it while it trains, not after
        config += f' config="{_slow_copy(root)}"'
    return config


def _slow_copy(root):
    """UCL's own copy of the YAML: 200 passes a round instead of 1 (about ten seconds here),
    so stopping its machine once its round-2 ClientApp is up never comes after its reply."""
    path = root / "ucl_slow.yaml"
    text = (TINY_CONFIGS / "demo_tiny.yaml").read_text()
    path.write_text(text.replace("        alpha: 0.1\n", "        alpha: 0.1\n        local_epochs: 200\n"))
    return path


def _rounds(out) -> list[dict]:
    path = out / "rounds.json"
    return json.loads(path.read_text()) if path.exists() else []


def test_loopback_deployment_survives_a_node_and_writes_the_routing_space(tmp_path):
    net = Loopback(tmp_path)
    out = tmp_path / "server"
    try:
        net.start_superlink()
        for site in SITES:
            net.start_node(site, _node_config(site, tmp_path))
        run = net.flwr_run(REPO / "experiments" / "flower", (
            f'config="{TINY_CONFIGS / "demo_tiny.yaml"}" out="{out}" num-rounds=2 '
            "min-replies=2 min-available=3 test-at-end=false torch-threads=1 query-timeout=120.0"
        ))
        net.wait_for(lambda: len(_rounds(out)) >= 1, 180, "round 1")
        round1 = net.clientapps("UCL")  # round 1's process may still be exiting: not that one
        net.wait_for(lambda: net.clientapps("UCL") - round1, 60, "UCL's round-2 ClientApp")
        net.kill_machine("UCL")
        net.start_node("UCL-restarted", _node_config("UCL", tmp_path))
        net.wait_for(lambda: run.poll() is not None, 180, "flwr run to finish")
        assert run.returncode == 0, net.tail("flwr_run", 80)
        _check_outputs(tmp_path, out, net)
    finally:
        leftover = net.close()
    assert leftover == [], f"processes still alive after close: {leftover}"


def _check_outputs(root, out, net) -> None:
    logs = net.tail("flwr_run", 400)
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2], logs
    assert rounds[0]["trained"] == SITES and rounds[0]["missing"] == []
    assert rounds[1]["trained"] == ["BIDMC", "HK"] and rounds[1]["aggregated"]
    assert [m["site"] for m in rounds[1]["missing"]] == ["UCL"], rounds[1]
    assert "site 'UCL'" in logs and "sent no update" in logs

    space = read_routing_space(out / "routing_space.pt")
    assert space["sites"] == SITES and space["rounds"] == 2
    assert space["net_spec"]["name"] == "unet"
    checkpoint = safe_torch_load(out / "checkpoint.pt")
    for key, value in space["global"].items():
        assert torch.equal(value, checkpoint["global"][key]), key
    copies = {s: safe_torch_load(next((root / "sites" / s).glob("personalized-*.pt")))
              for s in SITES}
    assert [copies[s]["rounds"] for s in SITES] == [[1, 2], [1, 2], [1]]
    for site in SITES:  # UCL's copy came back from the restarted node, read from its disk
        for key, value in space["personalized"][site].items():
            assert torch.equal(value, copies[site]["state"][key]), (site, key)
    weight = "encoder1.conv1.weight"
    assert not torch.equal(space["personalized"]["UCL"][weight], space["global"][weight])
