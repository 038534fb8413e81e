import pytest
import torch

from iopfl_lightning.federated.aggregate import ServerOptimizer, UpdateAccumulator, weighted_average


def _states(seed: int, n: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(4, 3, generator=gen),
            "bn.running_mean": torch.randn(3, generator=gen),
            "bn.num_batches_tracked": torch.tensor(10 * (i + 1)),
        }
        for i in range(n)
    ]


def test_fedavg_step_equals_weighted_mean_of_client_weights():
    global_state, *clients = _states(0, 4)
    counts = [3.0, 5.0, 2.0]
    acc = UpdateAccumulator(global_state, param_keys={"w"})
    for state, n in zip(clients, counts, strict=True):
        acc.add(state, n)
    server = ServerOptimizer({"w": global_state["w"]}, name="fedavg", lr=1.0)
    new = server.step(acc.mean_delta())
    expected = weighted_average(clients, counts)
    torch.testing.assert_close(new["w"], expected["w"], atol=1e-6, rtol=0)
    buffers = acc.mean_buffers()
    torch.testing.assert_close(buffers["bn.running_mean"], expected["bn.running_mean"])
    assert int(buffers["bn.num_batches_tracked"]) == 40  # integers: max over clients


def test_accumulator_never_mutates_client_or_global_state():
    global_state, *clients = _states(1, 3)
    before = [{k: v.clone() for k, v in s.items()} for s in (global_state, *clients)]
    acc = UpdateAccumulator(global_state, param_keys={"w"})
    for state in clients:
        acc.add(state, 1.0)
    acc.mean_delta()
    for original, state in zip(before, (global_state, *clients), strict=True):
        for k in original:
            assert torch.equal(original[k], state[k])


def test_fedavgm_accumulates_momentum_across_rounds():
    g = {"w": torch.zeros(2)}
    server = ServerOptimizer(g, name="fedavgm", lr=1.0, momentum=0.5)
    first = server.step({"w": torch.ones(2)}).copy()
    first = {k: v.clone() for k, v in first.items()}
    second = server.step({"w": torch.ones(2)})
    torch.testing.assert_close(first["w"], torch.ones(2))
    torch.testing.assert_close(second["w"], torch.full((2,), 2.5))  # 1 + (1 + 0.5 * 1)


def test_server_optimizer_state_round_trips():
    g = {"w": torch.zeros(3)}
    a = ServerOptimizer(g, name="fedadam", lr=0.1)
    a.step({"w": torch.ones(3)})
    b = ServerOptimizer({"w": a.params[0].detach().clone()}, name="fedadam", lr=0.1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.step({"w": torch.ones(3)})["w"], b.step({"w": torch.ones(3)})["w"])


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="server_optimizer"):
        ServerOptimizer({"w": torch.zeros(1)}, name="fedsgd")
    acc = UpdateAccumulator({"w": torch.zeros(1)}, {"w"})
    with pytest.raises(ValueError, match="positive"):
        acc.add({"w": torch.ones(1)}, 0.0)
    with pytest.raises(RuntimeError, match="no client"):
        acc.mean_delta()


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_server_step_equals_the_per_tensor_optimizer_loop(name):
    """The server negates the mean update with grouped foreach ops and steps a foreach
    optimizer; on the CPU that must be bitwise the textbook per-tensor loop, whatever the
    tensors' dtypes (a float64 delta for a float32 parameter is cast, as before)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (8, 3, 3, 3), "b": (8,), "c": (16, 8, 3, 3), "d": (2, 16, 1, 1)}
    start = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    server = ServerOptimizer(start, name=name, lr=0.5, momentum=0.8)
    ref = [torch.nn.Parameter(v.clone()) for v in start.values()]
    ref_opt = (torch.optim.Adam(ref, lr=0.5, betas=(0.9, 0.99), eps=1e-3, foreach=False)
               if name == "fedadam" else
               torch.optim.SGD(ref, lr=0.5, momentum=0.8 if name == "fedavgm" else 0.0,
                               foreach=False))
    for step in range(3):
        delta = {k: torch.randn(s, generator=gen, dtype=torch.float64 if k == "b" else None)
                 for k, s in shapes.items()}
        new = server.step(delta)
        for p, d in zip(ref, delta.values(), strict=True):
            p.grad = -d.to(p.dtype)
        ref_opt.step()
        for k, p in zip(shapes, ref, strict=True):
            assert new[k].dtype == torch.float32
            assert torch.equal(new[k], p.detach()), (name, step, k)
