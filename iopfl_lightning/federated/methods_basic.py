"""Methods that differ only in what is shared and how the personalized copy is kept.

- ``fedavg``: everything shared; each site gets the global model.
- ``iopfl``: FedAvg plus IOP-FL inside personalization, ``p_k <- a p_k + (1 - a) w_k``.
- ``fedbn``: normalization layers (affine parameters and running statistics) stay local.
- ``fedper``: the segmentation head (or any listed modules) stays local.
- ``local``: every key stays local and nothing is aggregated: each site trains alone.
- ``centralized``: one client trained on the pooled, shuffled data of all sites.

For ``fedbn``, ``fedper`` and ``local`` a site's deployed model is the current global model with
the site's own local keys (the callback composes it, see ``FederatedTrainer.personal_models``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from iopfl_lightning.federated.methods_base import FederatedMethod, register_method
from iopfl_lightning.federated.personalize import check_alpha, ema_update
from iopfl_lightning.federated.state import StateDict

HEAD_NAMES = ("head", "segmentation_head")  # paper UNet, smp models


@register_method("fedavg")
class FedAvg(FederatedMethod):
    """FedAvg (McMahan et al. 2017): the global model everywhere."""


@register_method("iopfl")
class IOPFLInside(FederatedMethod):
    """IOP-FL inside personalization: each site's EMA of its locally trained weights.

    Args:
        alpha: weight of the previous copy (reference 0.1: mostly this round's local model).
    """

    deployed = "personalized"

    def __init__(self, alpha: float = 0.1):
        self.alpha = check_alpha(alpha)

    def update_personal(
        self, previous: StateDict | None, local: dict[str, Tensor], client: int
    ) -> StateDict:
        return ema_update(previous, local, self.alpha)


@register_method("fedbn")
class FedBN(FederatedMethod):
    """FedBN (Li et al. 2021): normalization parameters and statistics never leave the site."""

    deployed = "personalized"

    def setup(self, net: torch.nn.Module, param_keys: set[str], norm_keys: set[str]) -> None:
        super().setup(net, param_keys, norm_keys)
        if not norm_keys:
            raise ValueError("fedbn: the net has no normalization layers to keep local")
        self._local = set(norm_keys)

    def local_keys(self) -> set[str]:
        return self._local


@register_method("fedper")
class FedPer(FederatedMethod):
    """FedPer (Arivazhagan et al. 2019): personal layers (default: the segmentation head).

    Args:
        local_modules: module names whose keys stay local (a name covers its submodules);
            None = the first of ``head`` / ``segmentation_head`` the net has.
    """

    deployed = "personalized"

    def __init__(self, local_modules: list[str] | None = None):
        self.local_modules = list(local_modules) if local_modules else None

    def setup(self, net: torch.nn.Module, param_keys: set[str], norm_keys: set[str]) -> None:
        super().setup(net, param_keys, norm_keys)
        names = dict(net.named_modules())
        wanted = self.local_modules or [n for n in HEAD_NAMES if n in names][:1]
        missing = [n for n in wanted if n not in names]
        if not wanted or missing:
            raise ValueError(f"fedper: modules {missing or HEAD_NAMES} not found in the net; "
                             "set method_args.local_modules")
        self._local = {k for k in net.state_dict() if any(_under(k, n) for n in wanted)}

    def local_keys(self) -> set[str]:
        return self._local


def _under(key: str, module: str) -> bool:
    return key.startswith(module + ".")


@register_method("local")
class LocalOnly(FederatedMethod):
    """No federation: every site continues from its own weights; the global model never moves
    (it stays the common initialization)."""

    aggregate = False
    deployed = "personalized"

    def setup(self, net: torch.nn.Module, param_keys: set[str], norm_keys: set[str]) -> None:
        super().setup(net, param_keys, norm_keys)
        self._local = set(net.state_dict())

    def local_keys(self) -> set[str]:
        return self._local


@register_method("centralized")
class Centralized(FederatedMethod):
    """The upper reference: one model trained on the pooled sites (batches mix sites), with one
    optimizer state kept across epochs as in ordinary training; evaluated per site."""

    pooled = True
    keep_optimizer = True

    def client_of(self, client: int) -> int:
        return 0
