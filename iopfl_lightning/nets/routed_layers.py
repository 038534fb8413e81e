"""Routed layers: per-sample mixtures of frozen expert kernels (IOP-FL outside personalization).

A routed layer holds the same layer's weights from E expert models (K personalized site
models plus the global model, the global one LAST) and a small trainable router. For each
sample the router maps the global-average-pooled layer input to E mixture weights, and the
layer applies the correspondingly mixed kernel and bias.

Design choices (see DESIGN.md, section 3):

- Experts are **buffers**, not parameters: they are never trained at test time, so they
  must not show up in ``model.parameters()`` (no optimizer can pick them up by accident), yet
  they are saved in ``state_dict`` and follow ``.to(device)``, ``.half()`` and ``.to(dtype)``
  like any tensor of the module. (Under DDP with ``broadcast_buffers=True`` they would be
  re-broadcast every step; test-time routing runs on one device, so this does not arise.)
- The kernels are stored **flattened**: ``expert_weight`` [E, numel] (one row per expert,
  ``expert_kernels`` views it as [E, *weight_shape]) and ``expert_bias`` [E, out] or None.
  A 5-D buffer would make ``model.to(memory_format=torch.channels_last)`` fail, and the
  flat layout makes mixing one matrix product.
- Mixing is **batched**: weights ``w`` [B, E] mix the kernels with one product
  (``einsum("be,e...->b...")``), and the batch is folded into the channel axis so that one
  grouped convolution (groups = B * original groups) applies every sample's own kernel.
  No Python loop over samples.
- Convolutions are linear in their kernel, so a layer can equally mix **outputs**
  (``mix="outputs"``): one dense convolution with all E experts' kernels stacked as output
  channels, then each sample's E outputs weighted by its mixture. E times the arithmetic
  and E times the activation memory of that layer, but dense convolutions (tensor cores,
  channels_last) instead of grouped ones, and no per-sample kernel gradient. Same result up to
  float rounding; which is faster depends on the device (``benchmarks/run.py`` measures both).
  Layers with ``groups > 1`` and linear layers always mix kernels.
- Routers start from a well-defined mixture (``start="uniform"`` or ``"global"``) unless
  ``start="random"`` asks for the reference's default ``nn.Linear`` initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Gate = Literal["softmax", "sigmoid"]
Start = Literal["uniform", "global", "random"]
Mix = Literal["kernels", "outputs"]
GATES: tuple[str, ...] = ("softmax", "sigmoid")
STARTS: tuple[str, ...] = ("uniform", "global", "random")
MIXES: tuple[str, ...] = ("kernels", "outputs")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Return ``value`` as a 2-tuple of ints (conv hyper-parameters accept int or pair)."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class RouterConfig:
    """How every router of a routed net is built and initialised.

    Attributes:
        gate: ``"softmax"`` (weights sum to 1 by construction) or ``"sigmoid"`` (independent
            gates, as in the reference code).
        start: ``"uniform"``: the last router layer starts at zero (sigmoid: bias
            ``-log(E-1)``) so every sample's mixture is exactly 1/E at step 0, for any input.
            ``"global"``: zero last-layer weight and a bias that puts ``1 - global_eps`` of
            the mixture on the global (last) expert and ``global_eps`` spread evenly over the
            others, for any input. ``"random"``: PyTorch's default ``nn.Linear`` init
            (Kaiming-uniform weights, uniform bias), which is what the reference code uses.
            With the zero-initialised last layer the first router layer receives no gradient
            on the very first step (like a zero-init residual branch); it does from step 2 on.
        hidden: Width of the router's hidden layer; ``None`` means ``2 * in_features`` (the
            reference's width).
        normalize: Sigmoid gate only: divide the gates by their sum so the mixture weights
            sum to 1 (the reference does not, so its step-0 model is a scaled kernel sum).
            Ignored for softmax, whose weights already sum to 1.
        global_eps: Mass left to the non-global experts by ``start="global"``. Softmax cannot
            put exactly all mass on one expert with finite logits; a smaller eps saturates the
            gate (gradients scale like eps), so it is kept moderate.
        dropout: Dropout between the router's layers (the reference uses 0.2); 0 disables it.
    """

    gate: Gate = "softmax"
    start: Start = "uniform"
    hidden: int | None = None
    normalize: bool = True
    global_eps: float = 1e-2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden must be a positive int or None, got {self.hidden!r}")
        if not 0.0 < self.global_eps < 1.0:
            raise ValueError(f"global_eps must be in (0, 1), got {self.global_eps!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class Router(nn.Module):
    """Maps pooled features [B, in_features] to mixture weights [B, E].

    Linear(in, hidden) -> ReLU -> Dropout -> Linear(hidden, E) -> gate. The reference's
    router is the same two linear layers with dropout but without a nonlinearity in between.
    """

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"a router needs at least 2 experts, got {num_experts}")
        hidden = config.hidden if config.hidden is not None else 2 * in_features
        self.gate = config.gate
        self.normalize = config.normalize
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(hidden, num_experts)
        self.reset_start(config)

    @torch.no_grad()
    def reset_start(self, config: RouterConfig) -> None:
        """(Re)initialise the router so that step 0 is the mixture ``config.start`` names."""
        if config.start == "random":
            self.fc1.reset_parameters()
            self.fc2.reset_parameters()
            return
        num = self.fc2.out_features
        self.fc2.weight.zero_()
        bias = torch.zeros(num, dtype=torch.float64)
        if config.start == "uniform":
            if config.gate == "sigmoid":
                bias.fill_(-math.log(num - 1))  # sigmoid(-log(E-1)) = 1/E
        else:  # global
            eps = config.global_eps
            if config.gate == "softmax":
                bias[-1] = math.log((1.0 - eps) * (num - 1) / eps)
            else:
                other = eps / (num - 1)
                bias.fill_(math.log(other / (1.0 - other)))
                bias[-1] = math.log((1.0 - eps) / eps)
        self.fc2.bias.copy_(bias)

    def forward(self, pooled: Tensor) -> Tensor:
        """Return mixture weights [B, E] for pooled features [B, in_features]."""
        logits = self.fc2(self.drop(self.act(self.fc1(pooled))))
        if self.gate == "softmax":
            return logits.softmax(dim=-1)
        gates = logits.sigmoid()
        if self.normalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates


class RoutedLayer(nn.Module):
    """Shared machinery of routed layers: expert buffers, router, override and recording.

    Attributes:
        gate_override: ``None`` (use the router) or fixed weights [E] (one mixed kernel for the
            whole batch, computed once) or [B, E] (per sample). A non-persistent buffer, so it
            follows ``.to()`` but is not saved.
        record_mixture: When True, every forward stores the batch-mean weights, detached, in
            ``last_mixture`` [E] (for routing heatmaps).
        mix: ``"kernels"`` (one mixed kernel per sample, grouped convolution) or ``"outputs"``
            (convolutions only: every expert's output, weighted per sample); see the module
            docstring. Set it on a whole net with ``nets.routed.set_mix``.
    """

    expert_weight: Tensor
    expert_bias: Tensor | None
    gate_override: Tensor | None

    def __init__(
        self,
        expert_weight: Tensor,
        expert_bias: Tensor | None,
        in_features: int,
        config: RouterConfig,
    ) -> None:
        super().__init__()
        num = expert_weight.shape[0]
        if num < 2:
            raise ValueError(f"need at least 2 experts, got expert_weight of shape "
                             f"{tuple(expert_weight.shape)}")
        if expert_bias is not None and (expert_bias.dim() != 2 or expert_bias.shape[0] != num):
            raise ValueError(f"expert_bias must be [E={num}, out], got {tuple(expert_bias.shape)}")
        self.weight_shape: tuple[int, ...] = tuple(expert_weight.shape[1:])
        self.register_buffer("expert_weight", expert_weight.detach().reshape(num, -1).clone())
        self.register_buffer(
            "expert_bias", None if expert_bias is None else expert_bias.detach().clone()
        )
        self.register_buffer("gate_override", None, persistent=False)
        self.router = Router(in_features, num, config)
        self.record_mixture = False
        self.last_mixture: Tensor | None = None
        self.mix: Mix = "kernels"

    @property
    def num_experts(self) -> int:
        """E: number of experts (K personalized + 1 global)."""
        return self.expert_weight.shape[0]

    @property
    def expert_kernels(self) -> Tensor:
        """The experts' kernels as a view [E, *weight_shape] (same layout as the source layer)."""
        return self.expert_weight.view(self.num_experts, *self.weight_shape)

    def set_gate_override(self, weights: Tensor | None) -> None:
        """Force mixture weights [E] or [B, E] (bypassing the router), or ``None`` to undo."""
        if weights is not None:
            if weights.dim() not in (1, 2) or weights.shape[-1] != self.num_experts:
                raise ValueError(f"gate override must be [E] or [B, E] with E={self.num_experts}, "
                                 f"got {tuple(weights.shape)}")
            weights = weights.detach().to(self.expert_weight.device)
        self.gate_override = weights

    def _pool(self, x: Tensor) -> Tensor:
        """Global average pool of the layer input to [B, in_features]."""
        raise NotImplementedError

    def routing_weights(self, x: Tensor) -> Tensor:
        """Mixture weights for input ``x``: [B, E] from the router, or the override."""
        w = self.gate_override if self.gate_override is not None else self.router(self._pool(x))
        if self.record_mixture:
            self.last_mixture = (w if w.dim() == 1 else w.mean(dim=0)).detach()
        return w

    def _mix(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """Mix experts: weights [E] -> (kernel [*weight_shape], bias [out]); weights [B, E] ->
        (kernels [B, *weight_shape], biases [B, out]). One matrix product each."""
        w = w.to(self.expert_weight.dtype)
        weight = (w @ self.expert_weight).reshape(*w.shape[:-1], *self.weight_shape)
        bias = None if self.expert_bias is None else w @ self.expert_bias
        return weight, bias

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, gate={self.router.gate}"


def _weigh_outputs(y: Tensor, w: Tensor, bias: Tensor | None, experts: int) -> Tensor:
    """Per-sample mixture of expert outputs: ``y`` [B, E*C, H, W] (expert-major channels),
    ``w`` [B, E], mixed ``bias`` [B, C] or None -> [B, C, H, W], in ``y``'s dtype."""
    b = y.shape[0]
    out = (y.unflatten(1, (experts, -1)) * w.to(y.dtype).view(b, experts, 1, 1, 1)).sum(1)
    if bias is not None:
        out = out + bias.to(out.dtype).view(b, -1, 1, 1)
    return out


def _keep_channels_last(out: Tensor, x: Tensor) -> Tensor:
    """Give ``out`` the channels_last layout when the input had it (dense convolutions of
    mixed outputs stay in the input's format)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


class RoutedConv2d(RoutedLayer):
    """Routed ``nn.Conv2d`` from expert kernels [E, Cout, Cin/groups, kh, kw] and biases [E, Cout].

    The batched path reshapes the input to [1, B*Cin, H, W] and the mixed kernels to
    [B*Cout, Cin/groups, kh, kw] and runs one convolution with groups = B * groups.
    """

    def __init__(
        self,
        expert_weight: Tensor,
        expert_bias: Tensor | None = None,
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        config: RouterConfig | None = None,
    ) -> None:
        if expert_weight.dim() != 5:
            raise ValueError(f"expert_weight must be [E, Cout, Cin/groups, kh, kw], "
                             f"got {tuple(expert_weight.shape)}")
        super().__init__(expert_weight, expert_bias, expert_weight.shape[2] * groups,
                         config or RouterConfig())
        self.in_channels = expert_weight.shape[2] * groups
        self.out_channels = expert_weight.shape[1]
        self.kernel_size = tuple(expert_weight.shape[3:])
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unsupported padding_mode {padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair(padding, "padding")
        self._explicit_pad = self._reversed_padding()

    def _reversed_padding(self) -> list[int]:
        """F.pad amounts (left, right, top, bottom) used when padding_mode is not zeros."""
        amounts: list[int] = []
        for d in (1, 0):
            if self.padding == "valid":
                left = right = 0
            elif self.padding == "same":
                total = self.dilation[d] * (self.kernel_size[d] - 1)
                left, right = total // 2, total - total // 2
            else:
                left = right = self.padding[d]
            amounts += [left, right]
        return amounts

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, expert_weight: Tensor, expert_bias: Tensor | None,
                  config: RouterConfig | None = None) -> RoutedConv2d:
        """Build from an ``nn.Conv2d`` (its hyper-parameters) and stacked expert tensors."""
        return cls(expert_weight, expert_bias, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode,
                   config=config)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_pad, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, groups)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return self(x.unsqueeze(0)).squeeze(0)
        w = self.routing_weights(x)
        if w.dim() == 2 and self.mix == "outputs" and self.groups == 1:
            kernels = self.expert_kernels.flatten(0, 1)  # [E*Cout, Cin, kh, kw], a view
            y = self._conv(x, kernels, None, 1)
            bias = None if self.expert_bias is None else w.to(self.expert_bias.dtype) @ self.expert_bias
            return _keep_channels_last(_weigh_outputs(y, w, bias, self.num_experts), x)
        weight, bias = self._mix(w)
        if w.dim() == 1:
            return self._conv(x, weight, bias, self.groups)
        b = x.shape[0]
        weight = weight.reshape(b * self.out_channels, *weight.shape[2:])
        bias = None if bias is None else bias.reshape(-1)
        out = self._conv(x.reshape(1, b * self.in_channels, *x.shape[2:]), weight, bias,
                         b * self.groups)
        # NCHW out even for a channels_last input: folding the batch into the channels needs
        # NCHW, so converting back would only make the next routed layer convert again.
        return out.reshape(b, self.out_channels, *out.shape[2:])

    def _pool(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class RoutedConvTranspose2d(RoutedLayer):
    """Routed ``nn.ConvTranspose2d`` from expert kernels [E, Cin, Cout/groups, kh, kw].

    Transposed-conv weights are laid out [Cin, Cout/groups, ...], so the folded kernel is
    [B*Cin, Cout/groups, kh, kw] with groups = B * groups. Only zero padding exists for
    transposed convolutions (as in PyTorch).
    """

    def __init__(
        self,
        expert_weight: Tensor,
        expert_bias: Tensor | None = None,
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        config: RouterConfig | None = None,
    ) -> None:
        if expert_weight.dim() != 5:
            raise ValueError(f"expert_weight must be [E, Cin, Cout/groups, kh, kw], "
                             f"got {tuple(expert_weight.shape)}")
        if padding_mode != "zeros":
            raise ValueError(f"transposed convolutions only support padding_mode='zeros', "
                             f"got {padding_mode!r}")
        super().__init__(expert_weight, expert_bias, expert_weight.shape[1],
                         config or RouterConfig())
        self.in_channels = expert_weight.shape[1]
        self.out_channels = expert_weight.shape[2] * groups
        self.kernel_size = tuple(expert_weight.shape[3:])
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.output_padding = _pair(output_padding, "output_padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.padding_mode = padding_mode

    @classmethod
    def from_conv(cls, conv: nn.ConvTranspose2d, expert_weight: Tensor,
                  expert_bias: Tensor | None,
                  config: RouterConfig | None = None) -> RoutedConvTranspose2d:
        """Build from an ``nn.ConvTranspose2d`` and stacked expert tensors."""
        return cls(expert_weight, expert_bias, stride=conv.stride, padding=conv.padding,
                   output_padding=conv.output_padding, dilation=conv.dilation,
                   groups=conv.groups, padding_mode=conv.padding_mode, config=config)

    def _output_padding(self, x: Tensor, output_size: Sequence[int] | None) -> tuple[int, ...]:
        """output_padding reaching ``output_size`` (like ``nn.ConvTranspose2d.forward``)."""
        if output_size is None:
            return self.output_padding
        size = list(output_size)[-2:]
        pads = []
        for d in range(2):
            base = ((x.shape[d - 2] - 1) * self.stride[d] - 2 * self.padding[d]
                    + self.dilation[d] * (self.kernel_size[d] - 1) + 1)
            extra = size[d] - base
            if not 0 <= extra < max(self.stride[d], self.dilation[d]):
                raise ValueError(f"output_size {tuple(output_size)} is not reachable from input "
                                 f"{tuple(x.shape)} with this transposed convolution")
            pads.append(extra)
        return tuple(pads)

    def forward(self, x: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        if x.dim() == 3:
            return self(x.unsqueeze(0), output_size).squeeze(0)
        out_pad = self._output_padding(x, output_size)
        w = self.routing_weights(x)
        if w.dim() == 2 and self.mix == "outputs" and self.groups == 1:
            # [E, Cin, Cout, kh, kw] -> [Cin, E*Cout, kh, kw]: expert-major output channels
            kernels = self.expert_kernels.transpose(0, 1).flatten(1, 2)
            y = F.conv_transpose2d(x, kernels, None, self.stride, self.padding, out_pad, 1,
                                   self.dilation)
            bias = None if self.expert_bias is None else w.to(self.expert_bias.dtype) @ self.expert_bias
            return _keep_channels_last(_weigh_outputs(y, w, bias, self.num_experts), x)
        weight, bias = self._mix(w)
        if w.dim() == 1:
            return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, out_pad,
                                      self.groups, self.dilation)
        b = x.shape[0]
        weight = weight.reshape(b * self.in_channels, *weight.shape[2:])
        bias = None if bias is None else bias.reshape(-1)
        out = F.conv_transpose2d(x.reshape(1, b * self.in_channels, *x.shape[2:]), weight, bias,
                                 self.stride, self.padding, out_pad, b * self.groups,
                                 self.dilation)
        return out.reshape(b, self.out_channels, *out.shape[2:])  # NCHW, as RoutedConv2d

    def _pool(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class RoutedLinear(RoutedLayer):
    """Routed ``nn.Linear`` from expert matrices [E, out, in] and biases [E, out].

    Input [B, ..., in]; the router sees the mean over the middle axes (the whole vector for
    [B, in]). The batched path is one ``torch.bmm`` with every sample's mixed matrix.
    """

    def __init__(self, expert_weight: Tensor, expert_bias: Tensor | None = None, *,
                 config: RouterConfig | None = None) -> None:
        if expert_weight.dim() != 3:
            raise ValueError(f"expert_weight must be [E, out, in], got {tuple(expert_weight.shape)}")
        super().__init__(expert_weight, expert_bias, expert_weight.shape[2],
                         config or RouterConfig())
        self.in_features = expert_weight.shape[2]
        self.out_features = expert_weight.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, expert_weight: Tensor, expert_bias: Tensor | None,
                    config: RouterConfig | None = None) -> RoutedLinear:
        """Build from an ``nn.Linear`` and stacked expert tensors."""
        return cls(expert_weight, expert_bias, config=config)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"RoutedLinear needs a batch axis: input [B, ..., in], "
                             f"got {tuple(x.shape)}")
        w = self.routing_weights(x)
        weight, bias = self._mix(w)
        if w.dim() == 1:
            return F.linear(x, weight, bias)
        b = x.shape[0]
        out = torch.bmm(x.reshape(b, -1, self.in_features), weight.transpose(1, 2))
        if bias is not None:
            out = out + bias.unsqueeze(1)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _pool(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, self.in_features).mean(dim=1)
