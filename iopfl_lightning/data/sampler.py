"""Batch sampler that makes one Lightning epoch one federated round.

The training dataset is the concatenation of every client's training slices. For epoch (round)
``e`` the sampler yields, for each participating client in ascending index order, that client's
batches for ``local_epochs`` passes, contiguously, so a callback can swap weights when the client
changes. Batches never mix clients. Shuffling inside a client uses a generator seeded from
``(seed, epoch, client, pass)``: a run is reproducible and a resumed run sees the same order.

Lightning 2.6 calls ``set_epoch`` on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``
(not on the batch sampler itself), so :attr:`ClientBatchSampler.sampler` is a small hook that
forwards ``set_epoch`` here. If participation changes the number of batches between rounds, run the
Trainer with ``reload_dataloaders_every_n_epochs=1``: Lightning fixes an epoch's length when the
loader is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

Participants = Callable[[int], Sequence[int]]


class _EpochHook:
    """Where Lightning looks for ``set_epoch`` (``batch_sampler.sampler``); forwards to the owner."""

    def __init__(self, owner: ClientBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class ClientBatchSampler(Sampler[list[int]]):
    """Yield index batches client by client over a concatenation of per-client datasets.

    Args:
        client_sizes: number of samples of each client, in dataset concatenation order.
        batch_size: samples per batch; a client's last batch may be smaller (``drop_last=False``).
        seed: base seed of the per-(epoch, client, pass) shuffles.
        participants: ``participants(epoch)`` -> client indices training in that round
            (None = every client).
        local_epochs: passes over each participating client's data per round.
        shuffle: shuffle within a client (False = natural order, for debugging).
        epoch: the epoch the sampler starts at (Lightning updates it through ``set_epoch``).
        pooled: centralized training: the participating clients' samples are pooled and
            shuffled together, so batches mix sites (reported as client 0 in :meth:`plan`).
    """

    def __init__(
        self,
        client_sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        participants: Participants | None = None,
        local_epochs: int = 1,
        shuffle: bool = True,
        epoch: int = 0,
        pooled: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if local_epochs <= 0:
            raise ValueError(f"local_epochs must be positive, got {local_epochs}")
        if any(n < 0 for n in client_sizes):
            raise ValueError(f"client_sizes must be >= 0, got {list(client_sizes)}")
        self.client_sizes = [int(n) for n in client_sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.client_sizes)]).astype(int)
        self.batch_size = batch_size
        self.seed = seed
        self.participants = participants
        self.local_epochs = local_epochs
        self.shuffle = shuffle
        self.epoch = epoch
        self.pooled = pooled
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        """Select the round whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def clients(self, epoch: int | None = None) -> list[int]:
        """Participating client indices of ``epoch`` (default: the current one), ascending."""
        epoch = self.epoch if epoch is None else epoch
        if self.participants is None:
            return list(range(len(self.client_sizes)))
        chosen = sorted({int(c) for c in self.participants(epoch)})
        bad = [c for c in chosen if not 0 <= c < len(self.client_sizes)]
        if bad:
            raise ValueError(
                f"participants({epoch}) returned client indices {bad}; "
                f"valid are 0..{len(self.client_sizes) - 1}"
            )
        return chosen

    def _client_batches(self, epoch: int, client: int, pass_: int) -> list[list[int]]:
        """One pass over ``client``'s samples as global-index batches."""
        n = self.client_sizes[client]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, client, pass_]).permutation(n)
        else:
            order = np.arange(n)
        order = order + self.offsets[client]
        return [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]

    def plan(self, epoch: int | None = None) -> list[tuple[int, list[int]]]:
        """``(client, batch indices)`` for every batch of ``epoch``, in yield order."""
        epoch = self.epoch if epoch is None else epoch
        if self.pooled:
            return [(0, b) for p in range(self.local_epochs) for b in self._pooled_batches(epoch, p)]
        out = []
        for client in self.clients(epoch):
            for pass_ in range(self.local_epochs):
                out += [(client, b) for b in self._client_batches(epoch, client, pass_)]
        return out

    def _pooled_batches(self, epoch: int, pass_: int) -> list[list[int]]:
        """One pass over every participating client's samples, shuffled together."""
        order = np.concatenate(
            [np.arange(self.offsets[c], self.offsets[c + 1]) for c in self.clients(epoch)]
        ).astype(int)
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch, pass_]).permutation(len(order))]
        return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    def client_batch_counts(self, epoch: int | None = None) -> dict[int, int]:
        """Number of batches each participating client yields in ``epoch`` (pooled: client 0)."""
        if self.pooled:
            total = sum(self.client_sizes[c] for c in self.clients(epoch))
            return {0: math.ceil(total / self.batch_size) * self.local_epochs}
        per_pass = {
            c: math.ceil(self.client_sizes[c] / self.batch_size) for c in self.clients(epoch)
        }
        return {c: n * self.local_epochs for c, n in per_pass.items()}

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self.plan():
            yield batch

    def __len__(self) -> int:
        return sum(self.client_batch_counts().values())
