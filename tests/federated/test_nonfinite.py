"""Numerical faults: a client whose loss turns NaN/inf is left out (or stops the run)."""

import logging

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.federated.state import all_finite
from iopfl_lightning.modules import SegmentationModule
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer


class PoisonedModule(SegmentationModule):
    """Multiplies the loss of ``clients`` in ``rounds`` by ``factor`` (NaN or inf): an injected fault."""

    def __init__(self, clients: set[int], rounds: set[int], factor: float, **kwargs):
        super().__init__(**kwargs)
        self.poison = (set(clients), set(rounds), factor)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        clients, rounds, factor = self.poison
        if int(batch["client"][0]) in clients and self.current_epoch in rounds:
            loss = loss * factor
        return loss


def _poisoned(clients, rounds, factor, seed=0):
    reference = tiny_module(seed)
    module = PoisonedModule(clients, rounds, factor, **dict(reference.hparams))
    module.setup("fit")
    module.net.load_state_dict(reference.net.state_dict())  # same start as a clean run
    return module


class Snapshot(Callback):
    """Copies the personalized states at the start of each round."""

    def __init__(self, fed):
        self.fed, self.seen = fed, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen[trainer.current_epoch] = {
            c: {k: v.clone() for k, v in s.items()} for c, s in self.fed.personalized.items()
        }


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_finite_spots_nan_and_inf_without_overflow():
    state = {"w": torch.full((3,), 3e38), "n": torch.tensor(7)}
    assert all_finite(state)
    assert not all_finite({**state, "b": torch.tensor([1.0, float("nan")])})
    assert not all_finite({**state, "b": torch.tensor([float("-inf")], dtype=torch.float16)})


@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
def test_nonfinite_client_is_skipped_and_its_copy_untouched(tmp_path, caplog, factor):
    # client 1 (HK) blows up in round 1; round 0 is clean
    fed = FederatedTrainer(alpha=0.1)
    snap = Snapshot(fed)
    module = _poisoned(clients={1}, rounds={1}, factor=factor)
    trainer = tiny_trainer(2, [fed, snap], tmp_path, limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="iopfl_lightning.federated.callback"):
        trainer.fit(module, datamodule=tiny_datamodule())
    assert fed.nonfinite == [(1, "HK")]
    assert "client 1 ('HK') has NaN/inf weights" in caplog.text
    assert all_finite(fed.global_state) and all_finite(module.net.state_dict())
    after_round0 = snap.seen[1]
    assert _states_equal(fed.personalized[1], after_round0[1])  # not updated with NaN weights
    for c in (0, 2):  # the healthy clients moved on
        assert all_finite(fed.personalized[c])
        assert not _states_equal(fed.personalized[c], after_round0[c])


def test_all_clients_nonfinite_leaves_global_unchanged(tmp_path):
    fed = FederatedTrainer()
    module = _poisoned(clients={0, 1, 2}, rounds={0}, factor=float("nan"))
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    tiny_trainer(1, [fed], tmp_path, limit_val_batches=0).fit(module, datamodule=tiny_datamodule())
    assert [s for _, s in fed.nonfinite] == ["BIDMC", "HK", "UCL"]
    assert _states_equal(fed.global_state, start) and fed.personalized == {}


def test_raise_option_stops_with_a_clear_error(tmp_path):
    fed = FederatedTrainer(on_nonfinite="raise")
    module = _poisoned(clients={2}, rounds={0}, factor=float("inf"))
    trainer = tiny_trainer(1, [fed], tmp_path, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"round 0: client 2 \('UCL'\).*on_nonfinite='raise'"):
        trainer.fit(module, datamodule=tiny_datamodule())


def test_on_nonfinite_choice_is_validated():
    with pytest.raises(ValueError, match="on_nonfinite"):
        FederatedTrainer(on_nonfinite="ignore")


def test_a_method_trained_personal_model_that_diverges_is_checked_too(tmp_path, caplog):
    """Ditto trains its personal model itself: a NaN/inf one is not kept as the site's copy
    (the shared update was finite and still counts), or the run stops with ``raise``."""
    diverging = {"method": "ditto", "method_args": {"lam": 0.1, "lr": 1e30}}
    fed = FederatedTrainer(**diverging)
    with caplog.at_level(logging.WARNING, logger="iopfl_lightning.federated.callback"):
        tiny_trainer(1, [fed], tmp_path / "skip", limit_val_batches=0).fit(
            tiny_module(), datamodule=tiny_datamodule())
    assert "the ditto personal model of client 0 ('BIDMC') has NaN/inf weights" in caplog.text
    assert fed.personalized == {} and fed.nonfinite == [] and all_finite(fed.global_state)
    with pytest.raises(FloatingPointError, match="ditto personal model.*on_nonfinite='raise'"):
        tiny_trainer(1, [FederatedTrainer(**diverging, on_nonfinite="raise")], tmp_path / "raise",
                     limit_val_batches=0).fit(tiny_module(), datamodule=tiny_datamodule())
