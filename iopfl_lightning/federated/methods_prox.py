"""Methods whose local objective adds a proximal pull toward the global model.

- ``fedprox`` (Li et al. 2020): the client minimizes ``f_k(w) + mu/2 ||w - w_global||^2``. The
  term's gradient ``mu (w - w_global)`` is added to ``.grad`` right before each optimizer step
  (after the AMP gradients are unscaled, see ``unscale_for_hooks``, and before clipping), which
  is exactly what adding the term to the loss would do, for any LightningModule with a ``.net``
  and automatic optimization, without touching the module.
- ``ditto`` (Li et al. 2021): besides the usual local training of the global model, each site
  trains a personal model ``v_k`` on the same batches with ``f_k(v) + lam/2 ||v - w_global||^2``
  (its own Adam, fresh each round like the client's). ``v_k`` is the site's personalized copy;
  it never enters the aggregate. Needs the module to provide ``loss_fn(logits, mask)`` and
  ``forward(image, state)`` (as SegmentationModule does).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from iopfl_lightning.federated.methods_base import FederatedMethod, register_method
from iopfl_lightning.federated.state import StateDict
from iopfl_lightning.modules.optim import adam


def _check_nonnegative(name: str, value: float) -> float:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


@torch.no_grad()
def add_proximal_grad(params: dict[str, Tensor], reference: dict[str, Tensor], mu: float) -> None:
    """``p.grad += mu * (p - reference)`` for every entry of ``reference`` (grad of the term)."""
    for k, ref in reference.items():
        p = params[k]
        pull = (p.detach() - ref) * mu
        if p.grad is None:
            p.grad = pull
        else:
            p.grad.add_(pull)


class _Proximal(FederatedMethod):
    """Keeps the round's global parameters (the pull's anchor) for the running client."""

    def start_client(self, pl_module: pl.LightningModule, client: int, global_state: StateDict,
                     personal: StateDict | None) -> None:
        shared = self.param_keys - self.local_keys()
        self._anchor = {k: global_state[k].detach() for k in shared}


@register_method("fedprox")
class FedProx(_Proximal):
    """Args: mu: weight of the proximal term (0 = FedAvg)."""

    def __init__(self, mu: float = 0.01):
        self.mu = _check_nonnegative("mu", mu)

    def before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        if self.mu > 0:
            add_proximal_grad(dict(pl_module.net.named_parameters()), self._anchor, self.mu)


@register_method("ditto")
class Ditto(_Proximal):
    """Args:
    lam: weight of the personal model's pull toward the global model.
    lr: personal Adam learning rate (None = the module's ``hparams.lr``).
    """

    deployed = "personalized"
    trains_personal = True

    def __init__(self, lam: float = 0.1, lr: float | None = None):
        self.lam = _check_nonnegative("lam", lam)
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.lr = lr

    def start_client(self, pl_module: pl.LightningModule, client: int, global_state: StateDict,
                     personal: StateDict | None) -> None:
        super().start_client(pl_module, client, global_state, personal)
        base = personal if personal is not None else global_state
        self._state = {k: v.detach().clone() for k, v in base.items()}
        params = [self._state[k].requires_grad_() for k in sorted(self.param_keys)]
        hp = getattr(pl_module, "hparams", {})
        self._optimizer = adam(params, lr=self.lr or hp.get("lr", 1e-3),
                               amsgrad=hp.get("amsgrad", False))
        self._scaler = _grad_scaler(pl_module)  # fp16 only, fresh like the optimizer

    def after_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        for attr in ("loss_fn",):
            if not hasattr(pl_module, attr):
                raise TypeError(f"ditto needs {type(pl_module).__name__}.{attr}")
        self._optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), _autocast(pl_module):
            loss = pl_module.loss_fn(pl_module(batch["image"], self._state), batch["mask"])
        scaler = self._scaler
        if scaler is None:
            loss.backward()
        else:  # 16-mixed: scale the loss as Lightning does for the global model's step
            scaler.scale(loss).backward()
            scaler.unscale_(self._optimizer)
        if self.lam > 0:
            add_proximal_grad(self._state, self._anchor, self.lam)
        if scaler is None:
            self._optimizer.step()
        else:  # skips the step on inf/NaN gradients and adapts the scale
            scaler.step(self._optimizer)
            scaler.update()

    def update_personal(self, previous: StateDict | None, local: dict[str, Tensor], client: int,
                        ) -> StateDict:
        personal = {k: v.detach().clone() for k, v in self._state.items()}
        del self._state, self._optimizer, self._scaler
        return personal


def _precision_plugin(pl_module: pl.LightningModule):
    trainer = getattr(pl_module, "_trainer", None)
    return getattr(getattr(trainer, "strategy", None), "precision_plugin", None)


def _grad_scaler(pl_module: pl.LightningModule) -> torch.amp.GradScaler | None:
    """A gradient scaler for the personal step when the trainer scales its own (``16-mixed``);
    ``None`` for fp32 and bf16, which need none."""
    if getattr(_precision_plugin(pl_module), "scaler", None) is None:
        return None
    return torch.amp.GradScaler(pl_module.device.type)


def unscale_for_hooks(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
    """Unscale ``16-mixed`` gradients before a hook reads or adds to them.

    Lightning unscales them before ``on_before_optimizer_step``, except for optimizers that
    unscale inside their own step (a fused Adam: this project's modules avoid it under a loss
    scaler, ``modules.optim.fused_allowed``, but any LightningModule may configure one): there
    the hook would see gradients times the loss scale. Those are unscaled here, once; the
    scaler's step then knows they are, and still skips the step on inf/NaN. A no-op for other
    precisions and optimizers, and when they are unscaled already.
    """
    scaler = getattr(_precision_plugin(pl_module), "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as err:  # unscaled since the scaler's last update: nothing to do
        if "already been called" not in str(err):
            raise


def _autocast(pl_module: pl.LightningModule):
    """The trainer's precision context (bf16/fp16 autocast), as for the global model's step."""
    plugin = _precision_plugin(pl_module)
    return plugin.train_step_context() if plugin is not None else nullcontext()
