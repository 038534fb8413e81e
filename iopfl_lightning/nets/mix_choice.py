"""Choose, layer by layer, how a routed net mixes its experts: timed on the device, once.

``kernels`` (one grouped convolution with every sample's mixed kernel) and ``outputs`` (one
dense convolution over the stacked experts, outputs weighted per sample) give the same result
up to float rounding, but which one is faster depends on the layer's shape and the device:
grouped convolutions with per-sample kernel gradients against E times the arithmetic in dense
kernels. ``choose_mixes`` times both for every routed convolution at the shapes of a real
batch (forward and backward, as in an adaptation step, in the caller's autocast context) and
keeps the faster, like ``torch.backends.cudnn.benchmark`` does for convolution algorithms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from iopfl_lightning.nets.routed import routed_layers
from iopfl_lightning.nets.routed_layers import MIXES, RoutedConv2d, RoutedConvTranspose2d

MixOption = Literal["kernels", "outputs", "auto"]
MIX_OPTIONS: tuple[str, ...] = (*MIXES, "auto")  # auto: choose_mixes at the first batch


def _both_mixes(layer: nn.Module) -> bool:
    """Layers that can mix outputs: (transposed) convolutions without groups."""
    return isinstance(layer, RoutedConv2d | RoutedConvTranspose2d) and layer.groups == 1


@torch.no_grad()
def layer_inputs(net: nn.Module, run: Callable[[], object]) -> dict[str, Tensor]:
    """The input of every routed layer that can mix either way, captured during ``run()``
    (a forward of ``net``; the first call of each layer is kept)."""
    captured: dict[str, Tensor] = {}
    hooks = []
    for name, layer in routed_layers(net):
        if _both_mixes(layer):
            def keep(module, args, name=name):
                captured.setdefault(name, args[0].detach())
            hooks.append(layer.register_forward_pre_hook(keep))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(layer: nn.Module, x: Tensor, mix: str, reps: int = 3) -> float:
    """Fastest of ``reps`` forward + backward passes of ``layer`` on ``x`` mixing ``mix``, in
    seconds, after one warm-up pass (cuDNN autotuning). Gradients reach the input and the
    router as in an adaptation step; the router's ``.grad`` is left as it was found."""
    previous, layer.mix = layer.mix, mix
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    x = x.detach().requires_grad_(True)
    best = float("inf")
    try:
        with torch.enable_grad():
            for rep in range(reps + 1):
                _sync(x.device)
                start = time.perf_counter()
                layer(x).float().sum().backward()
                _sync(x.device)
                if rep:  # the first pass is the warm-up
                    best = min(best, time.perf_counter() - start)
    finally:
        layer.mix = previous
        for p, g in zip(params, grads, strict=True):
            p.grad = g
    return best


def choose_mixes(net: nn.Module, run: Callable[[], object], reps: int = 3) -> dict[str, dict]:
    """Time both mixes for every routed convolution at the inputs ``run()`` gives it, set each
    layer's ``mix`` to the faster, and return ``{layer: {"kernels": s, "outputs": s,
    "chosen": mix}}``. Other routed layers keep their mix.

    The capture runs in eval mode (no running statistics move; every submodule's mode is put
    back as it was) and the random number streams are left as they were (router dropout draws
    during the timing), so choosing changes no
    result beyond the float rounding of the chosen mixes."""
    layers = dict(routed_layers(net))
    devices = sorted({str(p.device) for p in net.parameters() if p.device.type == "cuda"})
    # Each submodule's own mode, not net.train(...): a caller may keep some layers in eval
    # mode inside a training net (RoutingModule's norm="running" BatchNorms).
    modes = [(m, m.training) for m in net.modules()]
    report = {}
    with torch.random.fork_rng(devices=devices):
        try:
            net.eval()
            inputs = layer_inputs(net, run)
        finally:
            for module, training in modes:
                module.training = training
        for name, x in inputs.items():
            times = {mix: time_layer(layers[name], x, mix, reps) for mix in MIXES}
            chosen = min(times, key=times.get)
            layers[name].mix = chosen
            report[name] = {**times, "chosen": chosen}
    return report
