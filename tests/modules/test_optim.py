"""Adam picks its fused kernel on CUDA only; elsewhere the multi-tensor one, which on the CPU
gives bitwise the results of torch's default per-parameter loop."""

import types

import pytest
import torch

from iopfl_lightning.modules.optim import adam, fused_allowed


def test_cpu_parameters_get_the_multi_tensor_adam():
    optimizer = adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3, amsgrad=True)
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is True
    assert optimizer.defaults["amsgrad"] is True


@pytest.mark.parametrize("amsgrad", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_cpu_multi_tensor_adam_equals_the_per_parameter_loop(amsgrad, weight_decay):
    """The CPU results (the demo's table, every test's numbers) must not move with the faster
    implementation: same weights, bit for bit, over several steps."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.Conv2d(8, 2, 1))
    start = [p.detach().clone() for p in net.parameters()]
    results = []
    for build in (lambda ps: adam(ps, lr=1e-2, amsgrad=amsgrad, weight_decay=weight_decay),
                  lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=amsgrad,
                                              weight_decay=weight_decay, foreach=False)):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        optimizer, gen = build(params), torch.Generator().manual_seed(0)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        results.append(params)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


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
