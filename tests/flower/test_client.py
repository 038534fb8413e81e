"""The ClientApp called in-process: what it sends, its EMA copy, and resuming from disk."""

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from iopfl_lightning.flower.client_app import make_client_app
from iopfl_lightning.flower.experiment import load_experiment
from iopfl_lightning.flower.records import record_to_state, state_to_record
from tests.flower.conftest import TINY_CONFIG, node_context

ALPHA = 0.1  # demo_tiny.yaml's FederatedTrainer alpha
IMAGE_SIDE = 32  # demo_tiny.yaml's synthetic slice size


def _message(kind: str, state=None, **config) -> Message:
    content = RecordDict({"config": ConfigRecord({"federation": "fed0", **config})})
    if state is not None:
        content["arrays"] = state_to_record(state)
    return Message(content, dst_node_id=7, message_type=kind)


def _assert_only_model_and_scalars(reply: Message, reference: dict) -> None:
    """Privacy boundary: exactly the model's arrays (keys, shapes, dtypes) and scalar metrics."""
    assert not reply.has_error(), reply.error
    kinds = {name: type(record) for name, record in reply.content.items()}
    assert set(kinds.values()) <= {ArrayRecord, MetricRecord}, kinds
    sent_bytes = 0
    for record in reply.content.values():
        if isinstance(record, MetricRecord):
            assert all(isinstance(v, int | float) for v in record.values()), dict(record)
            continue
        assert list(record.keys()) == list(reference.keys())
        for key, array in record.items():
            ref = reference[key]
            assert tuple(array.shape) == tuple(ref.shape), key
            assert array.dtype == str(ref.dtype).removeprefix("torch."), key
            assert tuple(array.shape[-2:]) != (IMAGE_SIDE, IMAGE_SIDE), key  # no image-like map
            sent_bytes += len(array.data)
        model_bytes = sum(v.numel() * v.element_size() for v in reference.values())
        assert sent_bytes <= model_bytes + 200 * len(reference)  # header bytes only on top


def _close(a: dict, b: dict) -> None:
    for key in a:
        # 1e-6: the EMA in float32 rounds differently from this float32 expression (1 ulp)
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_client_sends_only_the_model_keeps_an_ema_copy_and_resumes_it_from_disk(tmp_path):
    reference = load_experiment(TINY_CONFIG).model.net.state_dict()
    app = make_client_app({"config": TINY_CONFIG, "torch-threads": 1})
    node = {"site-name": "HK", "site-dir": str(tmp_path / "HK")}
    context = node_context(7, node)
    global0 = {k: v.clone() for k, v in reference.items()}

    first = app(_message("train", global0, **{"server-round": 1}), context)
    _assert_only_model_and_scalars(first, reference)
    metrics = first.content["metrics"]
    assert metrics["client-index"] == 1 and metrics["num-examples"] == 8  # 2 cases x 4 slices
    assert "val-global-dice" in metrics and "val-personalized-dice" in metrics
    local1 = record_to_state(first.content["arrays"])
    assert not torch.equal(local1["head.weight"], global0["head.weight"])  # it trained

    global1 = {k: v.clone() for k, v in local1.items()}  # any next global model will do
    second = app(_message("train", global1, **{"server-round": 2}), context)
    _assert_only_model_and_scalars(second, reference)
    local2 = record_to_state(second.content["arrays"])
    expected = {k: ALPHA * local1[k] + (1 - ALPHA) * local2[k] if v.is_floating_point()
                else local2[k] for k, v in local2.items()}

    stored = app(_message("query.personalized"), context)
    _assert_only_model_and_scalars(stored, reference)
    _close(record_to_state(stored.content["arrays"]), expected)
    assert stored.content["metrics"]["last-round"] == 2

    restarted = node_context(8, node)  # a new node process: empty state, same site folder
    resumed = app(_message("query.personalized"), restarted)
    _close(record_to_state(resumed.content["arrays"]), expected)
    assert resumed.content["metrics"]["updates"] == 2

    third = app(_message("train", global1, **{"server-round": 3}), restarted)
    local3 = record_to_state(third.content["arrays"])
    copy3 = record_to_state(app(_message("query.personalized"), restarted).content["arrays"])
    _close(copy3, {k: ALPHA * expected[k] + (1 - ALPHA) * local3[k]
                   if v.is_floating_point() else local3[k] for k, v in local3.items()})


def test_evaluate_reports_global_and_personalized_models_separately(tmp_path):
    from iopfl_lightning.flower.site_store import Personal, save_personal

    reference = load_experiment(TINY_CONFIG).model.net.state_dict()
    app = make_client_app({"config": TINY_CONFIG, "torch-threads": 1})
    context = node_context(3, {"partition-id": 2})  # simulation-style node: UCL
    background = {k: v.clone() for k, v in reference.items()}
    background["head.bias"] = torch.tensor([20.0, -20.0])  # predicts background everywhere
    save_personal(context, None, Personal(state_to_record(background), "UCL", 2, [1]), "fed0")
    reply = app(_message("evaluate", reference, split="test"), context)
    _assert_only_model_and_scalars(reply, reference)
    metrics = reply.content["metrics"]
    assert metrics["client-index"] == 2 and metrics["test-cases"] == 1
    assert metrics["test-global-dice"] > 0.05  # the untrained net marks (nearly) all foreground
    assert metrics["test-personalized-dice"] == 0.0  # the copy, not the global model, was run


def test_site_takes_the_ema_alpha_the_engine_uses(tmp_path):
    """``method_args: {alpha: ...}`` overrides the callback's ``alpha`` in the engine's method;
    a Flower site must build its personalized copy with that same alpha."""
    from iopfl_lightning.flower.local import SiteRuntime

    text = Path(TINY_CONFIG).read_text().replace(
        "        alpha: 0.1\n", "        alpha: 0.1\n        method_args: {alpha: 0.7}\n")
    config = tmp_path / "alpha.yaml"
    config.write_text(text)
    experiment = load_experiment(str(config))
    assert experiment.federation.method.alpha == 0.7
    assert SiteRuntime(experiment, "HK", 1, tmp_path / "HK").alpha == 0.7
