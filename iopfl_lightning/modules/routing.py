"""RoutingModule: IOP-FL outside personalization (test-time routing) as a LightningModule.

``trainer.fit`` adapts, on the new site's UNLABELLED images (``MultiSiteDataModule(...,
outside=[SITE], train_on="outside")``), the routers of a routed net built from a
``routing_space.pt`` (K personalized models + the global model) and its normalization affine
parameters; the experts stay frozen. ``trainer.test`` then scores, on the same site, the
routed model and the baselines ``global`` (as is), ``uniform`` (weight average of the K + 1
models), ``ensemble`` (mean softmax of the K + 1 models) and ``tent`` (entropy minimisation of
the global model's normalization affine parameters, same passes and lr), and writes
``results.csv`` / ``results.md`` into ``trainer.log_dir``.

Evaluation modes (the result is always the LAST iterate; no epoch is chosen with labels):

- ``online`` (the paper's): ``training_step`` updates on a batch, then predicts that same
  batch with the updated model and stores the argmax per (case, slice) on the CPU; a later
  pass overwrites an earlier one, so after ``fit`` the store holds each slice's prediction
  from the final pass. ``test_step`` only looks the predictions up and scores them against
  the test labels. The labels are read in ``test_step`` only, after fitting has ended.
- ``offline``: fit, then ``test_step`` predicts every test batch with the final weights.

Manual optimization: the routed net and the TENT net each have their own Adam and both take
one step per batch; this keeps the two adaptations independent and lets ``training_step``
predict after the update, which automatic optimization cannot do.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from iopfl_lightning.data.datamodule import sample_keys
from iopfl_lightning.modules import routing_state as rs
from iopfl_lightning.modules import tta_losses as tl
from iopfl_lightning.modules.compiling import CompileMode, check_compile_mode, compiled_or_none
from iopfl_lightning.modules.evaluation import MixtureMeter, SiteEvaluator, log_rows, report_test
from iopfl_lightning.modules.optim import adam, fused_allowed
from iopfl_lightning.modules.routing_experts import (
    average_states,
    ensemble_probabilities,
    load_experts,
    norm_layers,
    to_device,
    use_batch_statistics,
)
from iopfl_lightning.nets import build_from_spec
from iopfl_lightning.nets.mix_choice import MIX_OPTIONS, MixOption, choose_mixes
from iopfl_lightning.nets.routed import (
    build_routed_net,
    norm_affine_parameters,
    routed_layers,
    router_parameters,
    set_mix,
    set_mixture_recording,
)
from iopfl_lightning.nets.routed_layers import GATES, STARTS, Gate, Start
from iopfl_lightning.viz import routing_heatmap
from iopfl_lightning.viz.collect import OverlayCases

log = logging.getLogger(__name__)

Norm = Literal["batch", "running"]
EvalMode = Literal["online", "offline"]
BASELINES: tuple[str, ...] = ("global", "uniform", "ensemble", "tent")
ADAPTED: tuple[str, ...] = ("tent", "routed")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _trainable_only(net: nn.Module, params: list[nn.Parameter]) -> None:
    """Freeze every parameter of ``net`` except ``params``."""
    net.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


class RoutingModule(pl.LightningModule):
    """Test-time routing over the personalized models of a federation (see the module doc).

    Args:
        routing_space: path of the ``routing_space.pt`` written by the inside federation
            (trained with this site held out).
        gate, start: router gate (``softmax`` / the reference's ``sigmoid``) and the mixture at
            step 0 (``uniform`` / ``global`` / the reference's ``random``).
        norm: ``batch``: normalization layers use the new site's batch statistics (the paper);
            ``running``: they keep the global model's running statistics.
        entropy_weight, consistency_weight, shape_weight: loss weights (reference 10, 0.1, 1).
        shape_loss, shape_radius: shape term (``maxpool`` = the reference's, or ``none``) and
            its window radius.
        noise_std: std of the Gaussian noise of the augmented view (images as the loader
            gives them).
        lr: Adam learning rate of the routed and the TENT adaptation.
        eval_mode: ``online`` (paper) or ``offline`` (fit then test).
        baselines: which of ``global``, ``uniform``, ``ensemble``, ``tent`` to report besides
            ``routed`` (None = all).
        router_hidden, router_dropout, global_eps: router settings (see ``RouterConfig``).
        train_norm_affine: also adapt the routed net's normalization affine parameters.
        overlay_cases: test cases drawn in the run folder's ``overlays.png`` (every model
            side by side); 0 draws none. ``routing_weights.png`` shows the mean mixture per
            layer and expert of the reported (last) pass.
        mix: how routed convolutions compute the per-sample mixture: ``kernels`` (mix the
            kernels, one grouped convolution) or ``outputs`` (one dense convolution over all
            experts, outputs weighted; E times the arithmetic, no grouped kernels). Same
            result up to float rounding; see ``nets.routed_layers``. ``auto`` times both for
            every routed convolution on the first training batch (forward and backward, on
            the device, in the run's precision) and keeps the faster per layer
            (``nets.mix_choice``; the choice is logged and kept in ``mix_choice``). Timings
            can choose differently from run to run, and so the float rounding: a run that must
            repeat bit for bit keeps a fixed mix.
        compile, compile_mode: run the adaptation step's two forwards of the routed net
            through ``torch.compile`` (its mode as in ``SegmentationModule``); evaluation and
            the baselines stay eager. Parameters and state dict keys are the net's own.
    """

    def __init__(
        self,
        routing_space: str,
        gate: Gate = "softmax",
        start: Start = "uniform",
        norm: Norm = "batch",
        entropy_weight: float = 10.0,
        consistency_weight: float = 0.1,
        shape_weight: float = 1.0,
        shape_loss: tl.ShapeLoss = "maxpool",
        shape_radius: int = 10,
        noise_std: float = 0.1,
        lr: float = 1e-3,
        eval_mode: EvalMode = "online",
        baselines: list[str] | None = None,
        router_hidden: int | None = None,
        router_dropout: float = 0.0,
        global_eps: float = 1e-2,
        train_norm_affine: bool = True,
        overlay_cases: int = 3,
        mix: MixOption = "kernels",
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "default",
    ) -> None:
        super().__init__()
        self._check_args(gate, start, norm, shape_loss, eval_mode, baselines, lr, noise_std,
                         overlay_cases)
        _choice("mix", mix, MIX_OPTIONS)
        check_compile_mode(compile_mode)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.baselines = list(BASELINES if baselines is None else baselines)
        experts = load_experts(routing_space)
        self.inside_sites = experts.sites  # the experts' sites (the routing heatmap's names)
        # every site of the federation, also one without a copy: its data trained the global
        self.federation_sites = experts.federation or experts.sites
        self.net_spec = experts.net_spec
        self.num_classes = int(experts.net_spec["num_classes"])
        base = build_from_spec(experts.net_spec)
        self.net = build_routed_net(base, experts.states, gate=gate, start=start,
                                    hidden=router_hidden, dropout=router_dropout,
                                    global_eps=global_eps)
        set_mix(self.net, "kernels" if mix == "auto" else mix)
        self.mix_choice: dict[str, dict] | None = None  # per layer, with mix="auto"
        affine = norm_affine_parameters(self.net) if train_norm_affine else []
        _trainable_only(self.net, router_parameters(self.net) + affine)
        base.load_state_dict(experts.global_state)
        self.tent_net = copy.deepcopy(base) if "tent" in self.baselines else None
        if self.tent_net is not None:
            _trainable_only(self.tent_net, norm_affine_parameters(self.tent_net))
        self.plain = base.requires_grad_(False)  # architecture for functional_call baselines
        if channels_last:
            for net in (self.net, self.tent_net, self.plain):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        if norm == "batch":
            for net in self.adapted_nets().values():
                use_batch_statistics(net)
        # kept out of the module tree (no extra state dict keys): the same parameters
        self.__dict__["_compiled_net"] = compiled_or_none(self.net, compile, compile_mode)
        self._states = experts.states
        self._uniform = average_states(experts.states)
        self._online: dict[str, dict[tuple[int, int], Tensor]] = {m: {} for m in ADAPTED}
        self._evaluator: SiteEvaluator | None = None
        self._overlays: OverlayCases | None = None
        self._mixtures = MixtureMeter()  # of the pass that is reported (see module doc)
        self._steps = 0
        self._resumed = False  # state restored from a checkpoint (on_load_checkpoint)
        self._space_sha: str | None = None
        self.test_results: list[dict] = []
        self.train()  # the norm mode's layer modes from the start (nn.Module starts in train)

    @staticmethod
    def _check_args(gate, start, norm, shape_loss, eval_mode, baselines, lr, noise_std,
                    overlay_cases) -> None:
        """Fail at construction on an unknown choice or a bad number."""
        _choice("gate", gate, GATES)
        _choice("start", start, STARTS)
        _choice("norm", norm, ("batch", "running"))
        _choice("shape_loss", shape_loss, tl.SHAPE_LOSSES)
        _choice("eval_mode", eval_mode, ("online", "offline"))
        for name in baselines or []:
            _choice("baselines entry", name, BASELINES)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if overlay_cases < 0:
            raise ValueError(f"overlay_cases must be >= 0, got {overlay_cases}")

    def adapted_nets(self) -> dict[str, nn.Module]:
        """The nets fitted at test time, by result name."""
        nets = {"routed": self.net}
        if self.tent_net is not None:
            nets["tent"] = self.tent_net
        return nets

    # ------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if dm is None:
            return
        leaked = [s for s in getattr(dm, "outside_sites", []) if s in self.federation_sites]
        if leaked:
            raise ValueError(f"outside site(s) {leaked} were inside sites of routing space "
                             f"{self.hparams.routing_space!r} ({self.federation_sites}); train the "
                             "federation with them held out (--data.outside)")
        if stage == "fit" and getattr(dm, "train_on", "outside") != "outside":
            raise ValueError("RoutingModule fits on the outside site's unlabelled images: set "
                             "data.train_on: outside (and data.outside: [SITE])")
        for key, value in (("in_channels", getattr(dm, "in_channels", None)),
                           ("num_classes", getattr(dm, "num_classes", None))):
            if value is not None and value != self.net_spec[key]:
                raise ValueError(f"routing space nets have {key}={self.net_spec[key]} but the "
                                 f"data has {key}={value}")

    def train(self, mode: bool = True) -> RoutingModule:
        """Like ``nn.Module.train``; with ``norm='running'`` BatchNorms of the adapted nets stay
        in eval mode, so their running statistics are used and never updated."""
        super().train(mode)
        if self.hparams.norm == "running":
            for net in self.adapted_nets().values():
                for layer in norm_layers(net):
                    layer.eval()
        return self

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = self.hparams.lr
        fused_ok = fused_allowed(self._trainer)
        return [adam([p for p in net.parameters() if p.requires_grad], fused_ok, lr=lr)
                for net in self.adapted_nets().values()]

    def forward(self, image: Tensor) -> Tensor:
        """Logits of the routed net."""
        return self.net(self._prepare(image))

    def _prepare(self, image: Tensor) -> Tensor:
        if self.hparams.channels_last:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    # ------------------------------------------------------------ fitting (no labels)
    def on_fit_start(self) -> None:
        if not self._resumed:  # a resumed fit keeps the predictions of the passes it restored
            self._steps = 0
            for store in self._online.values():
                store.clear()
        set_mixture_recording(self.net, True)

    # ------------------------------------------------------------ checkpoints
    def _space_fingerprint(self) -> str:
        if self._space_sha is None:
            self._space_sha = rs.fingerprint(self.hparams.routing_space)
        return self._space_sha

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keeps what scoring and resuming need besides the nets (``modules.routing_state``)."""
        checkpoint["routing"] = {
            "space_sha256": self._space_fingerprint(), "steps": self._steps,
            "mix_choice": self.mix_choice, "online": rs.online_state(self._online),
            "mixtures": self._mixtures.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("routing")
        if saved is None:  # written before these were kept
            return
        space = self.hparams.routing_space
        if saved["space_sha256"] != self._space_fingerprint():
            raise ValueError(f"{space} changed since this checkpoint was written: its global, "
                             "uniform and ensemble baselines would come from other models than "
                             "the routed net's experts; use the routing space it was fitted on")
        if self.hparams.eval_mode == "online" and not rs.ends_a_pass(checkpoint):
            raise ValueError(f"this online-mode checkpoint (step {checkpoint.get('global_step')})"
                             " was saved in the middle of a pass, whose predictions it cannot "
                             "complete; resume or test from a checkpoint saved at a pass's end")
        device = self.device
        self._steps, self._resumed = int(saved["steps"]), True
        self._online = rs.load_online(saved["online"], device)
        self._mixtures.load_state_dict(saved["mixtures"], device)
        self.mix_choice = saved["mix_choice"]
        layers = dict(routed_layers(self.net))
        for name, row in (self.mix_choice or {}).items():
            layers[name].mix = row["chosen"]

    def on_train_epoch_start(self) -> None:
        # Lightning does not call train() when fitting starts (it keeps each layer's mode), so
        # the norm mode's layer modes are set here, for every pass.
        self.train()
        self._mixtures.reset()  # online mode reports the last pass: average its mixtures only

    def on_fit_end(self) -> None:
        """Refuse a fit that saw no image (an empty target) instead of reporting step 0."""
        if self._steps == 0:
            dm = getattr(self.trainer, "datamodule", None)
            site = getattr(dm, "outside_sites", None) or "of the train loader"
            raise ValueError(f"empty target: outside site {site} gave no images to adapt on")

    def routed_objective(self, image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted entropy + consistency + shape loss of the routed net on ``image``."""
        hp = self.hparams
        compiled = self.__dict__.get("_compiled_net")
        net = self.net if compiled is None else compiled
        logits = net(image)
        view, turns, flips = tl.augment_view(image, hp.noise_std)
        back = tl.invert_view(net(view), turns, flips)
        parts = {
            "entropy": tl.entropy_loss(logits),
            "consistency": tl.consistency_loss(back, logits),
            "shape": tl.shape_loss(logits, hp.shape_loss, hp.shape_radius),
        }
        total = (hp.entropy_weight * parts["entropy"] + hp.consistency_weight
                 * parts["consistency"] + hp.shape_weight * parts["shape"])
        return total, parts

    def _choose_mix(self, image: Tensor) -> None:
        """``mix="auto"``: each routed convolution's faster mix at this batch's shapes."""
        self.mix_choice = choose_mixes(self.net, lambda: self.net(image))
        chosen = [v["chosen"] for v in self.mix_choice.values()]
        log.info("mix auto: %d routed convolutions mix kernels, %d mix outputs (timed on %s)",
                 chosen.count("kernels"), chosen.count("outputs"), image.device)

    def _step(self, optimizer, loss: Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        image = self._prepare(batch["image"])  # the target's labels are never read here
        if self.hparams.mix == "auto" and self.mix_choice is None:
            self._choose_mix(image)
        self._steps += 1
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        loss, parts = self.routed_objective(image)
        self._step(optimizers[0], loss)
        size = image.shape[0]
        # The bar shows the pass's mean loss: a per-step bar value is read back at every step.
        self.log("adapt/loss", loss.detach(), batch_size=size)
        self.log("adapt/pass_loss", loss.detach(), prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=size)
        for name, value in parts.items():
            self.log(f"adapt/{name}", value.detach(), batch_size=size)
        if self.tent_net is not None:
            tent_loss = tl.entropy_loss(self.tent_net(image))
            self._step(optimizers[1], tent_loss)
            self.log("adapt/tent_entropy", tent_loss.detach(), batch_size=size)
        if self.hparams.eval_mode == "online":
            self._record_online(batch, image)
        return loss.detach()

    @torch.no_grad()
    def _record_online(self, batch: dict, image: Tensor) -> None:
        """Store each adapted net's argmax on ``batch`` right after its update (uint8, kept on
        the device: copying it to the host would wait for the step at every step)."""
        keys = sample_keys(batch)
        self.eval()
        try:
            for name, net in self.adapted_nets().items():
                preds = net(image).argmax(1).to(torch.uint8)
                self._online[name].update(zip(keys, preds, strict=True))
                if name == "routed":
                    self._mixtures.update(net, len(keys))
        finally:
            self.train()

    # ------------------------------------------------------------ evaluation (labels)
    def on_test_start(self) -> None:
        self._evaluator = SiteEvaluator(self.num_classes, hd95=True)
        self._overlays = OverlayCases(self.hparams.overlay_cases, num_classes=self.num_classes)
        if self.hparams.eval_mode == "offline":
            self._mixtures.reset()
            set_mixture_recording(self.net, True)
        self._dev_states = to_device(self._states, self.device)
        self._dev_uniform = to_device([self._uniform], self.device)[0]
        if self.hparams.eval_mode == "online" and not self._online["routed"]:
            raise ValueError("eval_mode='online' scores the predictions made while fitting, but "
                             "nothing was fitted: run fit first, or use eval_mode='offline'")

    def _site(self, dataloader_idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "test_sites", None)
        return names[dataloader_idx] if names else f"site{dataloader_idx}"

    def _online_logits(self, name: str, batch: dict) -> Tensor:
        """One-hot 'logits' of the stored online predictions (argmax gives them back)."""
        store = self._online[name]
        keys = sample_keys(batch)
        missing = [k for k in keys if k not in store]
        if missing:
            raise ValueError(f"online mode: no prediction for (case, slice) {missing[0]}; the "
                             "fit did not cover the whole target (limit_train_batches?)")
        preds = torch.stack([store[k].to(self.device) for k in keys]).long()
        return F.one_hot(preds, self.num_classes).permute(0, 3, 1, 2).float()

    def _baseline_logits(self, name: str, image: Tensor) -> Tensor:
        if name == "global":
            return functional_call(self.plain, self._dev_states[-1], (image,), strict=True)
        if name == "uniform":
            return functional_call(self.plain, self._dev_uniform, (image,), strict=True)
        return ensemble_probabilities(self.plain, self._dev_states, image).clamp_min(1e-8).log()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        site, image = self._site(dataloader_idx), self._prepare(batch["image"])
        nets, online = self.adapted_nets(), self.hparams.eval_mode == "online"
        logits: dict[str, Tensor] = {}
        for name in [*self.baselines, "routed"]:
            if name in ADAPTED:
                logits[name] = self._online_logits(name, batch) if online else nets[name](image)
                if name == "routed" and not online:
                    self._mixtures.update(self.net, image.shape[0])
            else:
                logits[name] = self._baseline_logits(name, image)
            self._evaluator.update(site, name, logits[name], batch)
        self._overlays.update(site, batch, logits)

    def on_test_epoch_end(self) -> None:
        rows = self._evaluator.rows() if self._evaluator is not None else []
        self._evaluator = None
        log_rows(self, "test", rows)
        self.test_results = rows
        mixtures = self._mixtures.mean()
        figures = {}
        if mixtures:
            sites = ", ".join(dict.fromkeys(r["site"] for r in rows))
            figures["routing_weights"] = routing_heatmap(
                mixtures, expert_names=[*self.inside_sites, "global"],
                title=f"Mean routing weights on {sites}")
        report_test(self, rows, "Outside personalization", self._overlays, figures)
        self._overlays = None
