"""The callback against a plain PyTorch FedAvg + EMA loop, determinism, and exact resume."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from iopfl_lightning.federated import FederatedTrainer, read_routing_space
from iopfl_lightning.modules.losses import SegmentationLoss
from iopfl_lightning.modules.routing_experts import load_experts
from iopfl_lightning.nets import build_from_spec
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

ALPHA = 0.3
ROUNDS = 2


def plain_fedavg_ema(init_state, spec, dm, rounds, alpha, lr=1e-3):
    """FedAvg + IOP-FL EMA written out with nothing but torch, for comparison."""
    net = build_from_spec(spec)
    net.load_state_dict(init_state)
    counts = dm.client_sample_counts()
    loss_fn = SegmentationLoss("dice")
    global_state = copy.deepcopy(init_state)
    personalized = {}
    loader = dm.train_dataloader()
    for r in range(rounds):
        loader.batch_sampler.set_epoch(r)
        by_client = {}
        for batch in loader:
            by_client.setdefault(int(batch["client"][0]), []).append(batch)
        locals_ = {}
        for client, batches in sorted(by_client.items()):
            net.load_state_dict(global_state)
            net.train()
            opt = torch.optim.Adam(net.parameters(), lr=lr, amsgrad=True)  # fresh per client
            for batch in batches:
                opt.zero_grad()
                loss_fn(net(batch["image"]), batch["mask"]).backward()
                opt.step()
            locals_[client] = copy.deepcopy(net.state_dict())
        total = sum(counts[c] for c in locals_)
        new_global = {}
        for k, v in global_state.items():
            if torch.is_floating_point(v):
                new_global[k] = sum(locals_[c][k] * (counts[c] / total) for c in locals_)
            else:
                new_global[k] = torch.stack([locals_[c][k] for c in locals_]).amax(0)
        global_state = new_global
        for c, w in locals_.items():
            if c not in personalized:
                personalized[c] = copy.deepcopy(w)
            else:
                personalized[c] = {
                    k: alpha * personalized[c][k] + (1 - alpha) * w[k]
                    if torch.is_floating_point(w[k]) else w[k].clone()
                    for k in w
                }
    return global_state, personalized


# Tolerance: after one round the callback and the loop agree to 1.2e-7 (the callback averages
# updates w_k - g, the loop averages weights: the same sum in another float order). In round 2
# Adam's normalised steps amplify those 1e-7 differences to about 1e-5 in a few weights, still
# 100x below one Adam step (lr 1e-3). A wrong rule (weights, EMA, order) differs by >= 1e-3.
def _assert_states_close(a, b, atol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=1e-4, msg=k)


def test_callback_matches_plain_fedavg_ema_loop(tmp_path):
    dm = tiny_datamodule()
    module = tiny_module()
    module.setup("fit")
    init_state = copy.deepcopy(module.net.state_dict())
    callback = FederatedTrainer(alpha=ALPHA)
    tiny_trainer(ROUNDS, [callback], tmp_path, limit_val_batches=0).fit(module, datamodule=dm)

    reference_dm = tiny_datamodule()
    ref_global, ref_personal = plain_fedavg_ema(init_state, module.net_spec, reference_dm, ROUNDS, ALPHA)
    _assert_states_close(callback.global_state, ref_global)
    _assert_states_close(module.net.state_dict(), ref_global)
    assert sorted(callback.personalized) == [0, 1, 2]
    for client, state in ref_personal.items():
        _assert_states_close(callback.personalized[client], state)
    # the copies are genuinely personal: they differ from the global model and from each other
    w = "encoder1.conv1.weight"
    assert not torch.allclose(callback.personalized[0][w], callback.global_state[w])
    assert not torch.allclose(callback.personalized[0][w], callback.personalized[1][w])


def _fit(tmp_path, rounds, ckpt_path=None, callbacks=(), **fed_kwargs):
    dm = tiny_datamodule()
    module = tiny_module()
    fed = FederatedTrainer(alpha=ALPHA, **fed_kwargs)
    trainer = tiny_trainer(rounds, [fed, *callbacks], tmp_path, enable_checkpointing=bool(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return fed, module


def _assert_same_federation(a: FederatedTrainer, b: FederatedTrainer) -> None:
    for k in a.global_state:
        assert torch.equal(a.global_state[k], b.global_state[k]), k
    assert sorted(a.personalized) == sorted(b.personalized)
    for client in a.personalized:
        for k in a.personalized[client]:
            assert torch.equal(a.personalized[client][k], b.personalized[client][k]), (client, k)


def test_two_runs_are_identical_and_resume_is_exact(tmp_path):
    full, _ = _fit(tmp_path / "a", 3)
    again, _ = _fit(tmp_path / "b", 3)
    _assert_same_federation(full, again)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    _, stopped = _fit(tmp_path / "c", 2, callbacks=[ckpt])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    # dead between rounds (every client starts with a fresh Adam): hyperparameters only
    assert [s["state"] for s in saved["optimizer_states"]] == [{}]
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == stopped.hparams.lr
    resumed, module = _fit(tmp_path / "d", 3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.round == 3
    _assert_same_federation(full, resumed)
    for k in full.global_state:
        assert torch.equal(module.net.state_dict()[k], full.global_state[k]), k


@pytest.mark.parametrize("kwargs", [
    {"method": "ditto", "method_args": {"lam": 0.1}},
    {"method": "fedbn"},
    {"method": "fedprox", "method_args": {"mu": 0.1}},
    {"method": "local"},
    {"optimizer_state": "keep", "server_optimizer": "fedadam", "client_fraction": 0.67},
], ids=["ditto", "fedbn", "fedprox", "local", "keep-fedadam-fraction"])
def test_resume_is_exact_for_other_methods_and_options(tmp_path, kwargs):
    """What a method or option keeps across rounds (Ditto's personal models, FedBN's local
    norms, kept Adam states, the server optimizer's moments, the participation draw) must be in
    the checkpoint: stopping after round 2 and resuming equals the uninterrupted run."""
    full, _ = _fit(tmp_path / "a", 3, **kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    _fit(tmp_path / "c", 2, callbacks=[ckpt], **kwargs)
    resumed, _ = _fit(tmp_path / "d", 3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **kwargs)
    assert resumed.round == 3
    _assert_same_federation(full, resumed)


def test_routing_space_is_written_and_readable(tmp_path):
    dm = tiny_datamodule()
    module = tiny_module()
    fed = FederatedTrainer(alpha=ALPHA)
    trainer = tiny_trainer(1, [fed], tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    space = read_routing_space(tmp_path / "routing_space.pt")
    assert space["sites"] == dm.inside_sites and set(space["personalized"]) == set(dm.inside_sites)
    assert space["net_spec"] == module.net_spec and space["rounds"] == 1
    net = build_from_spec(space["net_spec"])
    net.load_state_dict(space["personalized"]["HK"])


def test_optimizer_state_is_reset_for_every_client(tmp_path):
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state = trainer.optimizers[0].state  # fresh: empty, or Adam's tensors all zeros
            fresh = all(not t.any() for s in state.values() for t in s.values())
            seen.append((int(batch["client"][0]), fresh))

    dm = tiny_datamodule()
    trainer = tiny_trainer(1, [FederatedTrainer(), Spy()], tmp_path, limit_val_batches=0)
    trainer.fit(tiny_module(), datamodule=dm)
    firsts = {}
    for client, n_states in seen:
        firsts.setdefault(client, n_states)
    assert firsts == {0: True, 1: True, 2: True}  # every client starts with a fresh Adam state
    assert not all(fresh for _, fresh in seen)  # (a client's later batches have moments)


def test_client_fraction_trains_a_seeded_subset(tmp_path):
    dm = tiny_datamodule()
    fed = FederatedTrainer(client_fraction=0.5, seed=3)
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, set()).add(int(batch["client"][0]))

    trainer = tiny_trainer(3, [fed, Spy()], tmp_path, limit_val_batches=0)
    trainer.fit(tiny_module(), datamodule=dm)
    for round_idx in range(3):  # rounds of different participants keep their full length
        assert sorted(seen[round_idx]) == fed.participants(round_idx)
        assert len(seen[round_idx]) == 2
    assert sorted(fed.personalized) == sorted(set().union(*seen.values()))


def test_routing_space_names_sites_that_never_trained(tmp_path, caplog):
    fed = FederatedTrainer(client_fraction=0.5, seed=3)  # one round: 2 of the 3 sites train
    trainer = tiny_trainer(1, [fed], tmp_path, limit_val_batches=0)
    with caplog.at_level("WARNING", logger="iopfl_lightning.federated.callback"):
        trainer.fit(tiny_module(), datamodule=tiny_datamodule())
    untrained = [s for k, s in enumerate(fed.sites) if k not in fed.participants(0)]
    assert len(untrained) == 1
    assert f"sites {untrained} never finished a round" in caplog.text
    space = tmp_path / "routing_space.pt"
    assert untrained[0] not in read_routing_space(space)["personalized"]
    with caplog.at_level("WARNING", logger="iopfl_lightning.modules.routing_experts"):
        experts = load_experts(space)  # outside sites route over the sites that trained
    assert experts.sites == [s for s in fed.sites if s not in untrained]
    assert len(experts.states) == 3 and f"no personalized model of {untrained}" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.5}, "alpha"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"client_fraction": 1.5}, "client_fraction"),
        ({"norm_policy": "mine"}, "norm_policy"),
    ],
)
def test_bad_arguments_are_refused_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FederatedTrainer(**kwargs)


def test_evaluating_every_other_round_trains_the_same_federation(tmp_path):
    """``check_val_every_n_epoch`` (fewer evaluations, faster rounds) changes what is measured,
    never what is trained: rounds without validation are finished at train-epoch end."""
    evaluated = []

    class Rounds(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            evaluated.append(trainer.current_epoch)

    def fit(every, callbacks=()):
        fed = FederatedTrainer(alpha=ALPHA)
        trainer = tiny_trainer(4, [fed, *callbacks], tmp_path / str(every),
                               check_val_every_n_epoch=every)
        trainer.fit(tiny_module(), datamodule=tiny_datamodule())
        return fed

    every_round = fit(1)
    every_other = fit(2, [Rounds()])
    assert evaluated == [1, 3]
    assert every_other.round == every_round.round == 4
    _assert_same_federation(every_round, every_other)


@pytest.mark.parametrize("overrides, match", [
    ({"val_check_interval": 1}, "val_check_interval=1.0.*got 1$"),  # an int: every batch
    ({"val_check_interval": 0.5}, "val_check_interval=1.0"),
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2 would step one client"),
])
def test_trainer_settings_that_break_rounds_are_refused(tmp_path, overrides, match):
    trainer = tiny_trainer(1, [FederatedTrainer()], tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        trainer.fit(tiny_module(), datamodule=tiny_datamodule())


def test_mid_round_checkpoint_is_refused_with_its_path_and_round_end_one_resumes(tmp_path,
                                                                                  caplog):
    """A checkpoint saved between client switches lacks the round's partial aggregate: resuming
    it is refused with a message naming the file, while the round-end checkpoint resumes."""
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=4, save_top_k=-1,
                            filename="{step}")
    rounds = ModelCheckpoint(dirpath=tmp_path / "rounds", save_top_k=-1, filename="{epoch}")
    with caplog.at_level("WARNING", logger="iopfl_lightning.federated.callback"):
        tiny_trainer(1, [FederatedTrainer(), steps, rounds], tmp_path, limit_val_batches=0,
                     enable_checkpointing=True).fit(tiny_module(), datamodule=tiny_datamodule())
    assert "middle of round 0 (step 4) cannot be resumed" in caplog.text
    mid = tmp_path / "steps" / "step=4.ckpt"
    with pytest.raises(ValueError, match=rf"checkpoint '{mid}' was saved in the middle of "
                                         r"round 0 \(step 4\)"):
        tiny_trainer(2, [FederatedTrainer()], tmp_path / "a").fit(
            tiny_module(), datamodule=tiny_datamodule(), ckpt_path=str(mid))
    fed = FederatedTrainer()
    tiny_trainer(2, [fed], tmp_path / "b").fit(
        tiny_module(), datamodule=tiny_datamodule(), ckpt_path=str(tmp_path / "rounds" / "epoch=0.ckpt"))
    assert fed.round == 2
