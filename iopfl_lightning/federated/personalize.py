"""Inside personalization: each site's exponential moving average of its local models.

``p_k <- alpha * p_k + (1 - alpha) * w_k`` after every round in which site k trained; the first
time a site trains its copy is ``w_k`` itself. ``alpha`` is the weight of the previous copy
(0.1 in the IOP-FL reference, so the copy is mostly this round's local model). Floating-point
entries (weights and BatchNorm statistics) are averaged; integer buffers are copied from ``w_k``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from iopfl_lightning.federated.flat import shares_layout
from iopfl_lightning.federated.state import StateDict, clone_state, copy_into, group_keys, is_float


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    return alpha


@torch.no_grad()
def ema_update(previous: StateDict | None, local: Mapping[str, Tensor], alpha: float) -> StateDict:
    """Returns the updated copy; ``previous`` is updated in place, ``local`` is never modified.

    Per float entry ``p.mul_(alpha).add_(w, alpha=1 - alpha)``, done as two foreach ops per
    (device, dtype) group of ``previous`` (over whole buffers when both are FlatStates of one
    layout: the same kernels on fewer, longer tensors).
    """
    check_alpha(alpha)
    if previous is None:
        return clone_state(local)
    if shares_layout(previous, local):
        _ema_flat(previous, local, alpha)
        return previous
    floats: list[str] = []
    ints: list[str] = []
    for k in local:
        (floats if is_float(previous[k]) else ints).append(k)
    for keys in group_keys(previous, floats):
        ps = [previous[k] for k in keys]
        torch._foreach_mul_(ps, alpha)
        torch._foreach_add_(ps, [local[k] for k in keys], alpha=1.0 - alpha)
    copy_into(previous, local, ints)
    return previous


def _ema_flat(previous, local, alpha: float) -> None:
    groups = range(len(previous.buffers))
    floats = [g for g in groups if previous.layout.is_float(g)]
    if floats:
        ps = [previous.buffers[g] for g in floats]
        torch._foreach_mul_(ps, alpha)
        torch._foreach_add_(ps, [local.buffers[g] for g in floats], alpha=1.0 - alpha)
    for g in groups:
        if g not in floats:
            previous.buffers[g].copy_(local.buffers[g])
