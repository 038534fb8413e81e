"""The federated method policy interface and its registry.

A *method* (FedAvg, FedProx, FedBN, Ditto, IOP-FL, ...) is a small policy object that the one
training loop of :class:`~iopfl_lightning.federated.FederatedTrainer` consults at fixed points.
The loop itself (clients in turn, optimizer reset, aggregation, server optimizer, evaluation) is
never copied per method. A policy decides:

(a) which state keys each client keeps for itself (``local_keys``: loaded over the global
    weights when the client starts) and whether client updates are aggregated at all
    (``aggregate``);
(b) how a client's personalized copy is updated after its local training
    (``update_personal``; clients that keep local keys but no copy are evaluated as the global
    model with their own local keys, see :meth:`FederatedTrainer.personal_models`);
(c) what the local objective adds, through optional hooks called around each optimizer step
    (``before_optimizer_step``: e.g. the gradient ``mu * (w - w_global)`` of a proximal term)
    and after each training batch (``after_batch``: e.g. Ditto's personal-model step).

Policies that hold tensors across rounds return them from ``state_dict`` (the callback stores it
in its own checkpoint state, so ``fit --ckpt_path`` resumes exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from iopfl_lightning.federated.state import StateDict

METHODS: dict[str, type[FederatedMethod]] = {}


def register_method(name: str) -> Callable[[type[FederatedMethod]], type[FederatedMethod]]:
    """Class decorator: make a policy selectable as ``FederatedTrainer(method=name)``."""

    def decorate(cls: type[FederatedMethod]) -> type[FederatedMethod]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


class FederatedMethod:
    """Base policy: plain FedAvg (everything shared, no personalized copy, nothing added).

    Class attributes a subclass may override:
        aggregate: fold client updates into the global model (False: the global stays as is).
        pooled: train one client on the pooled, shuffled data of every site (centralized).
        keep_optimizer: keep one optimizer state per client across rounds whatever the
            callback's ``optimizer_state`` says (None: follow the callback).
        deployed: which evaluated model the method puts at each inside site
            (``global`` or ``personalized``); the comparison table reports that one.
        trains_personal: the personalized copy is trained by the method itself (Ditto), not
            mixed from checked states (an EMA of finite weights is finite), so the callback
            checks it for NaN/inf as well.
    """

    name: ClassVar[str] = "base"
    aggregate: ClassVar[bool] = True
    pooled: ClassVar[bool] = False
    keep_optimizer: ClassVar[bool | None] = None
    deployed: ClassVar[Literal["global", "personalized"]] = "global"
    trains_personal: ClassVar[bool] = False

    def setup(self, net: torch.nn.Module, param_keys: set[str], norm_keys: set[str]) -> None:
        """Called once the net exists (start of fit); compute key sets here."""
        self.param_keys = set(param_keys)

    def local_keys(self) -> set[str]:
        """State keys every client keeps locally (never overwritten by the global weights)."""
        return set()

    def start_client(
        self, pl_module: pl.LightningModule, client: int, global_state: StateDict,
        personal: StateDict | None,
    ) -> None:
        """The client's starting weights are loaded; ``personal`` is its current copy."""

    def before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        """Gradients of the local loss are in ``.grad``; add what the objective adds."""

    def after_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """One optimizer step on the client's model has been taken with ``batch``."""

    def update_personal(
        self, previous: StateDict | None, local: dict[str, Tensor], client: int
    ) -> StateDict | None:
        """The client's new personalized copy (None: the method keeps none).

        ``local`` is the live module's state after local training: clone what you keep.
        """
        return None

    def client_of(self, client: int) -> int:
        """Maps a batch's client index to the client that trains on it."""
        return client

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_")
                         and not isinstance(v, set | dict))
        return f"{type(self).__name__}({args})"


def build_method(method: str | FederatedMethod, method_args: dict[str, Any] | None = None,
                 ) -> FederatedMethod:
    """A policy from a registered name (with ``method_args``) or an instance passed through."""
    if isinstance(method, FederatedMethod):
        if method_args:
            raise ValueError("method_args only apply to a method given by name")
        return method
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)} or a FederatedMethod, got {method!r}")
    try:
        return METHODS[method](**(method_args or {}))
    except TypeError as err:
        raise ValueError(f"method {method!r}: bad method_args {method_args}: {err}") from err
