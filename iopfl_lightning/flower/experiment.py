"""Reads an experiment YAML (the file ``fit --config`` takes) for a Flower run.

The file goes through the project's own LightningCLI parser, so defaults, ``class_path``
resolution, validation and ``seed_everything`` are exactly those of ``fit``; nothing is trained
and no Trainer is built. From it a Flower run takes:

- the model (its net built with the data's channels and classes, right after seeding, as ``fit``
  builds it), which gives the initial global weights and ``net_spec``;
- the data module's arguments, to build each site's one-site data module;
- the ``FederatedTrainer`` callback's settings (``alpha``, ``local_epochs``, server optimizer,
  ``client_fraction``, ``on_nonfinite``);
- the Trainer options that change how a step is computed (precision, clipping, accelerator...).

Only the IOP-FL method with a fresh optimizer per round and averaged normalization layers maps
onto the Flower adapter; other settings are refused with an error naming the file and key.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Trainer options a client's local training takes from the YAML; everything else (epochs,
# loggers, callbacks, checkpointing, validation cadence) belongs to the federation, not the site.
LOCAL_TRAINER_KEYS = (
    "accelerator", "devices", "precision", "deterministic", "benchmark",
    "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches",
)


@dataclass
class Experiment:
    """What a Flower run needs from an experiment YAML (see the module docstring)."""

    path: str
    model: Any  # a LightningModule exposing `.net` (SegmentationModule)
    data_args: dict[str, Any]
    sites: list[str]
    federation: Any  # the FederatedTrainer callback of the YAML
    trainer_args: dict[str, Any]
    max_epochs: int

    @property
    def net_spec(self) -> dict | None:
        return getattr(self.model, "net_spec", None)


def load_experiment(path: str, data_root: str | None = None) -> Experiment:
    """Parses ``path`` like ``fit --config path`` (plus ``--data.root data_root``)."""
    from iopfl_lightning.federated import FederatedTrainer

    args = ["--config", str(path)] + (["--data.root", data_root] if data_root else [])
    cli = _parse(path, args)
    data_args = cli.config["data"].as_dict()
    trainer_config = cli.config["trainer"].as_dict()
    federation = [c for c in cli.config_init["trainer"].get("callbacks") or []
                  if isinstance(c, FederatedTrainer)]
    if len(federation) != 1:
        raise ValueError(f"{path}: trainer.callbacks must hold one FederatedTrainer, "
                         f"found {len(federation)}")
    _check_federation(path, federation[0])
    _check_precision(path, trainer_config.get("precision"))
    datamodule = cli.datamodule
    sites = _inside_sites(path, data_args, datamodule)
    model = cli.model
    _build_net(path, model, datamodule)
    return Experiment(
        path=str(path),
        model=model,
        data_args=data_args,
        sites=sites,
        federation=federation[0],
        trainer_args={k: trainer_config[k] for k in LOCAL_TRAINER_KEYS if k in trainer_config},
        max_epochs=int(trainer_config.get("max_epochs") or 0),
    )


def _parse(path: str, args: list[str]):
    """LightningCLI with the project's parser, ``run=False`` and no Trainer built."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    from iopfl_lightning.cli import IOPFLCLI
    from iopfl_lightning.data import MultiSiteDataModule

    class ConfigOnlyCLI(IOPFLCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            # no subcommands here: the fit/test-only hooks of IOPFLCLI do not apply
            LightningCLI.parse_arguments(self, parser, args)

        def instantiate_trainer(self, **kwargs: Any) -> None:
            return None

    try:
        with warnings.catch_warnings():  # a ClientApp's own argv is not ours to parse
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            return ConfigOnlyCLI(
                LightningModule, MultiSiteDataModule, subclass_mode_model=True, run=False,
                args=args, auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
            )
    except SystemExit as err:  # argparse's way of reporting a bad file
        raise ValueError(f"{path}: not a valid experiment config (exit {err.code})") from err
    except Exception as err:
        raise ValueError(f"{path}: not a valid experiment config: {err}") from err


def _check_federation(path: str, fed: Any) -> None:
    """Settings the Flower adapter implements; anything else is refused, not ignored."""
    wanted = {
        "method": ("iopfl", fed.method.name),
        "optimizer_state": ("reset", fed.optimizer_state),
        "norm_policy": ("average", fed.norm_policy),
    }
    for key, (supported, value) in wanted.items():
        if value != supported:
            raise ValueError(
                f"{path}: FederatedTrainer {key}={value!r} is not supported by the Flower "
                f"adapter (supported: {supported!r}); use the in-process engine for it"
            )


def _check_precision(path: str, precision: Any) -> None:
    """Sites send their weights in the global model's dtypes (fp32): a precision that keeps
    the weights themselves in bf16/fp16/fp64 (``*-true``) is refused, mixed precision is not."""
    text = str(precision) if precision is not None else "32-true"
    if text not in ("32", "32-true", "bf16-mixed", "16-mixed"):
        raise ValueError(f"{path}: trainer.precision={text!r} is not supported by the Flower "
                         "adapter (the weights travel as float32); use 32-true, bf16-mixed or "
                         "16-mixed, or the in-process engine")


def _inside_sites(path: str, data_args: dict[str, Any], datamodule: Any) -> list[str]:
    """The federation's sites in client order; the YAML must list them (a site's machine sees
    only its own data, so 'every site found under root' would differ from node to node)."""
    if not data_args.get("sites"):
        raise ValueError(f"{path}: data.sites must list the federation's sites for a Flower run")
    return list(datamodule.inside_sites)


def _build_net(path: str, model: Any, datamodule: Any) -> None:
    """Builds the net the way ``fit`` does (in ``setup``, from the data's channels/classes)."""
    if not hasattr(model, "net"):
        raise ValueError(f"{path}: model {type(model).__name__} exposes no `.net` to federate")
    if model.net is None:
        hp = model.hparams
        hp.in_channels = hp.in_channels or datamodule.in_channels
        hp.num_classes = hp.num_classes or datamodule.num_classes
        model.setup("fit")
    if model.net is None:
        raise ValueError(f"{path}: model {type(model).__name__} did not build its net")


def site_datamodule(experiment: Experiment, site: str) -> Any:
    """A data module over ``site`` alone (loaded), with the YAML's other data settings."""
    from iopfl_lightning.data import MultiSiteDataModule

    args = {**experiment.data_args, "sites": [site], "outside": None, "train_on": "inside"}
    datamodule = MultiSiteDataModule(**args)
    datamodule.setup("fit")
    return datamodule
