"""SegmentationModule: trains and evaluates one segmentation net (global and personalized copies).

The net comes from the factory in ``nets/``. Evaluation runs the module's own weights as the
``global`` model and, where the FederatedTrainer has published them, each site's personalized
copy through ``torch.func.functional_call``: no module is copied or moved to evaluate a copy.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.func import functional_call

from iopfl_lightning.federated.state import check_same_keys
from iopfl_lightning.modules.compiling import CompileMode, check_compile_mode, compiled_or_none
from iopfl_lightning.modules.evaluation import SiteEvaluator, log_rows, report_test
from iopfl_lightning.modules.losses import LossName, SegmentationLoss
from iopfl_lightning.modules.optim import adam, fused_allowed
from iopfl_lightning.nets import build_from_spec, net_spec
from iopfl_lightning.viz.collect import OverlayCases

log = logging.getLogger(__name__)

class SegmentationModule(pl.LightningModule):
    """Args:
    net: ``unet`` (the paper's 2D UNet) or an ``smp.<Architecture>`` name.
    in_channels, num_classes: taken from the datamodule when left as None.
    features: base width of the paper UNet.
    encoder_name, encoder_weights: for smp nets (no weights can be downloaded offline).
    loss: ``dice`` (reference) or ``dice_ce``.
    lr, amsgrad, weight_decay: Adam settings (reference: 1e-3, amsgrad).
    channels_last: train and evaluate in channels_last memory format (faster on GPUs, and on
        CPUs from 64 px up; even at the demo's 48 px: docs/performance.md).
    val_hd95: compute HD95 during per-round validation too (test always does).
    compile: run the training forward through ``torch.compile``, and (``compile_eval``) the
        evaluation forward too. State dict keys and parameters are the net's own, so
        checkpoints and the FederatedTrainer are unaffected.
    compile_mode: ``torch.compile`` mode: ``default``, ``reduce-overhead`` (CUDA graphs: no
        per-kernel launch cost; they need the weights at fixed addresses, which client switches
        keep by copying in place; 1.33x a round on an H200, docs/performance.md) or ``max-autotune``.
    compile_eval: with ``compile``, evaluate the global model and every personalized copy
        through one compiled function of (weights, image) in the default mode: the weights are
        its inputs, so swapping copies does not recompile (CUDA graphs are left out here: they
        would have to copy the weights in at every call). Fuses evaluation's BatchNorm and
        ReLU, which run as separate kernels eagerly.
    overlay_cases: test cases per site drawn in the run folder's ``overlays.png`` (their
        slice with the largest ground-truth area, every evaluated model); 0 draws none.
    """

    def __init__(
        self,
        net: str = "unet",
        in_channels: int | None = None,
        num_classes: int | None = None,
        features: int = 32,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        loss: LossName = "dice",
        lr: float = 1e-3,
        amsgrad: bool = True,
        weight_decay: float = 0.0,
        channels_last: bool = False,
        val_hd95: bool = True,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        compile_eval: bool = True,
        overlay_cases: int = 2,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if overlay_cases < 0:
            raise ValueError(f"overlay_cases must be >= 0, got {overlay_cases}")
        check_compile_mode(compile_mode)
        self.save_hyperparameters()
        self.loss_fn = SegmentationLoss(loss)
        self.net: torch.nn.Module | None = None
        self.net_spec: dict | None = None
        self.personalized_states = {}
        self._evaluator: SiteEvaluator | None = None
        self._overlays: OverlayCases | None = None
        self._live_weights: dict[str, torch.Tensor] | None = None
        self._round_loss: torch.Tensor | None = None
        self._round_batches = 0
        if in_channels is not None and num_classes is not None:
            self._build(in_channels, num_classes)

    @property
    def personalized_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each site's personalized state, evaluated beside the global weights; checked against
        the net's keys and shapes at the first evaluation after it is set."""
        return self._personalized_states

    @personalized_states.setter
    def personalized_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self._personalized_states = dict(states)
        self._states_checked = False

    # ------------------------------------------------------------ construction
    def _build(self, in_channels: int, num_classes: int) -> None:
        hp = self.hparams
        spec = net_spec(
            hp.net,
            in_channels=in_channels,
            num_classes=num_classes,
            features=hp.features,
            encoder_name=hp.encoder_name,
            encoder_weights=hp.encoder_weights,
        )
        self.net_spec = dict(spec)
        self.net = build_from_spec(spec, load_pretrained=hp.encoder_weights is not None)
        if hp.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # Kept out of the module tree (no extra state dict keys): same parameters as self.net.
        compiled = bool(hp.get("compile"))
        self.__dict__["_compiled_net"] = compiled_or_none(
            self.net, compiled, hp.get("compile_mode", "default"))
        self.__dict__["_compiled_eval"] = compiled_or_none(
            self._weights_forward, compiled and hp.get("compile_eval", True))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        wanted = {
            "in_channels": getattr(datamodule, "in_channels", None),
            "num_classes": getattr(datamodule, "num_classes", None),
        }
        if self.net is None:
            missing = [k for k, v in wanted.items() if v is None and self.hparams[k] is None]
            if missing:
                raise ValueError(f"set model {missing} or use a datamodule that provides them")
            self.hparams.in_channels = self.hparams.in_channels or wanted["in_channels"]
            self.hparams.num_classes = self.hparams.num_classes or wanted["num_classes"]
            self._build(self.hparams.in_channels, self.hparams.num_classes)
        for key, value in wanted.items():
            if value is not None and value != self.hparams[key]:
                raise ValueError(f"model {key}={self.hparams[key]} but the data has {key}={value}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return adam(self.net.parameters(), fused_ok=fused_allowed(self._trainer), lr=hp.lr,
                    amsgrad=hp.amsgrad, weight_decay=hp.weight_decay)

    # ------------------------------------------------------------ forward
    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    def forward(self, image: torch.Tensor, state: dict[str, torch.Tensor] | None = None):
        image = self._prepare(image)
        if state is None:
            return self.net(image)
        return functional_call(self.net, state, (image,), strict=True)

    def _weights_forward(self, weights: dict[str, torch.Tensor], image: torch.Tensor):
        """The net on ``image`` with ``weights`` (a full state, keys already checked)."""
        return functional_call(self.net, weights, (image,), strict=False)

    def _evaluation_forward(self, image: torch.Tensor, weights: dict | None = None):
        """Logits of the module's own weights (``weights`` None) or of a personalized copy,
        compiled with ``compile_eval``."""
        compiled = self.__dict__.get("_compiled_eval")
        if compiled is None:
            return self.net(image) if weights is None else self._weights_forward(weights, image)
        if weights is None:  # the live tensors, read once per evaluation epoch: state_dict's
            if self._live_weights is None:  # detached views, like a copy's: one graph for both
                self._live_weights = dict(self.net.state_dict())
            weights = self._live_weights
        return compiled(dict(weights), image)  # a plain dict: one guard set for every copy

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        compiled = self.__dict__.get("_compiled_net")
        logits = self(batch["image"]) if compiled is None else compiled(self._prepare(batch["image"]))
        loss = self.loss_fn(logits, batch["mask"])
        # Not on the progress bar: Lightning turns progress-bar values into Python numbers at
        # every batch end, a host-device synchronisation per step that stalls a GPU's queue.
        # The bar shows the round's mean batch loss instead, read back once per round.
        self.log("train/loss", loss, batch_size=batch["image"].shape[0])
        detached = loss.detach()
        self._round_loss = detached if self._round_loss is None else self._round_loss + detached
        self._round_batches += 1
        return loss

    def on_train_epoch_start(self) -> None:
        self._round_loss, self._round_batches = None, 0

    def on_train_epoch_end(self) -> None:
        if self._round_batches:
            self.log("train/round_loss", self._round_loss / self._round_batches, prog_bar=True)

    # ------------------------------------------------------------ evaluation
    def _site(self, stage: str, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "inside_sites" if stage == "val" else "test_sites", None)
        return names[dataloader_idx] if names else f"site{dataloader_idx}"

    def _evaluate(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        if self._evaluator is None:  # the first batch of an evaluation epoch
            self._evaluator = SiteEvaluator(
                self.hparams.num_classes, hd95=stage == "test" or self.hparams.val_hd95
            )
            self._live_weights = None  # a move since the last epoch replaces the net's tensors
        site = self._site(stage, dataloader_idx)
        image = self._prepare(batch["image"])
        logits = {"global": self._evaluation_forward(image)}
        state = self.personalized_states.get(site)
        if state is not None:
            if not self._states_checked:  # once per published set, not per batch
                reference = self.net.state_dict()
                for name, other in self.personalized_states.items():
                    check_same_keys(reference, other, f"personalized state of {name!r}")
                self._states_checked = True
            # keys checked: functional_call's own check is skipped
            logits["personalized"] = self._evaluation_forward(image, state)
        for model, scores in logits.items():
            self._evaluator.update(site, model, scores, batch)
        if stage == "test" and self._overlays is not None:
            self._overlays.update(site, batch, logits)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def _collect(self, stage: str) -> list[dict]:
        rows = self._evaluator.rows() if self._evaluator is not None else []
        self._evaluator = None
        log_rows(self, stage, rows, hd95=stage == "test" or self.hparams.val_hd95)
        return rows

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._collect("val")
        elif self._evaluator is not None:
            self._evaluator = None

    def on_test_start(self) -> None:
        self._overlays = OverlayCases(self.hparams.overlay_cases,
                                      num_classes=self.hparams.num_classes)

    def on_test_epoch_end(self) -> None:
        rows = self._collect("test")
        self.test_results = rows
        report_test(self, rows, "Test results", self._overlays)
        self._overlays = None
