"""Build a routed net from one architecture and E expert state dicts, and helpers around it.

``build_routed_net(net, [site_0, ..., site_{K-1}, global])`` deep-copies ``net`` and swaps
every ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear`` for its routed version holding
that layer's E expert tensors (every expert in every layer, every router trainable). All
other parameters and buffers (normalization affine parameters, running statistics) come from
the global expert, the last state by convention.

The helpers select what test-time routing trains (``router_parameters``,
``norm_affine_parameters``), force mixtures for baselines and tests (``set_gate_override``),
and record per-layer mean mixtures for routing heatmaps (``set_mixture_recording``,
``mixture_weights``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from iopfl_lightning.nets.routed_layers import (
    MIXES,
    Gate,
    Mix,
    RoutedConv2d,
    RoutedConvTranspose2d,
    RoutedLayer,
    RoutedLinear,
    RouterConfig,
    Start,
)

_ROUTABLE: tuple[type[nn.Module], ...] = (nn.ConvTranspose2d, nn.Conv2d, nn.Linear)
_NORMS: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (
        getattr(nn, name, None)
        for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm",
                     "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm")
    )
    if cls is not None
)


def _role(index: int, count: int) -> str:
    return "the global model" if index == count - 1 else f"personalized model {index}"


def _validate_states(net: nn.Module, expert_states: Sequence[Mapping[str, Tensor]]) -> None:
    """Check there are >= 2 states and each has exactly the net's keys and shapes."""
    count = len(expert_states)
    if count < 2:
        raise ValueError(
            f"need at least one personalized model plus the global model (got {count} state "
            "dict(s)); pass [site_0, ..., site_{K-1}, global] with K >= 1"
        )
    reference = net.state_dict()
    for index, state in enumerate(expert_states):
        who = f"expert {index} ({_role(index, count)})"
        missing = [key for key in reference if key not in state]
        if missing:
            raise ValueError(f"{who} is missing key {missing[0]!r} of layer "
                             f"{missing[0].rpartition('.')[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [key for key in state if key not in reference]
        if extra:
            raise ValueError(f"{who} has key {extra[0]!r} that the net does not have"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for key, expected in reference.items():
            got = state[key]
            if not isinstance(got, Tensor):
                raise ValueError(f"{who}: {key!r} is a {type(got).__name__}, not a tensor")
            if got.shape != expected.shape:
                raise ValueError(f"{who}: {key!r} (layer {key.rpartition('.')[0]!r}) has shape "
                                 f"{tuple(got.shape)} but the net expects {tuple(expected.shape)}")


def _routable(name: str, module: nn.Module) -> bool:
    """True for plain Conv2d/ConvTranspose2d/Linear; refuse subclasses that change forward."""
    for base in _ROUTABLE:
        if isinstance(module, base):
            if type(module).forward is not base.forward or (
                hasattr(base, "_conv_forward")
                and type(module)._conv_forward is not base._conv_forward  # type: ignore[attr-defined]
            ):
                raise ValueError(f"cannot route layer {name!r}: {type(module).__name__} overrides "
                                 f"the forward of {base.__name__}")
            return True
    return False


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _make_routed(name: str, module: nn.Module, states: Sequence[Mapping[str, Tensor]],
                 config: RouterConfig) -> RoutedLayer:
    """Stack one layer's expert tensors (a fresh copy, cast like the layer) and route it."""
    like = module.weight
    weight = torch.stack([s[f"{name}.weight"].detach() for s in states]).to(like.device, like.dtype)
    bias = None
    if module.bias is not None:
        bias = torch.stack([s[f"{name}.bias"].detach() for s in states]).to(like.device, like.dtype)
    if isinstance(module, nn.ConvTranspose2d):
        return RoutedConvTranspose2d.from_conv(module, weight, bias, config)
    if isinstance(module, nn.Conv2d):
        return RoutedConv2d.from_conv(module, weight, bias, config)
    return RoutedLinear.from_linear(module, weight, bias, config)


def build_routed_net(
    net: nn.Module,
    expert_states: Sequence[Mapping[str, Tensor]],
    *,
    gate: Gate = "softmax",
    start: Start = "uniform",
    hidden: int | None = None,
    normalize: bool = True,
    global_eps: float = 1e-2,
    dropout: float = 0.0,
) -> nn.Module:
    """Return a routed copy of ``net`` mixing E = K + 1 experts per layer.

    Args:
        net: Any module; its Conv2d / ConvTranspose2d / Linear layers are routed. Not modified.
        expert_states: ``[site_0, ..., site_{K-1}, global]`` state dicts of ``net``'s exact
            architecture (K >= 1). Norm parameters and all buffers come from the last one.
        gate, start, hidden, normalize, global_eps, dropout: see ``RouterConfig``.

    Raises:
        ValueError: fewer than 2 states, a state whose keys or shapes differ from ``net``
            (naming the key, its layer, the expert index and both shapes), a net with nothing
            to route, an already routed net, a net that is itself a routable layer, or a
            layer subclass with its own forward.
    """
    config = RouterConfig(gate=gate, start=start, hidden=hidden, normalize=normalize,
                          global_eps=global_eps, dropout=dropout)
    if any(isinstance(m, RoutedLayer) for m in net.modules()):
        raise ValueError("net is already routed")
    if isinstance(net, _ROUTABLE):
        raise ValueError(f"net is a bare {type(net).__name__}: a routed layer replaces a "
                         "submodule, so wrap it (e.g. nn.Sequential(layer))")
    if any(isinstance(m, nn.MultiheadAttention) for m in net.modules()):
        raise ValueError("nn.MultiheadAttention reads its projection weights directly and "
                         "cannot be routed")
    _validate_states(net, expert_states)
    routed = copy.deepcopy(net)
    routed.load_state_dict(expert_states[-1])
    targets = [(name, m) for name, m in routed.named_modules() if _routable(name, m)]
    if not targets:
        raise ValueError("net has no Conv2d, ConvTranspose2d or Linear layer to route")
    for name, module in targets:
        _set_submodule(routed, name, _make_routed(name, module, expert_states, config))
    return routed


def routed_layers(model: nn.Module) -> Iterator[tuple[str, RoutedLayer]]:
    """Yield ``(name, layer)`` for every routed layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, RoutedLayer):
            yield name, module


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All router parameters of ``model`` (what test-time routing trains besides norms)."""
    return [p for _, layer in routed_layers(model) for p in layer.router.parameters()]


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weight and bias of every BatchNorm/SyncBatchNorm/GroupNorm/InstanceNorm/LayerNorm/RMSNorm."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, _NORMS):
            params += [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                       if isinstance(p, nn.Parameter)]
    return params


def set_gate_override(model: nn.Module, weights: Tensor | None) -> None:
    """Force every routed layer's mixture to ``weights`` ([E] or [B, E]); ``None`` restores
    the routers. E.g. a one-hot on expert j reproduces expert j's kernels; ``full(1/E)`` is
    the uniform average."""
    for _, layer in routed_layers(model):
        layer.set_gate_override(weights)


def set_mix(model: nn.Module, mix: Mix) -> None:
    """Make every routed layer mix ``kernels`` or ``outputs`` (see ``nets.routed_layers``):
    the same function, computed two ways; ``benchmarks/run.py`` says which is faster where."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {list(MIXES)}, got {mix!r}")
    for _, layer in routed_layers(model):
        layer.mix = mix


def set_mixture_recording(model: nn.Module, enabled: bool = True) -> None:
    """Turn recording of each routed layer's batch-mean mixture on or off (off clears it)."""
    for _, layer in routed_layers(model):
        layer.record_mixture = enabled
        if not enabled:
            layer.last_mixture = None


def mixture_weights(model: nn.Module) -> dict[str, Tensor]:
    """Batch-mean mixture [E] of the last forward, per routed layer name (recording must be on;
    layers that have not run since are left out). Tensors stay on their device, detached."""
    return {name: layer.last_mixture for name, layer in routed_layers(model)
            if layer.last_mixture is not None}
