"""Each method's distinguishing rule, through real (tiny) federated fits."""

import torch
from lightning.pytorch.callbacks import Callback

from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.federated.methods import FedProx
from iopfl_lightning.federated.state import clone_state, norm_keys
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

SITES = ["BIDMC", "HK"]


class Spy(Callback):
    """Records, after the FederatedTrainer's hook, the client and the weights each client starts
    from (first batch of each client in each round), and every batch's site indices."""

    def __init__(self, fed):
        self.fed, self.starts, self.batch_sites, self.clients = fed, {}, [], set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        key = (trainer.current_epoch, self.fed._client)
        self.clients.add(self.fed._client)
        self.batch_sites.append(set(batch["client"].tolist()))
        if key not in self.starts:
            self.starts[key] = clone_state(pl_module.net.state_dict())


def _fit(tmp_path, rounds=1, **fed_kwargs):
    fed = FederatedTrainer(**fed_kwargs)
    spy = Spy(fed)
    module = tiny_module()
    module.setup("fit")
    init = clone_state(module.net.state_dict())
    trainer = tiny_trainer(rounds, [fed, spy], tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_datamodule(sites=SITES))
    return fed, spy, init, module


def _equal(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_fedbn_keeps_norms_local_and_shares_convs(tmp_path):
    fed, _, _, module = _fit(tmp_path, method="fedbn")
    models = fed.personal_models()
    norms = norm_keys(module.net)
    floats = [k for k in norms if torch.is_floating_point(models[0][k])]
    convs = set(models[0]) - norms
    assert floats and not _equal(models[0], models[1], floats)
    assert _equal(models[0], models[1], convs) and _equal(models[0], fed.global_state, convs)
    assert set(module.personalized_states) == set(SITES)


def test_fedper_keeps_the_head_local(tmp_path):
    fed, _, _, _ = _fit(tmp_path, method="fedper")
    models = fed.personal_models()
    head = ["head.weight", "head.bias"]
    body = set(models[0]) - set(head)
    assert not _equal(models[0], models[1], head)
    assert _equal(models[0], models[1], body) and _equal(models[0], fed.global_state, body)


def test_local_training_never_averages(tmp_path):
    fed, spy, init, _ = _fit(tmp_path, rounds=2, method="local")
    assert _equal(fed.global_state, init, init)  # nothing aggregated
    models = fed.personal_models()
    assert not _equal(models[0], models[1], init)
    for client in (0, 1):  # round 1 starts from the client's own round-0 weights
        assert not _equal(spy.starts[(1, client)], init, init)
        assert not _equal(spy.starts[(1, client)], spy.starts[(1, 1 - client)], init)


def test_centralized_is_one_client_on_pooled_sites(tmp_path):
    fed, spy, _, module = _fit(tmp_path, method="centralized")
    assert spy.clients == {0}
    assert any(len(s) > 1 for s in spy.batch_sites)  # batches mix sites
    assert set().union(*spy.batch_sites) == {0, 1}
    assert fed.personal_models() == {} and module.personalized_states == {}
    assert fed._keeps_optimizer()


class CountingProx(FedProx):
    calls = 0

    def before_optimizer_step(self, pl_module):
        CountingProx.calls += 1
        super().before_optimizer_step(pl_module)


def test_fedprox_hook_runs_at_every_optimizer_step(tmp_path):
    fed, spy, _, _ = _fit(tmp_path, method=CountingProx(mu=0.1))
    assert CountingProx.calls == len(spy.batch_sites) > 0
    assert fed.personal_models() == {}


def test_ditto_keeps_a_personal_model_apart_from_the_global(tmp_path):
    fed, _, init, module = _fit(tmp_path, method="ditto", method_args={"lam": 0.1})
    models = fed.personal_models()
    assert set(models) == {0, 1}
    assert not _equal(models[0], fed.global_state, init)
    assert not _equal(models[0], models[1], init)
    assert not any(v.requires_grad for v in models[0].values())
    assert set(module.personalized_states) == set(SITES)
