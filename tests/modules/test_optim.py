"""Adam picks its fused kernel on CUDA only; CPU runs keep torch's default implementation."""

import pytest
import torch

from iopfl_lightning.modules.optim import adam


def test_cpu_parameters_keep_the_default_adam():
    optimizer = adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3, amsgrad=True)
    assert optimizer.defaults["fused"] is None and optimizer.defaults["amsgrad"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_parameters_get_the_fused_adam():
    optimizer = adam(torch.nn.Linear(3, 2).cuda().parameters(), lr=1e-3, amsgrad=True)
    assert optimizer.defaults["fused"] is True
