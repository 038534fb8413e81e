"""FederatedTrainer: FedAvg-style rounds with IOP-FL inside personalization, as a Lightning callback.

One Lightning epoch is one federated round. The datamodule's training loader yields each
participating client's batches contiguously, every batch tagged with its client index. When the
client changes the callback (1) folds the previous client's locally trained weights into the
round's aggregate and into that client's personalized EMA copy, (2) loads the global weights into
the module and (3) resets the optimizer state, as the reference does with a fresh Adam per client
and round. Before validation (or at the end of the epoch, whichever comes first) the round is
closed: the mean client update is applied through the server optimizer and the new global
weights are loaded into the module, so validation, checkpoints and the next round see the global
model.

Everything federated (round, global weights, personalized copies, per-client optimizer and
normalization states, server optimizer state) is in ``state_dict``, so ``fit --ckpt_path``
resumes exactly. All tensors stay on the module's device during training.

Methods: what is shared, how the personalized copy is kept and what the local objective adds
come from a policy (``method``, see :mod:`iopfl_lightning.federated.methods`); the default,
``iopfl``, is FedAvg with the IOP-FL EMA copy. The policy's own state is in ``state_dict`` too.

Numerical faults: before a client's weights enter the aggregate they are checked for NaN/inf
(one fused reduction, one host sync per client and round). A non-finite client is left out of
the round's aggregate and its personalized copy is not updated (``on_nonfinite="skip"``, logged
as a warning and recorded in ``nonfinite``), or the run stops (``"raise"``).

Run folders: a fresh run gets a ``run_id`` (kept in the checkpoint, so a resumed run keeps it).
``fit`` refuses to start when the routing space it would write already exists and belongs to
another run, instead of overwriting it at the end.
"""

from __future__ import annotations

import copy
import logging
import uuid
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from iopfl_lightning.federated.aggregate import (
    FlatAccumulator,
    ServerOptimizer,
    ServerOptName,
    UpdateAccumulator,
    make_accumulator,
)
from iopfl_lightning.federated.flat import (
    FlatState,
    as_flat,
    backs,
    detached_views,
    flatten_module,
    unflatten_module,
)
from iopfl_lightning.federated.methods import FederatedMethod, build_method
from iopfl_lightning.federated.methods_prox import unscale_for_hooks
from iopfl_lightning.federated.participation import select_clients
from iopfl_lightning.federated.personalize import check_alpha
from iopfl_lightning.federated.progress import describe_round
from iopfl_lightning.federated.routing_space import check_run_owns, write_routing_space
from iopfl_lightning.federated.state import (
    StateDict,
    all_finite,
    clone_state,
    copy_into,
    live_state,
    norm_keys,
    reset_optimizer_state,
    subset,
)

log = logging.getLogger(__name__)


def _to(state: StateDict, device: torch.device) -> StateDict:
    if isinstance(state, FlatState):  # one copy per buffer, not per tensor
        return state.layout.views([b.to(device) for b in state.buffers])
    return {k: v.to(device) for k, v in state.items()}


class FederatedTrainer(Callback):
    """Runs federated rounds over the clients of a ``MultiSiteDataModule``.

    Args:
        alpha: weight of the previous personalized copy in the EMA (IOP-FL reference: 0.1).
        local_epochs: passes over each client's training data per round.
        client_fraction: fraction of clients drawn (seeded) to train in each round.
        optimizer_state: ``reset`` gives every client a fresh optimizer state each round (the
            reference); ``keep`` keeps one optimizer state per client across rounds.
        server_optimizer: ``fedavg`` (SGD, lr 1 = plain averaging), ``fedavgm`` or ``fedadam``.
        norm_policy: ``average`` aggregates normalization layers like everything else;
            ``local`` keeps each client's own normalization parameters and statistics (FedBN);
            the global model then carries their sample-weighted average.
        routing_space: file name written into the run folder at the end of ``fit``.
        method: a registered method name (``iopfl``, ``fedavg``, ``fedprox``, ``fedbn``,
            ``fedper``, ``ditto``, ``local``, ``centralized``) or a ``FederatedMethod``.
        method_args: keyword arguments of a method given by name (``iopfl`` takes ``alpha``
            from here or, by default, from ``alpha`` above).
        on_nonfinite: a client whose weights turn NaN/inf after local training is ``skip``-ped
            (left out of the round's aggregate and of its personalized copy, with a warning) or
            the run stops with a ``FloatingPointError`` (``raise``).
        flat_state: keep the net's parameters and buffers, the global weights, the personalized
            copies and the round's sums in one flat buffer per dtype with one layout, so a
            client switch and an aggregation are a few whole-buffer ops instead of work per
            tensor (:mod:`iopfl_lightning.federated.flat`). The same results; off falls back
            to grouped per-tensor ops (and leaves the net's tensors where they are).
    """

    _STATE_KEYS = (
        "round", "sites", "global_state", "personalized", "local_norms",
        "client_optimizer_states", "server_optimizer",
    )

    def __init__(
        self,
        alpha: float = 0.1,
        local_epochs: int = 1,
        client_fraction: float = 1.0,
        optimizer_state: Literal["reset", "keep"] = "reset",
        server_optimizer: ServerOptName = "fedavg",
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        norm_policy: Literal["average", "local"] = "average",
        seed: int = 0,
        routing_space: str = "routing_space.pt",
        method: str | FederatedMethod = "iopfl",
        method_args: dict[str, Any] | None = None,
        on_nonfinite: Literal["skip", "raise"] = "skip",
        flat_state: bool = True,
    ):
        super().__init__()
        self.alpha = check_alpha(alpha)
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
        select_clients(1, client_fraction, seed, 0)  # validates the fraction
        for name, value, allowed in (
            ("optimizer_state", optimizer_state, ("reset", "keep")),
            ("norm_policy", norm_policy, ("average", "local")),
            ("server_optimizer", server_optimizer, ("fedavg", "fedavgm", "fedadam")),
            ("on_nonfinite", on_nonfinite, ("skip", "raise")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.local_epochs = local_epochs
        self.client_fraction = client_fraction
        self.optimizer_state = optimizer_state
        self.server_optimizer_name = server_optimizer
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.norm_policy = norm_policy
        self.seed = seed
        self.routing_space_name = routing_space
        if method == "iopfl":
            method_args = {"alpha": alpha, **(method_args or {})}
        self.method = build_method(method, method_args)
        self.on_nonfinite = on_nonfinite
        self.flat_state = flat_state

        self.round = 0
        self.sites: list[str] = []
        self.sample_counts: list[int] = []
        self.global_state: StateDict | None = None
        self.personalized: dict[int, StateDict] = {}
        self.local_norms: dict[int, StateDict] = {}
        self.client_optimizer_states: dict[int, dict] = {}
        self.server: ServerOptimizer | None = None
        self._server_state: dict | None = None
        self._accumulator: UpdateAccumulator | None = None
        self._live: StateDict | None = None  # the net's own tensors, refreshed every round
        self._live_flat: FlatState | None = None  # the same, once the net is laid out flat
        self._local: StateDict | None = None  # plain views of the net's tensors (state_dict())
        self._client: int | None = None
        self.run_id: str | None = None
        self.nonfinite: list[tuple[int, str]] = []  # (round, site) of every skipped client
        self._warned_mid_round = False

    # ---------------------------------------------------------------- setup
    def participants(self, round_idx: int) -> list[int]:
        return select_clients(len(self.sites), self.client_fraction, self.seed, round_idx)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        for attr in ("inside_sites", "client_sample_counts", "configure_rounds"):
            if not hasattr(datamodule, attr):
                raise TypeError(
                    f"FederatedTrainer needs a datamodule with `{attr}` "
                    f"(e.g. MultiSiteDataModule), got {type(datamodule).__name__}"
                )
        sites = list(datamodule.inside_sites)
        if self.sites and self.sites != sites:
            raise ValueError(f"checkpoint was trained on sites {self.sites}, data has {sites}")
        self.sites = sites
        self.sample_counts = [int(n) for n in datamodule.client_sample_counts()]
        if stage == "fit":
            _check_round_is_epoch(trainer)
            pooled = {"pooled": True} if self.method.pooled else {}  # centralized only
            datamodule.configure_rounds(self.participants, self.local_epochs, **pooled)
            if self.client_fraction < 1.0 and trainer.reload_dataloaders_every_n_epochs != 1:
                # rounds differ in length; Lightning sizes an epoch when the loader is built
                log.info("client_fraction < 1: rebuilding the training loader every round")
                trainer.reload_dataloaders_every_n_epochs = 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run_id = self.run_id or uuid.uuid4().hex
        if trainer.is_global_zero:  # refuse now, not after training, to clobber another run
            check_run_owns(self._routing_space_path(trainer), self.run_id)
        net = self._net(pl_module)
        device = pl_module.device
        if self.global_state is None:
            self.global_state = clone_state(net.state_dict())
        else:  # resumed: the checkpoint's global weights are authoritative
            self._move_all(device)
            net.load_state_dict(self.global_state)
        self._param_keys = {k for k, _ in net.named_parameters()}
        self._norm_keys = norm_keys(net)
        self.method.setup(net, self._param_keys, self._norm_keys)
        self._local_keys = self.method.local_keys()
        if self.norm_policy == "local":
            self._local_keys = self._local_keys | self._norm_keys
        self.server = ServerOptimizer(
            subset(self.global_state, self._param_keys),
            name=self.server_optimizer_name,
            lr=self.server_lr,
            momentum=self.server_momentum,
        )
        if self._server_state is not None:
            self.server.load_state_dict(self._server_state)
            self._server_state = None
        self._publish(pl_module)

    # ---------------------------------------------------------------- rounds
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Client switches read and write the net through this mapping (grouped copies instead of
        # state_dict/load_state_dict). Checked each round: moving the net replaces its tensors.
        self._live = self._live_tensors(self._net(pl_module))
        if isinstance(self._live, FlatState):
            self._local = detached_views(self._live)
            self.global_state = as_flat(self.global_state, self._live.layout)
            # the server's steps then write the new global parameters in place
            self.server.bind(subset(self.global_state, self._param_keys))
        else:
            self._local = None
        self._accumulator = make_accumulator(self.global_state, self._param_keys)
        self._client = None

    def _live_tensors(self, net: torch.nn.Module) -> StateDict:
        if not self.flat_state:
            return live_state(net)
        live = self._live_flat
        if live is None or not backs(live, net):
            live = self._live_flat = flatten_module(net, self._param_keys)
            if live is not None:  # a new layout: bring the kept copies onto it (once)
                self.personalized = {k: as_flat(s, live.layout)
                                     for k, s in self.personalized.items()}
        return live if live is not None else live_state(net)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        client = self.method.client_of(_client_of(batch))
        if client == self._client:
            return
        if self._client is not None:
            self._finish_client(trainer, pl_module)
        self._start_client(trainer, pl_module, client)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._finish_round(trainer, pl_module)
        else:  # validate/test from a checkpoint: copies were restored on the CPU
            self._move_all(pl_module.device)
        self._publish(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_round(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._move_all(pl_module.device)
        self._publish(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_net()
        if trainer.is_global_zero and self.global_state is not None:
            personal = self.personal_models()
            untrained = [site for k, site in enumerate(self.sites) if k not in personal]
            if personal and untrained:
                log.warning("sites %s never finished a round of training, so the routing space "
                            "has no personalized copy of them and outside sites route over the "
                            "others only; train more rounds or raise client_fraction", untrained)
            path = write_routing_space(
                self._routing_space_path(trainer),
                net_spec=getattr(pl_module, "net_spec", None),
                sites=self.sites,
                global_state=self.global_state,
                personalized={self.sites[k]: s for k, s in personal.items()},
                sample_counts=dict(zip(self.sites, self.sample_counts, strict=True)),
                rounds=self.round,
                run_id=self.run_id,
            )
            log.info("wrote %s", path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._release_net()

    def _release_net(self) -> None:
        """Out of training the net's tensors get their own storage back (re-laid out flat at
        the next round)."""
        if self._live_flat is not None:
            unflatten_module(self._live_flat)
            self._live_flat = self._live = self._local = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Between rounds the trainer's optimizer moments are dead: every client start clears
        them or loads the client's own (kept in this callback's state). Saving them would add
        three model-sized tensors (Adam with amsgrad) to each round's checkpoint, so a
        round-boundary checkpoint keeps only the optimizers' hyperparameters. A checkpoint
        saved mid-round (a step-based schedule, a Ctrl-C) is written but cannot be resumed."""
        if self._accumulator is not None and not self._warned_mid_round:
            self._warned_mid_round = True
            log.warning("a checkpoint saved in the middle of round %d (step %d) cannot be "
                        "resumed: save checkpoints at round ends (every_n_epochs, the default)",
                        self.round, trainer.global_step)
        if self._client is None and "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [
                {"state": {}, "param_groups": saved["param_groups"]}
                for saved in checkpoint["optimizer_states"]
            ]

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse a checkpoint saved in the middle of a round: the round's partial aggregate
        (and which clients already folded into it) is not saved, so it cannot resume exactly."""
        mine = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if mine.get("mid_round"):
            raise ValueError(
                f"checkpoint {trainer.ckpt_path!r} was saved in the middle of round "
                f"{mine.get('round')} (step {checkpoint.get('global_step')}); federated state "
                "is complete only between rounds. Resume from a checkpoint saved at a round's "
                "end (the run's per-round checkpoints, e.g. last.ckpt)")

    # ---------------------------------------------------------------- steps
    def _start_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int) -> None:
        if not 0 <= client < len(self.sites):
            raise ValueError(f"batch has client index {client}, but there are {len(self.sites)} sites")
        start = self.global_state
        if client in self.local_norms:  # the client's own keys over the global weights
            start = {**start, **self.local_norms[client]}
        copy_into(self._live, start)
        for i, optimizer in enumerate(trainer.optimizers):
            stored = self.client_optimizer_states.get(client, {}).get(i)
            if stored is not None:
                optimizer.load_state_dict(stored)
            else:
                reset_optimizer_state(optimizer)
        self.method.start_client(pl_module, client, self.global_state, self.personalized.get(client))
        self._client = client
        describe_round(trainer, self.round, self.sites[client])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._client is not None:
            if type(self.method).before_optimizer_step is not FederatedMethod.before_optimizer_step:
                unscale_for_hooks(pl_module, optimizer)  # the method reads and adds to .grad
            self.method.before_optimizer_step(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if self._client is not None:
            self.method.after_batch(pl_module, batch)

    def _keeps_optimizer(self) -> bool:
        keep = self.method.keep_optimizer
        return self.optimizer_state == "keep" if keep is None else keep

    def _finish_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        client = self._client
        # what state_dict() returns: views of the net's tensors
        local = self._local if self._local is not None else {
            k: v.detach() for k, v in self._live.items()}
        self._client = None
        if not all_finite(local):
            self._nonfinite_client(client)
            return
        if self.method.aggregate:
            self._accumulator.add(local, float(self.sample_counts[client]))
        personal = self.method.update_personal(self.personalized.get(client), local, client)
        if personal is not None and self.method.trains_personal and not all_finite(personal):
            self._nonfinite_personal(client)
        elif personal is not None:
            self.personalized[client] = personal
        if self._local_keys:
            self.local_norms[client] = clone_state(subset(local, self._local_keys))
        if self._keeps_optimizer():
            self.client_optimizer_states[client] = {
                i: copy.deepcopy(opt.state_dict()) for i, opt in enumerate(trainer.optimizers)
            }

    def _nonfinite_client(self, client: int) -> None:
        """Leaves a client with NaN/inf weights out of the round (or stops the run)."""
        site = self.sites[client]
        message = (
            f"round {self.round}: client {client} ({site!r}) has NaN/inf weights after local "
            "training"
        )
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"{message} (on_nonfinite='raise')")
        log.warning(
            "%s; left out of the aggregate, its personalized copy is unchanged", message
        )
        self.nonfinite.append((self.round, site))
        self.client_optimizer_states.pop(client, None)  # its moments may be NaN too

    def _nonfinite_personal(self, client: int) -> None:
        """Keeps the previous copy when the method's own personal model went NaN/inf (or stops
        the run); the client's shared update was finite and stays in the aggregate."""
        message = (f"round {self.round}: the {self.method.name} personal model of client "
                   f"{client} ({self.sites[client]!r}) has NaN/inf weights")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"{message} (on_nonfinite='raise')")
        log.warning("%s; its personalized copy is unchanged", message)

    def _finish_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._accumulator is None:
            return
        if self._client is not None:
            self._finish_client(trainer, pl_module)
        if not self.method.aggregate:
            pass  # e.g. local training: the global model never moves
        elif self._accumulator.num_clients == 0:
            log.warning("round %d: no client trained (all skipped as non-finite or none drawn); the "
                        "global model is unchanged. If this repeats, lower the learning rate or "
                        "set on_nonfinite='raise' to stop at the first fault", self.round)
        else:
            params = self.server.step(self._accumulator.mean_delta())
            if isinstance(self._accumulator, FlatAccumulator):  # the server stepped in place
                self._accumulator.write_mean_buffers(self.global_state)
            else:
                merged = {**self._accumulator.mean_buffers(), **params}
                self.global_state = {k: merged[k] for k in self.global_state}  # keep key order
        copy_into(self._live, self.global_state)
        self._accumulator = None
        self._live = self._local = None
        self.round += 1
        self._publish(pl_module)

    # ---------------------------------------------------------------- helpers
    def _routing_space_path(self, trainer: pl.Trainer) -> str:
        return f"{trainer.log_dir}/{self.routing_space_name}"

    def personal_models(self) -> dict[int, StateDict]:
        """Each client's personalized model: its own copy where the method keeps one, else
        (FedBN, FedPer, local) the global weights with the client's local keys over them."""
        out = {k: {**self.global_state, **s} for k, s in self.local_norms.items()}
        out.update(self.personalized)
        return dict(sorted(out.items()))

    def _publish(self, pl_module: pl.LightningModule) -> None:
        """Hands the personalized models (by site name) to the module for evaluation."""
        if self.global_state is None:
            return
        pl_module.personalized_states = {self.sites[k]: s for k, s in self.personal_models().items()}

    def _move_all(self, device: torch.device) -> None:
        if self.global_state is not None:
            self.global_state = _to(self.global_state, device)
        self.personalized = {k: _to(s, device) for k, s in self.personalized.items()}
        self.local_norms = {k: _to(s, device) for k, s in self.local_norms.items()}

    @staticmethod
    def _net(pl_module: pl.LightningModule) -> torch.nn.Module:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"{type(pl_module).__name__} must expose the trained network as `.net`")
        return net

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        cpu = torch.device("cpu")
        return {
            "round": self.round,
            "sites": list(self.sites),
            "global_state": None if self.global_state is None else _to(self.global_state, cpu),
            "personalized": {k: _to(s, cpu) for k, s in self.personalized.items()},
            "local_norms": {k: _to(s, cpu) for k, s in self.local_norms.items()},
            "client_optimizer_states": self.client_optimizer_states,
            "server_optimizer": None if self.server is None else self.server.state_dict(),
            "method": {"name": self.method.name, "state": self.method.state_dict()},
            "run_id": self.run_id,
            "nonfinite": list(self.nonfinite),
            # mid-round, the finished clients' partial aggregate is not in the state (below)
            "mid_round": self._accumulator is not None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [k for k in self._STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(
                f"FederatedTrainer: checkpoint state lacks keys {missing} (written by another "
                "version of iopfl_lightning, or not a federated checkpoint)"
            )
        if self.sites and list(state_dict["sites"]) != self.sites:  # setup ran first: data's
            raise ValueError(
                f"checkpoint was trained on sites {list(state_dict['sites'])}, "
                f"data has {self.sites}"
            )
        self.round = int(state_dict["round"])
        self.sites = list(state_dict["sites"])
        self.global_state = state_dict["global_state"]
        self.personalized = {int(k): s for k, s in state_dict["personalized"].items()}
        self.local_norms = {int(k): s for k, s in state_dict["local_norms"].items()}
        self.client_optimizer_states = {
            int(k): v for k, v in state_dict["client_optimizer_states"].items()
        }
        self._server_state = state_dict["server_optimizer"]
        method = state_dict.get("method", {"name": "iopfl", "state": {}})
        if method["name"] != self.method.name:
            raise ValueError(f"checkpoint was trained with method {method['name']!r}, "
                             f"this run uses {self.method.name!r}")
        self.method.load_state_dict(method["state"])
        self.run_id = state_dict.get("run_id")
        self.nonfinite = [(int(r), str(s)) for r, s in state_dict.get("nonfinite", [])]


def _check_round_is_epoch(trainer: pl.Trainer) -> None:
    """Refuse Trainer settings that break "one round = one epoch, clients one after another"."""
    interval = trainer.val_check_interval
    if not (isinstance(interval, float) and interval == 1.0):  # an int 1 means every batch
        raise ValueError(f"FederatedTrainer needs val_check_interval=1.0 (one round = one "
                         f"epoch), got {interval!r}")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"FederatedTrainer switches clients between batches, so accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches} would step one client's model with another's "
            "gradients; set it to 1 (a larger data.batch_size accumulates nothing across sites)")


def _client_of(batch: Any) -> int:
    """Client index of a training batch; every sample of a batch must share it."""
    if isinstance(batch, dict) and "client_id" in batch:
        return int(batch["client_id"])
    if not isinstance(batch, dict) or "client" not in batch:
        raise KeyError("FederatedTrainer needs the client index in every batch under 'client'")
    return int(batch["client"][0])
