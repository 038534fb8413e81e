"""Soak on CPU: many short rounds, clients joining and dropping at random, injected NaN faults.

Checks that memory does not grow with the number of rounds and that every result stays finite.
Bounded: 30 rounds of a small UNet on 6 tiny sites, about 30 s on 2 busy cores (one torch
thread: with two, OpenMP spin-waiting on a contended machine made each step 20x slower).

Memory criteria, measured from round ``WARMUP`` (allocator, loaders and Adam state warmed up) to
the last round:

- the number of live tensors must not grow by more than ``TENSOR_SLACK`` (a leak of one state
  dict per round would add ~30 tensors per round, ~1000 over the soak);
- resident memory (``/proc/self/statm``) must grow by less than ``RSS_SLACK_MB``. One model state
  here is ~1.9 MB (471k float32 parameters), so keeping one extra copy per round would add
  ~47 MB over the 25 measured rounds; 24 MB leaves room for allocator noise while still catching
  any per-round leak of a model-sized object.
"""

from __future__ import annotations

import gc
import os
import random

import torch
from lightning.pytorch.callbacks import Callback

from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.federated.state import all_finite
from iopfl_lightning.modules import SegmentationModule
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

ROUNDS, WARMUP = 30, 5
SITES = ["BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL"]
TENSOR_SLACK, RSS_SLACK_MB = 16, 24.0
FAULT_RATE = 0.08


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class Faulty(SegmentationModule):
    """Seeded fault injection: each (round, client) has a FAULT_RATE chance of a NaN loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        rng = random.Random(1234)
        self.faults = {(r, c) for r in range(ROUNDS) for c in range(len(SITES))
                       if rng.random() < FAULT_RATE}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if (self.current_epoch, int(batch["client"][0])) in self.faults:
            loss = loss * float("nan")
        return loss


class Probe(Callback):
    def __init__(self, fed):
        self.fed, self.rss, self.tensors, self.losses, self.participants = fed, {}, {}, [], []

    def on_train_epoch_end(self, trainer, pl_module):
        r = trainer.current_epoch
        self.participants.append(self.fed.participants(r))
        self.losses.append(float(trainer.callback_metrics.get("train/loss", float("nan"))))
        self.rss[r] = rss_mb()
        if r in (WARMUP, ROUNDS - 1):  # a full gc scan is slow: only at both ends
            self.tensors[r] = live_tensors()


def test_soak_many_rounds_random_participation_and_faults(tmp_path):
    reference = tiny_module(features=16)
    module = Faulty(**dict(reference.hparams))
    module.setup("fit")
    fed = FederatedTrainer(client_fraction=0.5, seed=7)
    probe = Probe(fed)
    dm = tiny_datamodule(sites=SITES, synthetic={"size": 32, "slices": 2,
                                                 "cases_per_split": {"train": 1, "val": 1,
                                                                     "test": 1}})
    trainer = tiny_trainer(ROUNDS, [fed, probe], tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)

    # clients really joined and dropped: participation varied across rounds
    assert len({tuple(p) for p in probe.participants}) > 5
    assert {c for p in probe.participants for c in p} == set(range(len(SITES)))
    # every injected fault among the participants was caught, and nothing else was dropped
    injected = sorted((r, SITES[c]) for r, c in module.faults if c in fed.participants(r))
    assert injected and sorted(fed.nonfinite) == injected
    # results stay finite
    assert fed.round == ROUNDS
    assert all_finite(fed.global_state) and all_finite(module.net.state_dict())
    for state in fed.personalized.values():
        assert all_finite(state)
    # memory: bounded growth from round WARMUP to the last
    first, last = WARMUP, ROUNDS - 1
    grew_tensors = probe.tensors[last] - probe.tensors[first]
    grew_mb = probe.rss[last] - probe.rss[first]
    print(f"soak: {ROUNDS} rounds, {len(injected)} faults caught, live tensors "
          f"{probe.tensors[first]} -> {probe.tensors[last]}, RSS {probe.rss[first]:.1f} -> "
          f"{probe.rss[last]:.1f} MB")
    assert grew_tensors <= TENSOR_SLACK, probe.tensors
    assert grew_mb < RSS_SLACK_MB, probe.rss
    assert max(probe.rss[r] for r in range(WARMUP, ROUNDS)) - probe.rss[first] < RSS_SLACK_MB
