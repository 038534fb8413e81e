"""Which clients train in a round: a pure, seeded function of (seed, round)."""

from __future__ import annotations

import math

import torch


def participant_count(num_clients: int, fraction: float) -> int:
    """How many of ``num_clients`` take part in a round: ``ceil(fraction * num_clients)``, at
    least one (the product rounded first: 0.07 * 100 is 7.000000000000001 in floats)."""
    return max(1, math.ceil(round(fraction * num_clients, 9)))


def select_clients(num_clients: int, fraction: float, seed: int, round_idx: int) -> list[int]:
    """Sorted client indices taking part in ``round_idx``.

    ``fraction`` = 1 takes every client. Otherwise ``ceil(fraction * num_clients)`` clients
    (at least one) are drawn without replacement from a generator seeded by (seed, round), so
    the choice is reproducible and identical after a resume.
    """
    if num_clients <= 0:
        raise ValueError(f"need at least one client, got {num_clients}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"client_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(range(num_clients))
    count = participant_count(num_clients, fraction)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(round_idx))
    chosen = torch.randperm(num_clients, generator=gen)[:count]
    return sorted(int(i) for i in chosen)
