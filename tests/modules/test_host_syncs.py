"""A federated fit reads nothing back from the device at every training step.

On a GPU each read-back (``.item()``, ``bool(tensor)``, ``float(tensor)``) waits for every
queued kernel, so a read per step leaves the GPU idle while the host prepares the next one.
On the CPU nothing waits, so the reads are counted instead: the ones Lightning makes for us
(progress-bar values are turned into numbers at every batch end) must not grow with the steps.
"""

import traceback

import torch

from iopfl_lightning.federated import FederatedTrainer
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer


def _reads_during_fit(root, batch_size: int, monkeypatch) -> tuple[list[str], int]:
    reads: list[str] = []

    def counting(original):
        def read(self, *args, **kwargs):
            stack = "".join(traceback.format_stack(limit=25))
            if "lightning/pytorch" in stack and "torch/optim" not in stack:
                reads.append(stack)
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__float__", "tolist"):
            patch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
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
