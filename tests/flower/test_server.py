"""The ServerApp's main over an in-process grid of real ClientApps: aggregation, faults, resume."""

import json

import pytest
import torch
from flwr.app import Message

from iopfl_lightning.federated import UpdateAccumulator, read_routing_space
from iopfl_lightning.fileio import safe_torch_load
from iopfl_lightning.flower.client_app import make_client_app
from iopfl_lightning.flower.records import record_to_state, reply_content
from iopfl_lightning.flower.server_app import run_server
from tests.flower.conftest import SITES, TINY_CONFIG, InProcessGrid, node_context, server_context

RUN_CONFIG = {"config": TINY_CONFIG, "num-rounds": 2, "test-at-end": False,
              "query-timeout": 5.0, "torch-threads": 1}


def _grid(root, apps=None, **run_config) -> InProcessGrid:
    """Three SuperNode-like nodes (ids 100-102: BIDMC, HK, UCL), each with its site folder;
    ``run_config`` is what ``_run`` gets too (a run's config is the same on every node)."""
    app = make_client_app()
    nodes = {}
    for i, site in enumerate(SITES):
        config = {"site-name": site, "site-dir": str(root / "sites" / site)}
        context = node_context(100 + i, config, {**RUN_CONFIG, **run_config})
        nodes[100 + i] = ((apps or {}).get(site, app), context)
    return InProcessGrid(nodes)


def _run(grid, out, **config):
    return run_server(grid, server_context({**RUN_CONFIG, "out": str(out), **config}))


def _train_calls(grid, round_no: int, action) -> None:
    """Runs ``action(grid)`` when the train messages of ``round_no`` are about to go out, and
    undoes node failures when anything else goes out."""
    def hook(messages):
        kinds = {m.metadata.message_type for m in messages}
        rounds = {int(m.content["config"]["server-round"]) for m in messages if "train" in kinds}
        if kinds == {"train"} and rounds == {round_no}:
            action(grid)
        elif kinds != {"train"}:
            grid.broken.clear()
            grid.down.clear()
    grid.before_send = hook


def _history(out) -> list[dict]:
    return json.loads((out / "rounds.json").read_text())


def test_round_completes_without_a_failed_site_and_aggregates_the_others(tmp_path):
    grid = _grid(tmp_path)
    _train_calls(grid, 2, lambda g: g.broken.add(102))  # UCL's node leaves during round 2
    space = read_routing_space(_run(grid, tmp_path / "out"))
    history = _history(tmp_path / "out")
    assert history[0]["trained"] == SITES
    assert history[1]["trained"] == ["BIDMC", "HK"] and history[1]["aggregated"]
    assert history[1]["missing"] == [{"node": 102, "site": "UCL"}]
    assert history[1]["errors"] == ["node left"]
    assert space["sites"] == SITES and space["sample_counts"] == {s: 8 for s in SITES}

    # round 2's global = the global it sent in round 2 + the weighted mean update of BIDMC, HK
    sent_global = record_to_state(grid.delivered[3][1].content["arrays"])
    accumulator = UpdateAccumulator(sent_global, set(_params()))
    for _, reply in grid.sent[3:5]:
        accumulator.add(record_to_state(reply.content["arrays"]), 8.0)
    expected = {**accumulator.mean_buffers(),
                **{k: sent_global[k] + d for k, d in accumulator.mean_delta().items()}}
    for key, value in space["global"].items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)


def _params() -> list[str]:
    from iopfl_lightning.flower.experiment import load_experiment

    return [k for k, _ in load_experiment(TINY_CONFIG).model.net.named_parameters()]


def test_too_few_replies_leave_the_global_model_unchanged(tmp_path):
    grid = _grid(tmp_path)
    _train_calls(grid, 2, lambda g: g.down.update({101, 102}))  # two of three never answer
    _run(grid, tmp_path / "out", **{"min-replies": 2})
    history = _history(tmp_path / "out")
    assert not history[1]["aggregated"]
    assert [m["site"] for m in history[1]["missing"]] == ["HK", "UCL"]
    assert safe_torch_load(tmp_path / "out" / "checkpoint.pt")["round"] == 2


def test_nonfinite_update_is_left_out(tmp_path):
    app = make_client_app()

    def nan_client(message: Message, context):
        reply = app(message, context)
        if message.metadata.message_type != "train":
            return reply
        state = record_to_state(reply.content["arrays"])
        state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
        return Message(reply_content(state, dict(reply.content["metrics"])), reply_to=message)

    space = read_routing_space(_run(_grid(tmp_path, {"HK": nan_client}), tmp_path / "out"))
    assert [r["nonfinite"] for r in _history(tmp_path / "out")] == [["HK"], ["HK"]]
    assert all(torch.isfinite(v).all() for v in space["global"].values() if v.is_floating_point())


def test_server_resumes_from_its_checkpoint_and_refuses_to_overwrite_it(tmp_path):
    straight = read_routing_space(_run(_grid(tmp_path / "a"), tmp_path / "a" / "out"))
    _run(_grid(tmp_path / "b"), tmp_path / "b" / "out", **{"num-rounds": 1})
    with pytest.raises(FileExistsError, match="resume=true"):
        _run(_grid(tmp_path / "b"), tmp_path / "b" / "out")
    resumed = read_routing_space(_run(_grid(tmp_path / "b"), tmp_path / "b" / "out",
                                      resume=True))
    assert resumed["rounds"] == 2
    for key, value in straight["global"].items():
        assert torch.equal(value, resumed["global"][key]), key
    for site in SITES:  # the clients found their copies of the same federation on disk
        for key, value in straight["personalized"][site].items():
            assert torch.equal(value, resumed["personalized"][site][key]), (site, key)


def test_its_routing_space_drives_an_outside_site_through_the_cli(tmp_path):
    import yaml

    from tests.helpers import fit_rows

    config = yaml.safe_load(open(TINY_CONFIG))
    config["data"]["outside"] = ["UCL"]  # the federation is BIDMC and HK; UCL stays outside
    variant = tmp_path / "inside.yaml"
    variant.write_text(yaml.safe_dump(config))
    grid = _grid(tmp_path, config=str(variant))
    del grid.nodes[102]
    space = _run(grid, tmp_path / "out", config=str(variant), **{"num-rounds": 1})
    assert read_routing_space(space)["sites"] == ["BIDMC", "HK"]
    rows = fit_rows("outside_demo_tiny.yaml", tmp_path, "--data.outside", "[UCL]",
                    "--model.routing_space", str(space), "--trainer.max_epochs", "1")
    assert [(r["site"], r["model"]) for r in rows] == [
        ("UCL", m) for m in ("global", "uniform", "ensemble", "tent", "routed")]


def test_a_site_silent_at_the_query_stays_a_federation_site_of_the_routing_space(tmp_path):
    """UCL trained every round but does not answer the final query: the routing space lists it
    (without a copy), so it can never be routed to as an unseen site."""
    from iopfl_lightning.modules.routing_experts import load_experts

    grid = _grid(tmp_path)

    def hook(messages):
        if {m.metadata.message_type for m in messages} == {"query.personalized"}:
            grid.down.add(102)
    grid.before_send = hook
    path = _run(grid, tmp_path / "out", **{"query-timeout": 1.0})
    space = read_routing_space(path)
    assert space["sites"] == SITES and sorted(space["personalized"]) == ["BIDMC", "HK"]
    assert space["sample_counts"] == {s: 8 for s in SITES}
    with pytest.raises(ValueError, match=r"outside site\(s\) \['UCL'\] took part"):
        load_experts(path, outside=["UCL"])


def test_a_server_resumed_mid_round_folds_that_round_into_each_copy_once(tmp_path):
    """The server dies after the sites trained round 2 (their copies hold it) but before its
    round-2 checkpoint; resumed, it re-sends round 2, which the sites fold into the copy as it
    was before that round: every copy equals an uninterrupted run's."""
    straight = read_routing_space(_run(_grid(tmp_path / "a"), tmp_path / "a" / "out"))

    class ServerDied(Exception):
        pass

    grid = _grid(tmp_path / "b")
    send = type(grid).send_and_receive

    def dies_after_round_2(self, messages, *, timeout=None):
        messages = list(messages)
        replies = send(self, messages, timeout=timeout)
        if any(m.metadata.message_type == "train"
               and int(m.content["config"]["server-round"]) == 2 for m in messages):
            raise ServerDied
        return replies

    grid.send_and_receive = dies_after_round_2.__get__(grid)
    with pytest.raises(ServerDied):
        _run(grid, tmp_path / "b" / "out")
    assert safe_torch_load(tmp_path / "b" / "out" / "checkpoint.pt")["round"] == 1
    resumed = read_routing_space(_run(_grid(tmp_path / "b"), tmp_path / "b" / "out",
                                      resume=True))
    for site in SITES:
        stored = safe_torch_load(next((tmp_path / "b" / "sites" / site).glob("personalized-*")))
        assert stored["rounds"] == [1, 2]
        for key, value in straight["personalized"][site].items():
            assert torch.equal(value, resumed["personalized"][site][key]), (site, key)


def test_a_server_stopped_during_the_final_test_runs_it_when_resumed(tmp_path):
    grid = _grid(tmp_path)

    class ServerDied(Exception):
        pass

    def dies_at_the_test(messages):
        if {m.metadata.message_type for m in messages} == {"evaluate"}:
            raise ServerDied
    grid.before_send = dies_at_the_test
    with pytest.raises(ServerDied):
        _run(grid, tmp_path / "out", **{"test-at-end": True})
    assert not (tmp_path / "out" / "results.csv").exists()
    _run(_grid(tmp_path), tmp_path / "out", resume=True, **{"test-at-end": True})
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(SITES)  # header, global and personalized per site


def test_a_site_that_dies_for_good_does_not_stall_the_federation(tmp_path):
    """By default a round waits for every site to be connected; one that never comes back is
    waited for at most round-timeout, then the rounds and the test go on without it."""
    grid = _grid(tmp_path)
    _train_calls(grid, 1, lambda g: None)
    grid.before_send = lambda messages: grid.down.add(102)  # UCL dies at round 1, for good
    _run(grid, tmp_path / "out", **{"round-timeout": 1.0, "query-timeout": 1.0,
                                    "test-at-end": True})
    history = _history(tmp_path / "out")
    assert [h["trained"] for h in history] == [["BIDMC", "HK"], ["BIDMC", "HK"]]
    assert all(h["aggregated"] for h in history)


def test_a_round_trains_as_many_sites_as_the_engine_draws(tmp_path):
    """client_fraction 0.5 of 3 sites: the engine trains ceil(1.5) = 2 a round (Flower's own
    sampling would take floor(1.5) = 1)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from iopfl_lightning.flower.strategy import IOPFLStrategy

    state = {"w": torch.zeros(2)}
    strategy = IOPFLStrategy(global_state=state, param_keys={"w"}, server=None, sites=SITES,
                             min_replies=1, min_available=3, fraction_train=0.5)
    grid = _grid(tmp_path)
    for fraction, count in ((0.5, 2), (0.1, 1), (1.0, 3)):
        strategy.fraction_train = fraction
        messages = strategy.configure_train(1, ArrayRecord.from_torch_state_dict(state),
                                            ConfigRecord({}), grid)
        assert len(messages) == count
        assert len({m.metadata.dst_node_id for m in messages}) == count
