"""Flat state buffers: every tensor of a state dict as a view into one buffer per (device, dtype).

A client switch and an aggregation act on every tensor of the net (118 in the paper UNet). Done
per tensor, or even as grouped foreach ops, their cost is host work per tensor, and on a GPU the
queue runs dry while the host does it. When the live net, the global weights, the personalized
copies and the round's sums all keep their tensors at the same places of their own buffers, each
of those operations is one plain op over a whole buffer: a few kernels, whatever the net.

``FlatState`` is a dict (key -> view), so every dict-based code path works on it unchanged; the
hot paths (``state.copy_into``, ``state.all_finite``, ``state.clone_state``,
``personalize.ema_update``, ``aggregate.FlatAccumulator``) use the buffers when all the states
they get share one ``FlatLayout``. Within each buffer the parameters come first, so a round's
parameter deltas and buffer sums are two slices of it.

Each view starts at a multiple of 128 bytes (what vectorized kernels and cuDNN like); the gaps
are zeros in every buffer and stay zeros under every operation here (copies, sums, scaling,
EMA), so a whole-buffer NaN/inf check sees only the state's own values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_ALIGN_BYTES = 128


@dataclass(frozen=True)
class _Slot:
    group: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class FlatLayout:
    """Where each key of a state lives: buffer (one per device and dtype), offset, shape, strides.

    Strides are the tensor's own (a channels_last convolution weight stays channels_last).
    ``param_numel[g]`` is the length of buffer g's leading parameter segment.
    """

    def __init__(self, state: Mapping[str, Tensor], param_keys: Collection[str] = ()):
        self.keys = list(state)
        self.param_keys = frozenset(k for k in self.keys if k in param_keys)
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for k in sorted(self.keys, key=lambda k: k not in param_keys):  # stable: params first
            groups.setdefault((state[k].device, state[k].dtype), []).append(k)
        self.devices = [d for d, _ in groups]
        self.dtypes = [t for _, t in groups]
        self.numel: list[int] = []
        self.param_numel: list[int] = []
        self.slots: dict[str, _Slot] = {}
        for g, ((_, dtype), keys) in enumerate(groups.items()):
            align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
            offset = params_end = 0
            for k in keys:
                t = state[k]
                self.slots[k] = _Slot(g, offset, tuple(t.shape), tuple(t.stride()))
                offset += -(-t.numel() // align) * align
                if k in param_keys:
                    params_end = offset
            self.numel.append(offset)
            self.param_numel.append(params_end)

    @staticmethod
    def supports(state: Mapping[str, Tensor]) -> bool:
        """Every tensor dense (its elements fill one range) and none behind two keys (tied
        weights: flattening would untie them)."""
        ptrs = set()
        for t in state.values():
            if not _dense(t) or (t.numel() and t.data_ptr() in ptrs):
                return False
            ptrs.add(t.data_ptr())
        return True

    def is_float(self, group: int) -> bool:
        return self.dtypes[group].is_floating_point

    def zeros(self) -> list[Tensor]:
        return [torch.zeros(n, dtype=t, device=d)
                for n, t, d in zip(self.numel, self.dtypes, self.devices, strict=True)]

    def views(self, buffers: list[Tensor], keys: list[str] | None = None,
              starts: list[int] | None = None) -> dict[str, Tensor]:
        """Views of ``keys`` (default all) into ``buffers``; ``starts[g]`` is where buffer g
        begins in the layout (for a buffer that holds only a segment of it)."""
        out = {}
        for k in self.keys if keys is None else keys:
            s = self.slots[k]
            start = 0 if starts is None else starts[s.group]
            out[k] = buffers[s.group].as_strided(s.shape, s.stride, s.offset - start)
        return out


def _dense(t: Tensor) -> bool:
    """The elements fill one range of memory: the strides, sorted, are a contiguous tensor's
    for some order of the dimensions (size-1 dimensions may have any stride)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True)
                               if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class FlatState(dict):
    """A state dict whose values are views into ``buffers`` laid out by ``layout``.

    Write into it through the buffers or in place through the views; assigning a new tensor to a
    key would detach that key from the buffers, so the fast paths would no longer see it. Save it
    as ``dict(state)``: the views share their buffer's storage, which ``torch.save`` writes once,
    and a plain dict loads with ``weights_only=True`` (this class would not).
    """

    def __init__(self, layout: FlatLayout, buffers: list[Tensor],
                 values: Mapping[str, Tensor] | None = None):
        super().__init__(layout.views(buffers) if values is None else values)
        self.layout, self.buffers = layout, buffers


def shares_layout(*states: Mapping[str, Tensor]) -> bool:
    """True when every state is a FlatState of one and the same layout."""
    first = states[0]
    return isinstance(first, FlatState) and all(
        isinstance(s, FlatState) and s.layout is first.layout for s in states[1:]
    )


@torch.no_grad()
def as_flat(state: Mapping[str, Tensor], layout: FlatLayout) -> Mapping[str, Tensor]:
    """``state`` copied into fresh buffers of ``layout`` (itself if it already has that layout;
    unchanged if its keys or shapes are not the layout's)."""
    if isinstance(state, FlatState) and state.layout is layout:
        return state
    if list(state) != layout.keys or any(
        tuple(state[k].shape) != layout.slots[k].shape
        or state[k].dtype != layout.dtypes[layout.slots[k].group] for k in layout.keys
    ):
        return state
    out = FlatState(layout, layout.zeros())
    for k, v in out.items():
        v.copy_(state[k])
    return out


@torch.no_grad()
def flatten_module(net: nn.Module, param_keys: Collection[str]) -> FlatState | None:
    """Moves the net's parameters and buffers into flat buffers, in place.

    Every tensor object stays the same (``Parameter`` objects too, so an optimizer built on them
    keeps working); only its storage changes (``.data``). Returns the net's state as a FlatState
    whose values are those objects, or None (nothing changed) for a net that cannot be laid out
    flat (a tensor shared by two keys, or not dense).
    """
    state = net.state_dict(keep_vars=True)
    if not state or not FlatLayout.supports(state):
        return None
    layout = FlatLayout(state, param_keys)
    buffers = layout.zeros()
    views = layout.views(buffers)
    for k, t in state.items():
        views[k].copy_(t)
        t.data = views[k]
    return FlatState(layout, buffers, state)


@torch.no_grad()
def unflatten_module(flat: FlatState) -> None:
    """Gives each tensor of a flattened net its own storage again (same objects, same values
    and strides), so nothing outside training meets tensors that share one buffer (a
    ``safetensors`` export refuses those; saving one of them alone would write the buffer)."""
    for t in flat.values():
        t.data = t.data.clone(memory_format=torch.preserve_format)


def backs(flat: FlatState, net: nn.Module) -> bool:
    """True while ``flat``'s buffers still hold the net's tensors (moving the net, ``.to``,
    replaces them)."""
    state = net.state_dict(keep_vars=True)
    if list(state) != flat.layout.keys:
        return False
    for k, t in state.items():
        s = flat.layout.slots[k]
        buffer = flat.buffers[s.group]
        if (t.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
                or t.storage_offset() != buffer.storage_offset() + s.offset):
            return False
    return True


def detached_views(flat: FlatState) -> FlatState:
    """The same buffers with plain (non-parameter) views: what ``state_dict()`` would alias."""
    return FlatState(flat.layout, flat.buffers)
