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

from iopfl_lightning.federated.flat import FlatState, as_flat, shares_layout
from iopfl_lightning.federated.state import StateDict, group_indices, group_keys, is_float

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


class FlatAccumulator:
    """``UpdateAccumulator`` over a FlatState global: the same foreach ops and results, each on
    a whole buffer's parameter segment or buffer segment instead of on every tensor.

    Client states of another layout are copied into this one first.
    """

    def __init__(self, global_state: FlatState):
        self.global_state = global_state
        self.layout = layout = global_state.layout
        self.total_weight = 0.0
        self.num_clients = 0
        groups = range(len(layout.numel))
        self._floats = [g for g in groups if layout.is_float(g)]
        self._ints = [g for g in groups if not layout.is_float(g)]
        self._cut = layout.param_numel
        self._delta_sum: list[Tensor] = []  # per float buffer: weighted parameter deltas
        self._buffer_sum: list[Tensor] = []  # per float buffer: weighted buffer values
        self._int_max: list[Tensor] = []

    @torch.no_grad()
    def add(self, client_state: Mapping[str, Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"client weight must be positive, got {weight}")
        client = as_flat(client_state, self.layout)
        if not shares_layout(client, self.global_state):
            raise ValueError("client state does not match the global state's keys and shapes")
        cb, gb = client.buffers, self.global_state.buffers
        delta = torch._foreach_sub([cb[g][: self._cut[g]] for g in self._floats],
                                   [gb[g][: self._cut[g]] for g in self._floats])
        torch._foreach_mul_(delta, weight)
        values = torch._foreach_mul([cb[g][self._cut[g]:] for g in self._floats], weight)
        ints = [cb[g] for g in self._ints]
        if self.num_clients:
            torch._foreach_add_(self._delta_sum, delta)
            torch._foreach_add_(self._buffer_sum, values)
            # out of place: values handed out by mean_buffers stay as they are
            self._int_max = torch._foreach_maximum(self._int_max, ints) if ints else []
        else:
            self._delta_sum, self._buffer_sum = delta, values
            self._int_max = [t.clone() for t in ints]
        self.total_weight += weight
        self.num_clients += 1

    def _group_list(self, groups: list[int], tensors: list[Tensor]) -> list:
        """``tensors`` (one per group of ``groups``) placed at their buffer indices."""
        out: list = [None] * len(self.layout.numel)
        for g, t in zip(groups, tensors, strict=True):
            out[g] = t
        return out

    @torch.no_grad()
    def mean_delta(self) -> StateDict:
        self._require_clients()
        means = torch._foreach_div(self._delta_sum, self.total_weight)
        keys = [k for k in self.layout.keys if k in self.layout.param_keys]
        return self.layout.views(self._group_list(self._floats, means), keys)

    def _buffer_means(self) -> list[Tensor]:
        """Per float buffer: the weighted mean of its buffer segment (running statistics)."""
        self._require_clients()
        return torch._foreach_div(self._buffer_sum, self.total_weight)

    @torch.no_grad()
    def mean_buffers(self) -> StateDict:
        means = self._buffer_means()
        floats = [k for k in self.layout.keys if k not in self.layout.param_keys
                  and self.layout.is_float(self.layout.slots[k].group)]
        out = self.layout.views(self._group_list(self._floats, means), floats, starts=self._cut)
        ints = [k for k in self.layout.keys if not self.layout.is_float(self.layout.slots[k].group)]
        out.update(self.layout.views(self._group_list(self._ints, self._int_max), ints))
        return out

    @torch.no_grad()
    def write_mean_buffers(self, target: FlatState) -> None:
        """``mean_buffers()`` written into ``target``'s buffer segments (one op per buffer)."""
        self._require_clients()
        if target.layout is not self.layout:
            raise ValueError("target is not laid out like the global state")
        for g, mean in zip(self._floats, self._buffer_means(), strict=True):
            target.buffers[g][self._cut[g]:].copy_(mean)
        for g, values in zip(self._ints, self._int_max, strict=True):
            target.buffers[g].copy_(values)

    _require_clients = UpdateAccumulator._require_clients


def make_accumulator(global_state: Mapping[str, Tensor], param_keys: set[str]):
    """The round's accumulator: over flat buffers when the global state is laid out flat with
    exactly these parameter keys, else per tensor."""
    if isinstance(global_state, FlatState) and global_state.layout.param_keys == set(param_keys):
        return FlatAccumulator(global_state)
    return UpdateAccumulator(global_state, param_keys)


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
        # foreach on every device (PyTorch picks it only on CUDA): a few ops instead of a
        # Python loop over the parameters; on the CPU the same per-tensor kernels run
        if name == "fedavg":
            self.optimizer = torch.optim.SGD(self.params, lr=lr, foreach=True)
        elif name == "fedavgm":
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, foreach=True)
        elif name == "fedadam":
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=betas, eps=eps,
                                              foreach=True)
        else:
            raise ValueError(f"server_optimizer must be fedavg, fedavgm or fedadam, got {name!r}")

    @torch.no_grad()
    def step(self, mean_delta: Mapping[str, Tensor]) -> StateDict:
        """One server step; returns the new global parameters (the optimizer's own tensors)."""
        for p, grad in zip(self.params, self._negated(mean_delta), strict=True):
            p.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: p.detach() for k, p in zip(self.keys, self.params, strict=True)}

    def _negated(self, mean_delta: Mapping[str, Tensor]) -> list[Tensor]:
        """``-mean_delta[k]`` in the parameters' order and dtypes: one foreach op per
        (device, dtype) group rather than one op per tensor."""
        deltas = [mean_delta[k].to(p.dtype) for k, p in zip(self.keys, self.params, strict=True)]
        out: list[Tensor] = [None] * len(deltas)  # type: ignore[list-item]
        for group in group_indices(deltas):
            for i, g in zip(group, torch._foreach_neg([deltas[i] for i in group]), strict=True):
                out[i] = g
        return out

    @torch.no_grad()
    def bind(self, params: Mapping[str, Tensor]) -> None:
        """Steps now update ``params`` in place (they must hold the optimizer's current values):
        a flat global state's views, so a step writes the new global weights where they live.
        The optimizer's state stays with its parameters."""
        for k, p in zip(self.keys, self.params, strict=True):
            p.data = params[k]

    @torch.no_grad()
    def load_params(self, params: Mapping[str, Tensor]) -> None:
        for k, p in zip(self.keys, self.params, strict=True):
            p.copy_(params[k])

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
