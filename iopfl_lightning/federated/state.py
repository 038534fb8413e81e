"""Small pure helpers on state dicts (name -> tensor), shared by aggregation and personalization.

A state dict here is the full ``module.state_dict()``: parameters and buffers. Floating-point
entries are averaged / interpolated; integer entries (``num_batches_tracked``) are not, and each
function says what it does with them.

Hot paths (a client switch, an aggregation) act on ~100 small tensors, so their cost is per-op
host overhead: they use grouped ``torch._foreach_*`` ops (one call per (device, dtype) group;
multi-tensor kernels on CUDA) instead of a Python loop or ``load_state_dict``. On the CPU a
foreach op runs the same per-tensor kernels in C++, so results are bitwise those of the loop.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from iopfl_lightning.federated.flat import FlatState, shares_layout

StateDict = dict[str, Tensor]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def clone_state(state: Mapping[str, Tensor]) -> StateDict:
    """Detached copies on the same device (never aliases the live module's tensors); a
    FlatState's copy is a FlatState of the same layout (one copy per buffer)."""
    if isinstance(state, FlatState):
        return FlatState(state.layout, [b.detach().clone() for b in state.buffers])
    return {k: v.detach().clone() for k, v in state.items()}


def is_float(t: Tensor) -> bool:
    return torch.is_floating_point(t)


def live_state(net: nn.Module) -> StateDict:
    """The module's own tensors by state key (parameters as their ``Parameter`` objects).

    Reads and in-place writes through it skip ``state_dict`` / ``load_state_dict``. Moving the
    module (``.to``) replaces its buffer objects, so rebuild the mapping after a move.
    """
    return dict(net.state_dict(keep_vars=True))


def group_indices(tensors: Iterable[Tensor]) -> list[list[int]]:
    """Positions of ``tensors`` (in order) split by (device, dtype): one foreach call each."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def group_tensors(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    """``tensors`` (in order) split by (device, dtype): one foreach call each."""
    tensors = list(tensors)
    return [[tensors[i] for i in group] for group in group_indices(tensors)]


def group_keys(state: Mapping[str, Tensor], keys: Iterable[str]) -> list[list[str]]:
    """``keys`` (in order) split by the (device, dtype) of their tensor: one foreach call each."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for k in keys:
        t = state[k]
        groups.setdefault((t.device, t.dtype), []).append(k)
    return list(groups.values())


@torch.no_grad()
def copy_into(live: Mapping[str, Tensor], state: Mapping[str, Tensor],
              keys: Iterable[str] | None = None) -> None:
    """``live[k].copy_(state[k])`` for every key of ``state`` (or ``keys``), in place.

    What ``load_state_dict`` does for a matching state, as one ``_foreach_copy_`` per
    (device, dtype) pair of target and source (one copy per buffer between FlatStates of one
    layout). Shapes must match (``copy_`` would broadcast).
    """
    if keys is None and shares_layout(live, state):
        torch._foreach_copy_(live.buffers, state.buffers)
        return
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for k in state if keys is None else keys:
        dst, src = live[k], state[k]
        if dst.shape != src.shape:
            raise ValueError(f"key {k!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dsts, srcs = groups.setdefault((dst.device, dst.dtype, src.device, src.dtype), ([], []))
        dsts.append(dst)
        srcs.append(src)
    for dsts, srcs in groups.values():
        torch._foreach_copy_(dsts, srcs)


def norm_keys(net: nn.Module) -> set[str]:
    """State keys of normalization layers (affine parameters and running statistics)."""
    keys: set[str] = set()
    for name, module in net.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict().keys())
    return keys


def check_same_keys(reference: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str) -> None:
    """Raise a ValueError naming the first key that is missing, extra or of another shape."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for k, v in reference.items():
        if tuple(other[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{what}: key {k!r} has shape {tuple(other[k].shape)}, expected {tuple(v.shape)}"
            )


def subset(state: Mapping[str, Tensor], keys: Iterable[str]) -> StateDict:
    keys = set(keys)
    return {k: v for k, v in state.items() if k in keys}


def all_finite(state: Mapping[str, Tensor]) -> bool:
    """True when no floating-point entry holds NaN or inf.

    One fused max-abs reduction per dtype group (``torch._foreach_norm`` with ``ord=inf``, which
    cannot overflow and propagates NaN), then a single host sync for the whole state instead of
    one ``.item()`` per tensor. A FlatState is checked whole, per float buffer (its alignment
    gaps are zeros): first by its sum, which NaN and inf propagate into, so a finite sum proves
    every value finite (20x faster than the max-abs on a CPU); only a non-finite sum, which an
    overflow of large finite values could also give, is decided by the max-abs.
    """
    if isinstance(state, FlatState):
        floats = [b for g, b in enumerate(state.buffers) if state.layout.is_float(g) and b.numel()]
        if not floats or bool(torch.stack([b.sum().cpu() for b in floats]).isfinite().all()):
            return True
    else:
        floats = [v.detach() for v in state.values() if is_float(v) and v.numel()]
    flags = [
        torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all()
        for ts in group_tensors(floats)
    ]
    return bool(torch.stack([f.cpu() for f in flags]).all()) if flags else True


_ZEROED_WHEN_FRESH = (torch.optim.Adam, torch.optim.AdamW)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Gives ``optimizer`` a fresh state, as a newly built one would have.

    Adam and AdamW start from zero moments and step counts, so their existing state tensors
    are zeroed in place (a few foreach kernels; the same arithmetic follows as after a lazy
    start, which would allocate and fill every tensor anew at the next step). Any other
    optimizer's state is cleared: its lazy start may not be all zeros (SGD's momentum starts
    from the first gradient).
    """
    if type(optimizer) not in _ZEROED_WHEN_FRESH:
        optimizer.state.clear()
        return
    values = [v for entry in optimizer.state.values() for v in entry.values()]
    refs, groups = _ZERO_GROUPS.get(optimizer, ((), ()))
    if len(refs) != len(values) or any(r() is not v for r, v in zip(refs, values, strict=True)):
        if not all(isinstance(v, Tensor) for v in values):  # a Python step count: not zeroable
            optimizer.state.clear()
            return
        refs, groups = [weakref.ref(v) for v in values], group_indices(values)
        _ZERO_GROUPS[optimizer] = (refs, groups)
    for group in groups:
        torch._foreach_zero_([values[i] for i in group])


# Per optimizer: how its state tensors were last grouped by (device, dtype). Zeroing in place
# keeps the same tensors from client to client, so the grouping is reused while they stay the
# same objects (checked by identity at every reset, through weak references: a state loaded
# in between is grouped anew, and the replaced tensors are not kept alive here).
_ZERO_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
