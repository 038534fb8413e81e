"""Host cost of a client switch and of an aggregation: per-key loops, grouped foreach ops, flat.

The paper UNet (features 32, 7.77 M parameters, 118 state tensors; ``--features`` for another
width) and, for each step, the old
way (``load_state_dict`` / ``state_dict`` and the per-key Python loops as they were, written out
here) against the project's per-tensor way (``copy_into`` / ``live_state``,
``UpdateAccumulator``, ``ema_update``, ``all_finite``: grouped foreach ops, ``flat_state=False``)
and its flat way (the same functions on FlatStates of one layout, ``FlatAccumulator``: whole
buffers, the default), in the same run:

- aten ops: operator calls seen by a ``TorchDispatchMode`` (top-level calls, a foreach op counts
  once): deterministic, and on CUDA each one is at least one kernel launch;
- wall time: median of ``--reps`` calls, CUDA-synchronised (on the CPU the copies and the
  arithmetic on 31 MB dominate, so expect the ops, not the time, to move there);
- equal: whether the ways give bitwise the same tensors as the old one.

Run: ``OMP_NUM_THREADS=1 python benchmarks/state_ops_bench.py [--device cuda] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iopfl_lightning.federated.aggregate import (
    FlatAccumulator,
    ServerOptimizer,
    UpdateAccumulator,
)
from iopfl_lightning.federated.flat import as_flat, detached_views, flatten_module
from iopfl_lightning.federated.personalize import ema_update
from iopfl_lightning.federated.state import all_finite, copy_into, live_state
from iopfl_lightning.nets import build_net

ALPHA = 0.1
COUNTS = [120.0, 95.0, 210.0, 60.0, 150.0]  # 5 clients' sample counts


class OldAccumulator:
    """``UpdateAccumulator`` as it was: one Python iteration and 2-3 ops per key."""

    def __init__(self, global_state, param_keys):
        self.global_state, self.param_keys = global_state, param_keys
        self.delta_sum, self.buffer_sum, self.int_max = {}, {}, {}
        self.total_weight = 0.0

    def add(self, client_state, weight):
        for k, g in self.global_state.items():
            w = client_state[k].detach()
            if k in self.param_keys:
                self._accumulate(self.delta_sum, k, (w - g) * weight)
            elif torch.is_floating_point(g):
                self._accumulate(self.buffer_sum, k, w * weight)
            else:
                prev = self.int_max.get(k)
                self.int_max[k] = w.clone() if prev is None else torch.maximum(prev, w)
        self.total_weight += weight

    @staticmethod
    def _accumulate(store, key, value):
        if key in store:
            store[key].add_(value)
        else:
            store[key] = value

    def mean(self):
        delta = {k: v / self.total_weight for k, v in self.delta_sum.items()}
        buffers = {k: v / self.total_weight for k, v in self.buffer_sum.items()}
        return delta, {**buffers, **self.int_max}


@torch.no_grad()
def old_ema(previous, local, alpha=ALPHA):
    for k, w in local.items():
        p = previous[k]
        if torch.is_floating_point(p):
            p.mul_(alpha).add_(w.detach(), alpha=1.0 - alpha)
        else:
            p.copy_(w)
    return previous


class OldServer:
    """``ServerOptimizer`` (FedAvg) as it was: one negation per key, PyTorch's default SGD
    (a Python loop over the parameters on the CPU, foreach on CUDA)."""

    def __init__(self, params):
        self.keys = list(params)
        self.params = [torch.nn.Parameter(params[k].detach().clone()) for k in self.keys]
        self.optimizer = torch.optim.SGD(self.params, lr=1.0)

    @torch.no_grad()
    def step(self, mean_delta):
        for k, p in zip(self.keys, self.params, strict=True):
            p.grad = -mean_delta[k].to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: p.detach() for k, p in zip(self.keys, self.params, strict=True)}


def new_mean(acc: UpdateAccumulator | FlatAccumulator):
    return acc.mean_delta(), acc.mean_buffers()


def old_all_finite(state) -> bool:
    """One check and one host sync per tensor."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    with _OpCounter() as counter:
        fn()
    return counter.calls


def median_ms(fns: list[Callable[[], object]], device: torch.device, reps: int) -> list[float]:
    """Median wall time of each function; the functions take turns, so drift hits them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps + 1):  # rep 0 is a warm-up
        for fn, out in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:
                out.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--features", type=int, default=32,
                        help="UNet width (32: the paper's; a small one leaves only host work)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    net = build_net("unet", in_channels=3, num_classes=2, features=args.features).to(device)
    global_state = _clone(net.state_dict())
    param_keys = {k for k, _ in net.named_parameters()}
    clients = []
    for n in COUNTS:  # trained-looking clients: weights and statistics moved, counters advanced
        state = _clone(global_state)
        for v in state.values():
            v.add_(torch.randn_like(v), alpha=0.01) if v.is_floating_point() else v.add_(int(n))
        clients.append(state)
    live = live_state(net)
    reference = build_net("unet", in_channels=3, num_classes=2, features=args.features).to(device)
    flat_net = build_net("unet", in_channels=3, num_classes=2, features=args.features).to(device)
    flat_live = flatten_module(flat_net, param_keys)
    layout = flat_live.layout
    flat_global = as_flat(global_state, layout)
    flat_clients = [as_flat(c, layout) for c in clients]
    flat_local = detached_views(flat_live)

    def accumulators(n):
        old, new = OldAccumulator(global_state, param_keys), UpdateAccumulator(global_state, param_keys)
        flat = FlatAccumulator(flat_global)
        for state, fstate, weight in zip(clients[:n], flat_clients, COUNTS, strict=False):
            old.add(state, weight)
            new.add(state, weight)
            flat.add(fstate, weight)
        return old, new, flat

    old1, new1, flat1 = accumulators(1)  # steady state: the sums exist, add() folds into them
    old5, new5, flat5 = accumulators(len(COUNTS))
    ema_old, ema_new, ema_flat = _clone(global_state), _clone(global_state), as_flat(global_state, layout)
    global_params = {k: v for k, v in global_state.items() if k in param_keys}
    server_old, server_new = OldServer(global_params), ServerOptimizer(global_params)
    server_flat = ServerOptimizer(global_params)
    flat_server_global = as_flat(global_state, layout)  # the server steps its views in place
    server_flat.bind({k: v for k, v in flat_server_global.items() if k in param_keys})
    delta_new, delta_flat = new5.mean_delta(), flat5.mean_delta()

    def load_old():
        reference.load_state_dict(clients[0])
        return reference.state_dict(keep_vars=True)  # a dict lookup per key, no aten op

    def load_new():
        copy_into(live, clients[0])
        return live

    def load_flat():
        copy_into(flat_live, flat_clients[0])
        return flat_live

    cases = {  # name: (old, per-tensor, flat, compare the results)
        "load state into net": (load_old, load_new, load_flat, True),
        "read net state": (net.state_dict, lambda: {k: v.detach() for k, v in live.items()},
                           lambda: flat_local, True),
        "NaN/inf check": (lambda: old_all_finite(clients[3]), lambda: all_finite(clients[3]),
                          lambda: all_finite(flat_clients[3]), None),
        "accumulator add": (lambda: old1.add(clients[1], COUNTS[1]),
                            lambda: new1.add(clients[1], COUNTS[1]),
                            lambda: flat1.add(flat_clients[1], COUNTS[1]), False),
        "EMA update": (lambda: old_ema(ema_old, clients[2]),
                       lambda: ema_update(ema_new, clients[2], ALPHA),
                       lambda: ema_update(ema_flat, flat_clients[2], ALPHA), True),
        "mean of 5 clients": (old5.mean, lambda: new_mean(new5), lambda: new_mean(flat5), True),
        "server step (FedAvg)": (lambda: server_old.step(delta_new),
                                 lambda: server_new.step(delta_new),
                                 lambda: server_flat.step(delta_flat), True),
    }
    rows = []
    for name, (old, new, flat, compare) in cases.items():
        if compare:  # before timing mutates the sums; each way called once
            first, second, third = old(), new(), flat()
            equal = _equal(first, second) and _equal(first, third)
        else:
            equal = old() == new() == flat() if compare is None else None
        ms_old, ms_new, ms_flat = median_ms([old, new, flat], device, args.reps)
        rows.append({"step": name, "ops_old": count_ops(old), "ops_new": count_ops(new),
                     "ops_flat": count_ops(flat), "ms_old": ms_old, "ms_new": ms_new,
                     "ms_flat": ms_flat, "equal": equal})
    add = next(r for r in rows if r["step"] == "accumulator add")
    add["equal"] = _equal(old1.mean(), new_mean(new1)) and _equal(old1.mean(), new_mean(flat1))
    columns = ("ops_old", "ops_new", "ops_flat", "ms_old", "ms_new", "ms_flat")
    rows.append({"step": "sum of the above", **{c: sum(r[c] for r in rows) for c in columns},
                 "equal": all(r["equal"] is not False for r in rows)})

    print(f"device {device}, torch {torch.__version__}, {len(global_state)} state tensors, "
          f"{sum(v.numel() for v in global_state.values()) / 1e6:.2f} M values, "
          f"median of {args.reps}")
    print(f"{'step':<22}{'ops old':>8}{'new':>6}{'flat':>6}{'ms old':>9}{'new':>9}{'flat':>9}  equal")
    for r in rows:
        eq = "-" if r["equal"] is None else ("yes" if r["equal"] else "NO")
        print(f"{r['step']:<22}{r['ops_old']:>8}{r['ops_new']:>6}{r['ops_flat']:>6}"
              f"{r['ms_old']:>9.3f}{r['ms_new']:>9.3f}{r['ms_flat']:>9.3f}  {eq}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "reps": args.reps,
                       "features": args.features,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
