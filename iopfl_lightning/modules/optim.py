"""Adam with the fastest implementation the parameters allow.

On CUDA, ``fused=True`` runs the whole update in one kernel per dtype group instead of the
default multi-tensor (foreach) kernels; the arithmetic is the same Adam (differences are at the
float rounding level). Everywhere else it is the multi-tensor implementation, which PyTorch
picks by default only on CUDA: on the CPU its foreach ops run the same per-tensor kernels as
the default Python loop over the parameters, so the results are bitwise the loop's (tested),
and the step is 1.15-1.4x faster (``benchmarks/optim_bench.py``). CPU's fused Adam is faster
still, but rounds differently, so CPU results would no longer repeat those of earlier versions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def adam(params: Iterable[torch.Tensor], fused_ok: bool = True, **kwargs) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused when every parameter is a CUDA float tensor and
    ``fused_ok`` (see ``fused_allowed``), else the multi-tensor (foreach) implementation."""
    params = list(params)
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    if on_cuda and fused_ok:
        return torch.optim.Adam(params, fused=True, **kwargs)
    return torch.optim.Adam(params, foreach=True, **kwargs)


def fused_allowed(trainer: Any) -> bool:
    """False under a loss scaler (``16-mixed``). Lightning unscales the gradients before
    ``on_before_optimizer_step`` and before clipping only for optimizers that do not unscale
    inside their own step: with a fused one, every gradient hook would see gradients times the
    scale, and clipping raises at the first step. bf16 and fp32 need no scaler and keep it."""
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None) is None
