"""Server-side aggregation as pure functions plus a server optimizer.

Clients send updates ``d_k = w_k - w_global``. The server averages them weighted by sample count
and applies the mean update through an optimizer acting on the global weights, with the
pseudo-gradient ``-mean(d)``: SGD with lr 1 and no momentum is exactly FedAvg, momentum gives
FedAvgM, Adam gives FedAdam. Everything stays on the device of the tensors passed in.

What happens to non-parameter entries (``average_buffers``):
- floating-point buffers (BatchNorm running mean/var) are replaced by the sample-weighted average
  of the clients' buffers (no server optimizer: momentum on statistics has no meaning);
- integer buffers (``num_batches_tracked``) take the maximum over the participating clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from iopfl_lightning.federated.state import StateDict, group_keys, is_float

ServerOptName = Literal["fedavg", "fedavgm", "fedadam"]


class UpdateAccumulator:
    """Streams client results into running weighted sums (memory: about two models).

    ``add`` reads the client's tensors and never modifies them, so the caller can pass the live
    module's ``state_dict()`` without cloning it. The arithmetic is that of a per-key loop
    (``sum += (w - g) * weight``, ``sum / total``) done as grouped foreach ops: the key groups
    are fixed here, once per round.
    """

    def __init__(self, global_state: Mapping[str, Tensor], param_keys: set[str]):
        self.global_state = global_state
        self.param_keys = param_keys
        self.delta_sum: StateDict = {}
        self.buffer_sum: StateDict = {}
        self.int_max: StateDict = {}
        self.total_weight = 0.0
        self.num_clients = 0
        keys = list(global_state)
        self._params = [k for k in keys if k in param_keys]
        self._floats = [k for k in keys if k not in param_keys and is_float(global_state[k])]
        self._ints = [k for k in keys if k not in param_keys and not is_float(global_state[k])]
        self._param_groups = group_keys(global_state, self._params)
        self._float_groups = group_keys(global_state, self._floats)
        self._global_groups = [[global_state[k] for k in g] for g in self._param_groups]

    @torch.no_grad()
    def add(self, client_state: Mapping[str, Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"client weight must be positive, got {weight}")
        for keys, gs in zip(self._param_groups, self._global_groups, strict=True):
            delta = torch._foreach_sub([client_state[k] for k in keys], gs)
            torch._foreach_mul_(delta, weight)
            self._accumulate(self.delta_sum, keys, delta)
        for keys in self._float_groups:
            self._accumulate(
                self.buffer_sum, keys, torch._foreach_mul([client_state[k] for k in keys], weight)
            )
        if self._ints:
            ws = [client_state[k] for k in self._ints]
            if self.num_clients:  # out of place: values handed out by mean_buffers stay as they are
                ws = torch._foreach_maximum([self.int_max[k] for k in self._ints], ws)
            else:
                ws = [w.clone() for w in ws]
            self.int_max.update(zip(self._ints, ws, strict=True))
        self.total_weight += weight
        self.num_clients += 1

    def _accumulate(self, store: StateDict, keys: list[str], values: list[Tensor]) -> None:
        if self.num_clients:
            torch._foreach_add_([store[k] for k in keys], values)
        else:
            store.update(zip(keys, values, strict=True))  # fresh tensors from the arithmetic

    @torch.no_grad()
    def _mean(self, store: StateDict, groups: list[list[str]], order: list[str]) -> StateDict:
        out: StateDict = {}
        for keys in groups:
            out.update(zip(keys, torch._foreach_div([store[k] for k in keys], self.total_weight),
                           strict=True))
        return {k: out[k] for k in order}  # the global state's key order

    def mean_delta(self) -> StateDict:
        self._require_clients()
        return self._mean(self.delta_sum, self._param_groups, self._params)

    def mean_buffers(self) -> StateDict:
        self._require_clients()
        out = self._mean(self.buffer_sum, self._float_groups, self._floats)
        out.update(self.int_max)
        return out

    def _require_clients(self) -> None:
        if self.num_clients == 0:
            raise RuntimeError("no client update was added in this round")


def weighted_average(states: list[Mapping[str, Tensor]], weights: list[float]) -> StateDict:
    """Plain sample-weighted average of whole states (float entries; ints take the max)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need as many weights as states, got {len(states)} and {len(weights)}")
    total = float(sum(weights))
    out: StateDict = {}
    for k, v in states[0].items():
        if is_float(v):
            out[k] = sum(s[k].detach() * (w / total) for s, w in zip(states, weights, strict=True))
        else:
            out[k] = torch.stack([s[k] for s in states]).amax(0)
    return out


class ServerOptimizer:
    """Applies the mean client update to the global parameters with a torch optimizer."""

    def __init__(
        self,
        global_params: Mapping[str, Tensor],
        name: ServerOptName = "fedavg",
        lr: float = 1.0,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
    ):
        self.keys = list(global_params)
        self.params = [torch.nn.Parameter(global_params[k].detach().clone()) for k in self.keys]
        if name == "fedavg":
            self.optimizer = torch.optim.SGD(self.params, lr=lr)
        elif name == "fedavgm":
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        elif name == "fedadam":
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=betas, eps=eps)
        else:
            raise ValueError(f"server_optimizer must be fedavg, fedavgm or fedadam, got {name!r}")

    @torch.no_grad()
    def step(self, mean_delta: Mapping[str, Tensor]) -> StateDict:
        """One server step; returns the new global parameters (the optimizer's own tensors)."""
        for k, p in zip(self.keys, self.params, strict=True):
            p.grad = -mean_delta[k].to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: p.detach() for k, p in zip(self.keys, self.params, strict=True)}

    @torch.no_grad()
    def load_params(self, params: Mapping[str, Tensor]) -> None:
        for k, p in zip(self.keys, self.params, strict=True):
            p.copy_(params[k])

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
