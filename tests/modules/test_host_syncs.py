"""A federated fit, and a test-time routing fit, read nothing back from the device at every
training step.

On a GPU each read-back (``.item()``, ``bool(tensor)``, ``float(tensor)``, ``tolist()``,
``.cpu()``) waits for every queued kernel, so a read per step leaves the GPU idle while the host
prepares the next one. On the CPU nothing waits, so the reads are counted instead: ours and the
ones Lightning makes for us (progress-bar values are turned into numbers at every batch end)
must not grow with the steps.
"""

import traceback
from contextlib import contextmanager

import torch

from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.modules.routing import RoutingModule
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer
from tests.modules.test_routing import write_space


@contextmanager
def _counting_reads(monkeypatch):
    """Collects the stacks of read-backs made under Lightning's loops; not by the optimizer
    (it reads its step count on the CPU anyway) and not in ``on_before_batch_transfer`` (it
    runs before the batch moves to the device: those are CPU reads there too)."""
    reads: list[str] = []

    def counting(original):
        def read(self, *args, **kwargs):
            stack = "".join(traceback.format_stack(limit=25))
            if "lightning/pytorch" in stack and not any(
                    skip in stack for skip in ("torch/optim", "on_before_batch_transfer")):
                reads.append(stack)
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__float__", "tolist", "cpu"):
            patch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        yield reads


def _reads_during_fit(root, batch_size: int, monkeypatch) -> tuple[list[str], int]:
    with _counting_reads(monkeypatch) as reads:
        trainer = tiny_trainer(2, [FederatedTrainer()], root, enable_progress_bar=True,
                               limit_val_batches=0)
        trainer.fit(tiny_module(), datamodule=tiny_datamodule(batch_size=batch_size))
    assert "train/round_loss" in trainer.progress_bar_metrics
    return reads, trainer.global_step


def test_lightning_reads_back_per_round_not_per_step(tmp_path, monkeypatch):
    many, many_steps = _reads_during_fit(tmp_path / "a", 1, monkeypatch)
    few, few_steps = _reads_during_fit(tmp_path / "b", 4, monkeypatch)
    assert many_steps >= 3 * few_steps
    per_step = [r for r in many if "on_batch_end" in r or "training_step" in r]
    assert not per_step, per_step[0]
    assert len(many) == len(few)


def _reads_during_routing_fit(root, space, batch_size: int, monkeypatch) -> tuple[list[str], int]:
    dm = tiny_datamodule(outside=["UCL"], train_on="outside", batch_size=batch_size)
    with _counting_reads(monkeypatch) as reads:
        trainer = tiny_trainer(2, [], root, enable_progress_bar=True, limit_val_batches=0)
        trainer.fit(RoutingModule(space, eval_mode="online"), datamodule=dm)
    assert "adapt/pass_loss" in trainer.progress_bar_metrics
    return reads, trainer.global_step


def test_routing_fit_reads_back_per_pass_not_per_step(tmp_path, monkeypatch):
    """Online mode stores every step's predictions: on the device, keyed by (case, slice) read
    before the batch moves."""
    space = write_space(tmp_path / "routing_space.pt")
    many, many_steps = _reads_during_routing_fit(tmp_path / "a", space, 1, monkeypatch)
    few, few_steps = _reads_during_routing_fit(tmp_path / "b", space, 4, monkeypatch)
    assert many_steps >= 3 * few_steps
    per_step = [r for r in many if "training_step" in r or "on_batch_end" in r]
    assert not per_step, per_step[0]
    assert len(many) == len(few)
