"""Adam picks its fused kernel on CUDA only; CPU runs keep torch's default implementation."""

import types

import pytest
import torch

from iopfl_lightning.modules.optim import adam, fused_allowed


def test_cpu_parameters_keep_the_default_adam():
    optimizer = adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3, amsgrad=True)
    assert optimizer.defaults["fused"] is None and optimizer.defaults["amsgrad"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_parameters_get_the_fused_adam():
    optimizer = adam(torch.nn.Linear(3, 2).cuda().parameters(), lr=1e-3, amsgrad=True)
    assert optimizer.defaults["fused"] is True


def _trainer(scaler, clip):
    plugin = types.SimpleNamespace(scaler=scaler)
    return types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=plugin),
                                 gradient_clip_val=clip)


def test_fused_is_refused_under_a_loss_scaler():
    """Under 16-mixed Lightning unscales before the gradient hooks and clipping only for
    non-fused optimizers (with a fused one, clipping raises); bf16 and fp32 keep the fused
    kernel, with or without clipping."""
    scaler = torch.amp.GradScaler("cpu")
    assert fused_allowed(None)
    assert fused_allowed(_trainer(None, 1.0)) and fused_allowed(_trainer(None, None))
    assert not fused_allowed(_trainer(scaler, None)) and not fused_allowed(_trainer(scaler, 1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_adam_is_not_fused_when_told_so():
    optimizer = adam(torch.nn.Linear(3, 2).cuda().parameters(), fused_ok=False)
    assert not optimizer.defaults["fused"]
