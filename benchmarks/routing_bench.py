"""Test-time routing step: the project's batched routed net vs a per-sample-loop routed layer.

One step = the RoutingModule's adaptation objective (entropy + consistency between the plain
and an augmented view + shape term: two forwards), backward into the routers and the
normalization affine parameters, and one Adam step. Experts are the paper UNet's weights plus
small perturbations (E = K personalized + 1 global). The baseline swaps every routed layer's
forward for a loop over the samples of the batch (one router call, one kernel mix and one
convolution per sample), as the IOP-FL reference does; everything else is identical.
``batched`` mixes kernels (grouped convolutions, the default); ``batched_outputs`` is the same
net mixing expert outputs (``RoutingModule(mix="outputs")``: dense convolutions), both in the
requested memory format; ``variants`` has all four of mix x (channels_last, NCHW);
``batched_fp16`` (on request) the default step in ``16-mixed``, with a loss scaler;
``batched_auto`` the step with each layer's faster mix (``mix="auto"``) and the per-layer
timings behind the choice.
"""

from __future__ import annotations

import tempfile
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    MemoryMeter,
    Stopwatch,
    autocast,
    grad_scaler,
    profile_tables,
    profiler_activities,
    summary,
    sync,
)
from torch import Tensor

from iopfl_lightning.federated import write_routing_space
from iopfl_lightning.modules.compiling import compiled_or_none
from iopfl_lightning.modules.optim import adam
from iopfl_lightning.modules.routing import RoutingModule
from iopfl_lightning.nets import build_net, net_spec
from iopfl_lightning.nets.mix_choice import choose_mixes
from iopfl_lightning.nets.routed import routed_layers, set_mix
from iopfl_lightning.nets.routed_layers import RoutedConv2d, RoutedConvTranspose2d, RoutedLinear


def _loop_forward(self, x: Tensor, output_size=None) -> Tensor:
    """Per-sample routed layer (the reference's way): router, mix and conv for each sample."""
    outs = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        w = self.router(self._pool(xi))[0].to(self.expert_weight.dtype)  # [E]
        kernel = (w @ self.expert_weight).view(self.weight_shape)
        bias = None if self.expert_bias is None else w @ self.expert_bias
        if isinstance(self, RoutedConvTranspose2d):
            pad = self._output_padding(xi, output_size)
            outs.append(F.conv_transpose2d(xi, kernel, bias, self.stride, self.padding, pad,
                                           self.groups, self.dilation))
        elif isinstance(self, RoutedConv2d):
            outs.append(self._conv(xi, kernel, bias, self.groups))
        elif isinstance(self, RoutedLinear):
            outs.append(F.linear(xi, kernel, bias))
        else:
            raise TypeError(type(self).__name__)
    return torch.cat(outs)


def make_loop(module: RoutingModule) -> RoutingModule:
    for _, layer in routed_layers(module.net):
        layer.forward = types.MethodType(_loop_forward, layer)
    return module


def build_module(root: Path, features: int, experts: int, seed: int = 0,
                 **module_args) -> RoutingModule:
    """A RoutingModule over ``experts`` perturbed copies of a paper UNet (no baselines unless
    ``module_args`` says otherwise)."""
    torch.manual_seed(seed)
    spec = net_spec("unet", in_channels=3, num_classes=2, features=features)
    net = build_net(**spec)
    base = net.state_dict()
    sites = [f"site{i}" for i in range(experts - 1)]
    personalized = {
        s: {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in base.items()} for s in sites}
    path = write_routing_space(root / f"space_e{experts}.pt", net_spec=spec, sites=sites,
                               global_state=base, personalized=personalized)
    return RoutingModule(str(path), **{"baselines": [], **module_args})


def _optimizer(module: RoutingModule) -> torch.optim.Optimizer:
    """The routed net's own optimizer, as ``RoutingModule`` builds it (fused Adam on CUDA)."""
    return adam([p for p in module.net.parameters() if p.requires_grad], lr=1e-3)


def _step(module, opt, scaler, x, device, precision) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss, _ = module.routed_objective(x)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def time_steps(module, x, device, precision, steps: int, warmup: int = 1) -> dict:
    module.train()
    opt, scaler = _optimizer(module), grad_scaler(device, precision)
    for _ in range(warmup):
        _step(module, opt, scaler, x, device, precision)
    walls, cpus = [], []
    with MemoryMeter(device) as mem:
        for _ in range(steps):
            with Stopwatch(device) as sw:
                _step(module, opt, scaler, x, device, precision)
            walls.append(sw.wall)
            cpus.append(sw.cpu)
    b = x.shape[0]
    return {"step_s": summary(walls), "step_cpu_s": summary(cpus),
            "images_per_s": b / min(walls), "images_per_s_median": b / summary(walls)["median"],
            "peak_mb": mem.peak_mb, "peak_delta_mb": mem.delta_mb}


def profiled_step(module: RoutingModule, x: Tensor, device: torch.device, precision: str) -> str:
    """torch.profiler over one warm step: where a routed step's time goes, op by op."""
    module.train()
    opt, scaler = _optimizer(module), grad_scaler(device, precision)
    _step(module, opt, scaler, x, device, precision)
    sync(device)
    with torch.profiler.profile(activities=profiler_activities(device)) as prof:
        _step(module, opt, scaler, x, device, precision)
        sync(device)
    return profile_tables(prof, device, host_rows=20, device_rows=20)


@torch.no_grad()
def max_difference(batched: RoutingModule, loop: RoutingModule, x: Tensor) -> float:
    """Largest |batched - loop| of the routed net's logits on ``x`` (fp32, same weights)."""
    loop.net.load_state_dict(batched.net.state_dict())
    batched.eval()
    loop.eval()
    return (batched.net(x) - loop.net(x)).abs().max().item()


@torch.no_grad()
def mix_difference(module: RoutingModule, x: Tensor) -> float:
    """Largest |kernels - outputs| of the routed net's logits on ``x`` (fp32)."""
    module.eval()
    set_mix(module.net, "outputs")
    outputs = module.net(x)
    set_mix(module.net, "kernels")
    return (module.net(x) - outputs).abs().max().item()


def compiled_steps(module: RoutingModule, x: Tensor, device: torch.device, precision: str,
                   steps: int, mode: str) -> dict:
    """``time_steps`` with the module's adaptation forwards compiled as
    ``RoutingModule(compile=True, compile_mode=mode)`` does it, two warm-up steps (compilation,
    then the first replay); the module is set back to eager after."""
    module.__dict__["_compiled_net"] = compiled_or_none(module.net, True, mode)
    try:
        return {"mode": mode, **time_steps(module, x, device, precision, steps, warmup=2)}
    finally:
        module.__dict__["_compiled_net"] = None


def auto_steps(module: RoutingModule, x: Tensor, device: torch.device, precision: str,
               steps: int) -> dict:
    """``RoutingModule(mix="auto")``'s step: each routed convolution timed both ways at these
    shapes (``choice``: per layer, seconds of a forward + backward each way) and kept on the
    faster; the module is set back to kernels after."""
    with autocast(device, precision):
        choice = choose_mixes(module.net, lambda: module.net(x))
    try:
        return {**time_steps(module, x, device, precision, steps), "choice": choice}
    finally:
        set_mix(module.net, "kernels")


def routed_bench(features: int, size: int, batch: int, experts: int, device: torch.device,
                 precision: str, channels_last: bool, steps: int, loop_steps: int,
                 compile_mode: str | None = None, fp16: bool = False,
                 profile: bool = False, only_compiled: bool = False) -> dict:
    """Batched step at ``precision`` (+ channels_last), and the per-sample loop in fp32 (the
    reference's setting), on the same images; with ``compile_mode``, also the batched step
    through ``torch.compile`` of the routed net (``compiled``; its first steps compile); with
    ``fp16``, also the batched step in ``16-mixed`` (``batched_fp16``); with ``profile``, the
    op table of one default step (``torch_profile``). ``only_compiled`` (with
    ``compile_mode``) keeps the default eager step and the compiled one: for a second run whose
    other variants an earlier run on the same machine measured."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    lean = only_compiled and compile_mode is not None
    with tempfile.TemporaryDirectory() as tmp:
        batched = build_module(Path(tmp), features, experts).to(device)
        loop = None if lean else make_loop(build_module(Path(tmp), features, experts)).to(device)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=device)
    if lean:
        return _eager_and_compiled(batched, x, memory_format, device, precision, steps,
                                   compile_mode)
    check = max_difference(batched, loop, x[: min(batch, 2)])
    mix_check = mix_difference(batched, x[: min(batch, 2)])
    variants = {}
    for mix in ("kernels", "outputs"):
        for fmt_name, fmt in (("channels_last", torch.channels_last),
                              ("nchw", torch.contiguous_format)):
            set_mix(batched.net, mix)
            batched.net.to(memory_format=fmt)
            variants[f"{mix}_{fmt_name}"] = time_steps(
                batched, x.contiguous(memory_format=fmt), device, precision, steps)
    chosen = "channels_last" if channels_last else "nchw"
    out = {"batched": variants[f"kernels_{chosen}"],
           "batched_outputs": variants[f"outputs_{chosen}"], "variants": variants}
    set_mix(batched.net, "kernels")
    batched.net.to(memory_format=memory_format)
    out["batched_auto"] = auto_steps(batched, x.contiguous(memory_format=memory_format), device,
                                     precision, steps)
    if compile_mode is not None:
        out["compiled"] = compiled_steps(batched, x.contiguous(memory_format=memory_format),
                                         device, precision, steps, compile_mode)
    if profile:
        out["torch_profile"] = profiled_step(
            batched, x.contiguous(memory_format=memory_format), device, precision)
    out["loop_fp32"] = time_steps(loop, x, device, "32-true", loop_steps)
    out["errors"] = {}
    if fp16 and precision != "16-mixed":  # fp16 runs BatchNorm through cuDNN, bf16 natively
        try:  # an optional comparison: its failure is recorded, the other figures kept
            out["batched_fp16"] = time_steps(batched, x.contiguous(memory_format=memory_format),
                                             device, "16-mixed", steps)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            out["errors"]["batched_fp16"] = f"{type(err).__name__}: {err}"
    if precision != "32-true":
        out["batched_fp32"] = time_steps(batched, x.contiguous(memory_format=memory_format),
                                         device, "32-true", steps)
    out["speedup"] = out["batched"]["images_per_s"] / out["loop_fp32"]["images_per_s"]
    out["loop_vs_batched_max_abs_diff"] = check
    out["kernels_vs_outputs_max_abs_diff"] = mix_check
    return out


def _eager_and_compiled(module: RoutingModule, x: Tensor, memory_format: torch.memory_format,
                        device: torch.device, precision: str, steps: int, mode: str) -> dict:
    """The default eager step (mixing kernels) and the compiled one, on the same images."""
    set_mix(module.net, "kernels")
    module.net.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    eager = time_steps(module, x, device, precision, steps)
    return {"batched": eager, "compiled": compiled_steps(module, x, device, precision, steps, mode),
            "errors": {}, "only_compiled": True}
