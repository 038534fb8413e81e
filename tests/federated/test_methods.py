"""Method policies without a Trainer: registry, pooled sampler, FedProx and Ditto objectives."""

import contextlib
import types

import pytest
import torch

from iopfl_lightning.data.sampler import ClientBatchSampler
from iopfl_lightning.federated import FederatedTrainer
from iopfl_lightning.federated.methods import (
    METHODS,
    Ditto,
    FederatedMethod,
    FedProx,
    IOPFLInside,
    build_method,
    register_method,
)
from iopfl_lightning.federated.methods_prox import unscale_for_hooks
from iopfl_lightning.federated.state import clone_state, norm_keys
from tests.helpers import tiny_module


def test_every_issue_method_is_registered():
    wanted = {"iopfl", "fedavg", "fedprox", "fedbn", "fedper", "ditto", "local", "centralized"}
    assert wanted <= set(METHODS)


def test_iopfl_is_the_default_and_takes_the_callback_alpha():
    fed = FederatedTrainer(alpha=0.3)
    assert isinstance(fed.method, IOPFLInside) and fed.method.alpha == 0.3
    fed = FederatedTrainer(alpha=0.3, method="iopfl", method_args={"alpha": 0.5})
    assert fed.method.alpha == 0.5


def test_bad_method_names_and_arguments_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        FederatedTrainer(method="fedsomething")
    with pytest.raises(ValueError, match="bad method_args"):
        FederatedTrainer(method="fedprox", method_args={"lambda": 1.0})
    with pytest.raises(ValueError, match="mu must be >= 0"):
        FederatedTrainer(method="fedprox", method_args={"mu": -1.0})
    with pytest.raises(ValueError, match="only apply"):
        build_method(FedProx(), {"mu": 1.0})


def test_a_new_method_is_one_registered_class():
    @register_method("test_halfway")
    class Halfway(FederatedMethod):
        deployed = "personalized"

        def update_personal(self, previous, local, client):
            return clone_state(local)

    try:
        assert isinstance(FederatedTrainer(method="test_halfway").method, Halfway)
    finally:
        METHODS.pop("test_halfway")


def test_pooled_sampler_mixes_sites_and_covers_every_sample_once():
    sampler = ClientBatchSampler([5, 4, 6], batch_size=4, seed=1, pooled=True)
    plan = sampler.plan()
    assert {c for c, _ in plan} == {0}
    flat = [i for _, b in plan for i in b]
    assert sorted(flat) == list(range(15))
    assert len(sampler) == len(plan) == 4
    site = [0] * 5 + [1] * 4 + [2] * 6
    assert any(len({site[i] for i in b}) > 1 for _, b in plan)


def _local_sgd(module, method, steps=6, lr=0.05):
    """A few plain SGD steps of ``module.net`` under ``method``; returns the distance moved."""
    net = module.net
    start = clone_state(net.state_dict())
    keys = {k for k, _ in net.named_parameters()}
    method.setup(net, keys, norm_keys(net))
    method.start_client(module, 0, start, None)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 16, 16, generator=gen)
    mask = (torch.rand(2, 16, 16, generator=gen) > 0.5).long()
    for _ in range(steps):
        opt.zero_grad()
        module.loss_fn(net(image), mask).backward()
        method.before_optimizer_step(module)
        opt.step()
    return sum((net.state_dict()[k] - start[k]).pow(2).sum() for k in keys).sqrt()


def test_fedprox_local_step_moves_less_with_mu():
    free = _local_sgd(tiny_module(), FedProx(mu=0.0))
    pulled = _local_sgd(tiny_module(), FedProx(mu=5.0))
    assert 0 < pulled < 0.9 * free


def test_fedprox_gradient_is_the_gradient_of_the_proximal_term():
    module = tiny_module()
    net = module.net
    keys = {k for k, _ in net.named_parameters()}
    method = FedProx(mu=0.7)
    method.setup(net, keys, set())
    anchor = clone_state(net.state_dict())
    method.start_client(module, 0, anchor, None)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
            p.grad = None
    term = sum((p - anchor[k]).pow(2).sum() for k, p in net.named_parameters()) * 0.7 / 2
    expected = torch.autograd.grad(term, list(net.parameters()))
    method.before_optimizer_step(module)
    for g, p in zip(expected, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


class _FakeFp16Trainer:
    """Just what Ditto reads of a 16-mixed trainer: a precision plugin with a grad scaler
    (autocast left out, so the loss is fp32 and the scaled step must equal the plain one)."""

    def __init__(self):
        plugin = types.SimpleNamespace(scaler=object(), train_step_context=contextlib.nullcontext)
        self.strategy = types.SimpleNamespace(precision_plugin=plugin)


def _ditto_personal(lam, steps=5, fp16_trainer=False, batch=None):
    """Runs Ditto's personal steps only; returns (global, personal) states."""
    module = tiny_module()
    if fp16_trainer:
        module._trainer = _FakeFp16Trainer()
    net = module.net
    method = Ditto(lam=lam, lr=0.01)
    method.setup(net, {k for k, _ in net.named_parameters()}, norm_keys(net))
    global_state = clone_state(net.state_dict())
    method.start_client(module, 0, global_state, None)
    assert (method._scaler is not None) == fp16_trainer
    gen = torch.Generator().manual_seed(0)
    batch = batch or {"image": torch.randn(2, 3, 16, 16, generator=gen),
                      "mask": (torch.rand(2, 16, 16, generator=gen) > 0.5).long()}
    for _ in range(steps):
        method.after_batch(module, batch)
    personal = method.update_personal(None, net.state_dict(), 0)
    assert all(torch.equal(net.state_dict()[k], global_state[k]) for k in global_state)  # untouched
    return global_state, personal


def _param_distance(a, b, module):
    keys = [k for k, _ in module.net.named_parameters()]
    return sum((a[k] - b[k]).pow(2).sum() for k in keys).sqrt()


def test_ditto_personal_model_differs_from_global_and_is_pulled_toward_it():
    g0, free = _ditto_personal(lam=0.0)
    g1, pulled = _ditto_personal(lam=50.0)
    module = tiny_module()
    d_free, d_pulled = _param_distance(free, g0, module), _param_distance(pulled, g1, module)
    assert d_pulled > 0 and d_free > 0
    assert d_pulled < 0.9 * d_free
    assert not pulled["head.weight"].requires_grad  # stored copies are plain tensors


def test_ditto_scales_its_personal_step_under_fp16():
    """Under 16-mixed Ditto scales its loss and unscales before the proximal term and the step,
    like Lightning's step of the global model: the result equals the unscaled fp32 step
    (power-of-two scale: exact up to float order), and a step with inf gradients is skipped."""
    _, plain = _ditto_personal(lam=0.1, steps=3)
    _, scaled = _ditto_personal(lam=0.1, steps=3, fp16_trainer=True)
    for k in plain:
        torch.testing.assert_close(scaled[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    bad = {"image": torch.full((2, 3, 16, 16), float("inf")), "mask": torch.ones(2, 16, 16).long()}
    before, after = _ditto_personal(lam=0.1, steps=1, fp16_trainer=True, batch=bad)
    params = [k for k, _ in tiny_module().net.named_parameters()]  # (norm buffers do move)
    assert all(torch.equal(after[k], before[k]) for k in params)
    _, unscaled = _ditto_personal(lam=0.1, steps=1, batch=bad)
    assert not all(torch.isfinite(unscaled[k]).all() for k in params)  # what the scaler prevents


def _scaled_fedprox_step(fused: bool, mu: float = 0.5):
    """One FedProx step the way a 16-mixed trainer takes it: scaled backward, the callback's
    hook (unscale_for_hooks, then the proximal gradient), then the scaler's step. Returns the
    parameters after the step and the gradients the method saw."""
    torch.manual_seed(0)
    module = tiny_module()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = types.SimpleNamespace(scaler=scaler)
    module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=plugin))
    net = module.net
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, fused=fused)
    method = FedProx(mu=mu)
    method.setup(net, {k for k, _ in net.named_parameters()}, norm_keys(net))
    anchor = {k: v + 0.1 for k, v in clone_state(net.state_dict()).items()}
    method.start_client(module, 0, anchor, None)
    loss = net(torch.randn(2, 3, 16, 16)).square().mean()
    scaler.scale(loss).backward()
    if not fused:  # what Lightning does itself before the hook for a non-fused optimizer
        scaler.unscale_(optimizer)
    unscale_for_hooks(module, optimizer)
    unscale_for_hooks(module, optimizer)  # a second call in the same step changes nothing
    seen = {k: p.grad.clone() for k, p in net.named_parameters()}
    method.before_optimizer_step(module)
    scaler.step(optimizer)
    scaler.update()
    return {k: p.detach().clone() for k, p in net.named_parameters()}, seen


def test_fedprox_under_fp16_sees_unscaled_gradients_with_a_fused_optimizer():
    """Lightning does not unscale before on_before_optimizer_step for optimizers that unscale in
    their own step (fused Adam on CUDA); the callback does, so FedProx adds its term to true
    gradients and the step equals the one with a non-fused optimizer."""
    fused_params, fused_seen = _scaled_fedprox_step(fused=True)
    plain_params, plain_seen = _scaled_fedprox_step(fused=False)
    for k in plain_seen:
        torch.testing.assert_close(fused_seen[k], plain_seen[k], msg=k)
        torch.testing.assert_close(fused_params[k], plain_params[k], rtol=1e-5, atol=1e-6, msg=k)


def test_unscale_for_hooks_leaves_other_precisions_alone():
    module = tiny_module()
    optimizer = torch.optim.Adam(module.net.parameters(), fused=True)
    loss = module.net(torch.randn(2, 3, 16, 16)).sum()
    loss.backward()
    grads = [p.grad.clone() for p in module.net.parameters()]
    unscale_for_hooks(module, optimizer)  # no trainer: no scaler
    plugin = types.SimpleNamespace(scaler=None)  # bf16-mixed / 32-true
    module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(precision_plugin=plugin))
    unscale_for_hooks(module, optimizer)
    assert all(torch.equal(p.grad, g) for p, g in zip(module.net.parameters(), grads, strict=True))
