"""Adam with the fastest implementation the parameters allow.

On CUDA, ``fused=True`` runs the whole update in one kernel per dtype group instead of the
default multi-tensor (foreach) kernels; the arithmetic is the same Adam (differences are at the
float rounding level). Elsewhere torch's default is kept, so CPU results stay as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adam(params: Iterable[torch.Tensor], **kwargs) -> torch.optim.Adam:
    params = list(params)
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, fused=True if on_cuda else None, **kwargs)
