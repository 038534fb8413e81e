"""What the RoutingModule needs from a ``routing_space.pt``: experts, baselines, norm handling.

Pure functions on nets and state dicts (no Lightning): loading the K personalized models and
the global model in expert order ``[site_0, ..., site_{K-1}, global]``, the uniform weight
average of the K + 1 models, the ensemble prediction, and switching normalization layers to
the new site's batch statistics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from iopfl_lightning.federated.routing_space import read_routing_space

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

log = logging.getLogger(__name__)


@dataclass
class Experts:
    """The routing space in expert order: ``states[:-1]`` the sites' models, ``states[-1]``
    the global model."""

    net_spec: dict[str, Any]
    sites: list[str]  # the sites with a personalized model, in expert order
    states: list[dict[str, Tensor]]
    federation: list[str] = field(default_factory=list)  # every inside site, copy or not

    @property
    def global_state(self) -> dict[str, Tensor]:
        return self.states[-1]


def load_experts(path: str | os.PathLike, outside: Sequence[str] = ()) -> Experts:
    """Read and check ``path``; raise ValueError naming the file and the site that is wrong.

    Refuses a routing space with no personalized model (K = 0), without a net spec, or one
    whose inside sites include a site that is now ``outside`` (its model saw that site's
    labels, so routing over it would leak them).
    """
    space = read_routing_space(path)
    sites = federation = list(space["sites"])
    if not space.get("net_spec"):
        raise ValueError(f"{path}: routing space has no net_spec, cannot rebuild the net")
    leaked = [s for s in outside if s in sites]
    if leaked:
        raise ValueError(f"{path}: outside site(s) {leaked} took part in the federation "
                         f"(inside sites {sites}); hold them out (--data.outside) when "
                         "training the inside federation")
    untrained = [s for s in sites if s not in space["personalized"]]
    sites = [s for s in sites if s in space["personalized"]]
    if not sites:
        raise ValueError(f"{path}: routing space has no personalized model (K = 0); outside "
                         "personalization needs at least one")
    if untrained:
        log.warning("%s: no personalized model of %s (never trained in that federation); "
                    "routing over %s and the global model", path, untrained, sites)
    states = [dict(space["personalized"][s]) for s in sites] + [dict(space["global"])]
    return Experts(dict(space["net_spec"]), sites, states, federation)


def average_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Uniform average of floating tensors (weights, norm parameters and running statistics);
    integer buffers (e.g. ``num_batches_tracked``) are taken from the last (global) state."""
    out: dict[str, Tensor] = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = torch.stack([s[key] for s in states]).mean(0).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


@torch.no_grad()
def ensemble_probabilities(net: nn.Module, states: Sequence[Mapping[str, Tensor]],
                           image: Tensor) -> Tensor:
    """Mean of the softmax of every state's prediction (``net`` supplies the architecture)."""
    total = None
    for state in states:
        probs = functional_call(net, dict(state), (image,), strict=True).float().softmax(1)
        total = probs if total is None else total + probs
    return total / len(states)


def norm_layers(net: nn.Module) -> list[nn.Module]:
    """Every BatchNorm-like layer with running statistics (what ``norm`` modes act on)."""
    return [m for m in net.modules() if isinstance(m, _BATCH_NORMS)]


def use_batch_statistics(net: nn.Module) -> None:
    """Make every BatchNorm normalize with the current batch's statistics, in train and eval
    mode alike (the paper's test-time behaviour): running statistics are dropped."""
    for m in norm_layers(net):
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None
        m.num_batches_tracked = None


def to_device(states: Sequence[Mapping[str, Tensor]], device: torch.device
              ) -> list[dict[str, Tensor]]:
    """Copies of ``states`` on ``device`` (no copy when they are there already)."""
    return [{k: v.to(device) for k, v in s.items()} for s in states]
