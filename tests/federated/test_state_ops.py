"""The grouped (foreach) state ops against the straightforward per-key loops they replace.

Equality is bitwise (``torch.equal``): the foreach versions must keep the loops' arithmetic order.
The states mix float32 and float64 entries, a channels_last 4-D parameter, BatchNorm running
statistics and an int64 ``num_batches_tracked``.
"""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from iopfl_lightning.federated.aggregate import UpdateAccumulator
from iopfl_lightning.federated.personalize import ema_update
from iopfl_lightning.federated.state import copy_into, live_state, reset_optimizer_state

PARAMS = {"conv.weight", "bn.weight", "bn.bias", "scale", "head.weight"}
WEIGHTS = [3.0, 7.0, 11.0, 2.0, 5.0]


def _state(gen: torch.Generator, step: int = 0) -> dict[str, torch.Tensor]:
    """Key order interleaves dtypes, so grouping by dtype reorders keys internally."""
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
        "bn.weight": torch.rand(4, generator=gen) + 0.5,
        "bn.bias": torch.randn(4, generator=gen),
        "bn.running_mean": torch.randn(4, generator=gen),
        "bn.running_var": torch.rand(4, generator=gen) + 0.1,
        "bn.num_batches_tracked": torch.tensor(10 + 7 * step, dtype=torch.int64),
        "scale": torch.randn(3, generator=gen, dtype=torch.float64),  # float64 parameter
        "stat": torch.randn(6, generator=gen, dtype=torch.float64),  # float64 buffer
        "head.weight": torch.randn(2, 4, generator=gen),
    }


def _states(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [_state(gen, i) for i in range(n)]


def _assert_bitwise(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype, k
        assert torch.equal(actual[k], v), k


def _loop_aggregate(global_state, clients, weights):
    """The per-key loop the accumulator replaced: sum += (w - g) * weight; sum / total."""
    deltas, buffers, ints = {}, {}, {}
    for state, weight in zip(clients, weights, strict=True):
        for k, g in global_state.items():
            w = state[k]
            if k in PARAMS:
                v = (w - g) * weight
                deltas[k] = deltas[k].add_(v) if k in deltas else v
            elif torch.is_floating_point(g):
                v = w * weight
                buffers[k] = buffers[k].add_(v) if k in buffers else v
            else:
                ints[k] = w.clone() if k not in ints else torch.maximum(ints[k], w)
    total = sum(weights)
    return ({k: v / total for k, v in deltas.items()},
            {**{k: v / total for k, v in buffers.items()}, **ints})


def test_accumulator_is_bitwise_the_per_key_loop():
    global_state, *clients = _states(0, 1 + len(WEIGHTS))
    acc = UpdateAccumulator(global_state, PARAMS)
    for state, weight in zip(clients, WEIGHTS, strict=True):
        acc.add(state, weight)
    delta, buffers = _loop_aggregate(global_state, clients, WEIGHTS)
    _assert_bitwise(acc.mean_delta(), delta)
    _assert_bitwise(acc.mean_buffers(), buffers)
    assert int(acc.mean_buffers()["bn.num_batches_tracked"]) == 10 + 7 * len(WEIGHTS)


def test_bitwise_check_sees_a_change_of_arithmetic_order():
    """The data are rich enough that another order of the same sum is not bitwise equal."""
    global_state, *clients = _states(0, 1 + len(WEIGHTS))
    k, total = "conv.weight", sum(WEIGHTS)
    reordered = sum((s[k] * w - global_state[k] * w for s, w in zip(clients, WEIGHTS, strict=True)),
                    torch.zeros_like(global_state[k])) / total
    assert not torch.equal(reordered, _loop_aggregate(global_state, clients, WEIGHTS)[0][k])


def test_accumulator_reads_live_parameters_without_grad_or_mutation():
    global_state, client = _states(1, 2)
    live = {k: nn.Parameter(v.clone()) if k in PARAMS else v.clone() for k, v in client.items()}
    acc = UpdateAccumulator(global_state, PARAMS)
    acc.add(live, 2.0)
    delta = acc.mean_delta()
    assert not any(v.requires_grad for v in delta.values())
    _assert_bitwise({k: v.detach() for k, v in live.items()}, client)
    _assert_bitwise(delta, _loop_aggregate(global_state, [client], [2.0])[0])


def test_ema_is_bitwise_the_per_key_loop():
    first, *rounds = _states(2, 4)
    alpha = 0.1
    expected = {k: v.clone() for k, v in first.items()}
    copy_ = ema_update(None, first, alpha)
    for local in rounds:
        before = {k: v.clone() for k, v in local.items()}
        for k, w in local.items():
            p = expected[k]
            if torch.is_floating_point(p):
                p.mul_(alpha).add_(w, alpha=1.0 - alpha)
            else:
                p.copy_(w)
        returned = ema_update(copy_, local, alpha)
        assert returned is copy_
        _assert_bitwise(copy_, expected)
        _assert_bitwise(local, before)  # local untouched
    assert copy_["conv.weight"].is_contiguous(memory_format=torch.channels_last)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2, bias=False)
        self.scale = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.register_buffer("stat", torch.zeros(6, dtype=torch.float64))


def test_copy_into_writes_the_live_tensors_in_place():
    net = _Net().to(memory_format=torch.channels_last)
    state = _states(3, 1)[0]
    source = {k: v.clone() for k, v in state.items()}
    reference = copy.deepcopy(net)
    reference.load_state_dict(state)

    live = live_state(net)
    params = dict(net.named_parameters())
    ptrs = {k: v.data_ptr() for k, v in live.items()}
    assert all(live[k] is p for k, p in params.items())  # the Parameter objects themselves
    copy_into(live, state)

    assert all(p is live[k] for k, p in net.named_parameters())
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == ptrs
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.requires_grad for p in net.parameters())
    _assert_bitwise(net.state_dict(), reference.state_dict())
    _assert_bitwise(state, source)  # the source is untouched


def test_copy_into_a_subset_of_keys_and_refuses_other_shapes():
    net = _Net()
    live = live_state(net)
    before = {k: v.detach().clone() for k, v in live.items()}
    state = _states(4, 1)[0]
    copy_into(live, state, keys=["bn.running_mean", "bn.num_batches_tracked"])
    assert torch.equal(net.bn.running_mean, state["bn.running_mean"])
    assert int(net.bn.num_batches_tracked) == 10
    assert torch.equal(net.bn.running_var, before["bn.running_var"])
    with pytest.raises(ValueError, match="shape"):
        copy_into(live, {"bn.bias": torch.zeros(1)})  # copy_ alone would broadcast it


def test_live_state_goes_stale_when_the_net_is_moved():
    """Why the callback rebuilds its mapping every round: .to() replaces buffer objects."""
    net = _Net()
    stale = live_state(net)
    net.to(torch.float64)
    assert stale["bn.running_mean"] is not net.bn.running_mean
    fresh = live_state(net)
    copy_into(fresh, {"bn.running_mean": torch.full((4,), 2.0)})
    assert torch.equal(net.bn.running_mean, torch.full((4,), 2.0, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_accumulator_and_ema_match_the_loops_to_an_ulp():
    """On CUDA the multi-tensor kernels may round a division or a fused multiply-add
    differently from the per-tensor kernels: equal to float32 rounding, not bitwise."""
    states = [{k: v.cuda() for k, v in s.items()} for s in _states(3, 1 + len(WEIGHTS))]
    global_state, *clients = states
    acc = UpdateAccumulator(global_state, PARAMS)
    for state, weight in zip(clients, WEIGHTS, strict=True):
        acc.add(state, weight)
    delta, buffers = _loop_aggregate(global_state, clients, WEIGHTS)
    for got, want in ((acc.mean_delta(), delta), (acc.mean_buffers(), buffers)):
        for k, v in want.items():
            assert got[k].is_cuda, k
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
    copy_ = ema_update(None, clients[0], 0.1)
    ema_update(copy_, clients[1], 0.1)
    for k, v in copy_.items():
        want = clients[0][k] * 0.1 + clients[1][k] * 0.9 if v.is_floating_point() else clients[1][k]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.5),
])
def test_reset_optimizer_state_continues_exactly_like_a_fresh_optimizer(make):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(16, 4)

    def steps(opt, n):
        for _ in range(n):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()

    used = make(net.parameters())
    steps(used, 3)  # a previous client's moments and step counts
    start = {k: v.clone() for k, v in net.state_dict().items()}
    reset_optimizer_state(used)
    if isinstance(used, torch.optim.SGD):
        assert not used.state  # its lazy start is the first gradient, not zeros: cleared
    else:
        assert used.state and all(
            not t.any() for s in used.state.values() for t in s.values()
        )
    steps(used, 3)
    after_reset = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(start)
    steps(make(net.parameters()), 3)
    for k, v in net.state_dict().items():
        assert torch.equal(after_reset[k], v), k


def test_reset_optimizer_state_regroups_a_state_that_was_loaded_in_between():
    """The grouping is kept from reset to reset while the state tensors stay the same objects;
    a state loaded in between (a client's kept moments) is zeroed, not the stale tensors."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    reset_optimizer_state(opt)
    first = [t for s in opt.state.values() for t in s.values()]
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    reset_optimizer_state(opt)  # the same tensors: zeroed in place again
    assert [t for s in opt.state.values() for t in s.values()] == first
    assert not any(t.any() for t in first)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new tensors, the same values
    loaded = [t for s in opt.state.values() for t in s.values()]
    assert all(a is not b for a, b in zip(loaded, first, strict=True)) and any(t.any() for t in loaded)
    replaced = weakref.ref(first[0])
    del first
    gc.collect()
    assert replaced() is None  # the kept grouping does not hold the replaced tensors alive
    reset_optimizer_state(opt)
    assert not any(t.any() for s in opt.state.values() for t in s.values())
