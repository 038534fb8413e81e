"""wandb tracking through Lightning's ``WandbLogger``; every function here is a no-op without it.

``WandbRunLogger`` is the logger to put in an experiment YAML::

    trainer:
      logger:
        class_path: iopfl_lightning.tracking.WandbRunLogger
        init_args: {save_dir: runs/demo, name: "", project: iopfl}

It keeps the CSVLogger run folder every tool of this package relies on
(``save_dir/name/version_N`` with ``metrics.csv``, ``config.yaml``, checkpoints, results and
pictures; ``--trainer.logger.init_args.save_dir`` works as before) and forwards the same
metrics and hyperparameters to a Lightning ``WandbLogger`` whose files go to
``<run folder>/wandb``. With no wandb credentials (``WANDB_API_KEY``, an identity token file,
or a ``wandb login`` entry in ``~/.netrc``) and no ``WANDB_MODE`` set, the run is logged
offline: nothing waits for a network, and ``wandb sync <run folder>/wandb/offline-run-*``
uploads it later.

At the end of ``test`` the modules call :func:`log_test_report` (results as a ``wandb.Table``,
the pictures as images); the CLI logs the resolved config (:func:`log_config`) and closes the
run (:func:`finish`).
"""

from __future__ import annotations

import io
import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from matplotlib.figure import Figure

from iopfl_lightning.results import COLUMNS

log = logging.getLogger(__name__)


def credentials_configured() -> bool:
    """True when wandb could log in without a prompt: an API key or identity token file in
    the environment, or a ``.netrc`` entry for the wandb host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(offline: bool | None) -> str | None:
    """The ``mode`` given to ``wandb.init``: ``offline`` when asked, or when ``offline`` is
    None and neither ``WANDB_MODE`` nor credentials are set; otherwise None (wandb decides)."""
    if offline:
        return "offline"
    if offline is None and not os.environ.get("WANDB_MODE") and not credentials_configured():
        return "offline"
    return None


class _OwnRunWandbLogger(WandbLogger):
    """A ``WandbLogger`` that starts its own run even while another one is open in the process:
    Lightning's adopts any active ``wandb.run``, so a second experiment in a notebook would log
    into the first experiment's run, under its name and into its folder."""

    @property
    def experiment(self) -> Any:
        import wandb

        if self._experiment is None and wandb.run is not None:
            self._experiment = wandb.init(**{**self._wandb_init, "reinit": "create_new"})
            # the x-axis Lightning defines for a run it creates
            self._experiment.define_metric("trainer/global_step")
            self._experiment.define_metric("*", step_metric="trainer/global_step",
                                           step_sync=True)
        return super().experiment


class WandbRunLogger(CSVLogger):
    """CSVLogger's run folder plus a Lightning ``WandbLogger`` fed the same metrics.

    Args:
        save_dir, name, version, prefix, flush_logs_every_n_steps: as ``CSVLogger`` (the run
            folder is ``save_dir/name/version_N``).
        project, entity, group, tags, notes: the wandb run's place and labels (the run is
            named after its folder, e.g. ``demo/version_3``, unless ``run_name`` is given).
        offline: True logs offline, False online, None (default) offline unless wandb
            credentials or ``WANDB_MODE`` are set.
        log_model: upload checkpoints as wandb artifacts (online only).
        settings: ``wandb.Settings`` fields; ``quiet: true`` (the default here) keeps wandb's
            end-of-run metric dump off the console, so the results table stays the last thing
            printed. E.g. ``{quiet: false, x_disable_stats: true}``.
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str | None = "",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
        project: str = "iopfl_lightning",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        run_name: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        mode = resolve_mode(offline)
        if mode == "offline" and log_model:
            log.warning("wandb runs offline here, so log_model=True cannot upload checkpoints; "
                        "they stay in the run folder (set WANDB_API_KEY or run `wandb login`)")
            log_model = False
        folder = Path(self.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        default_name = f"{Path(save_dir).name}/{folder.name}" if not name else f"{name}/{folder.name}"
        extra = {k: v for k, v in {"entity": entity, "group": group, "tags": tags, "notes": notes,
                                   "mode": mode}.items() if v is not None}
        import wandb

        extra["settings"] = wandb.Settings(**{"quiet": True, **(settings or {})})
        self.wandb = _OwnRunWandbLogger(name=run_name or default_name, save_dir=str(folder),
                                        project=project, log_model=log_model, **extra)
        # Lightning 2.6 always passes ``anonymous`` to wandb.init, and wandb >= 0.2x warns on
        # any value of that retired setting; leaving it out changes nothing else.
        getattr(self.wandb, "_wandb_init", {}).pop("anonymous", None)
        if mode == "offline":
            log.info("wandb: no credentials (WANDB_API_KEY or `wandb login`) and no WANDB_MODE, "
                     "logging offline to %s/wandb; upload with `wandb sync %s/wandb/offline-run-*`",
                     folder, folder)

    @property
    def experiment(self) -> Any:
        """The CSV writer; refused in a folder that holds a run (it would delete metrics.csv)."""
        if self._experiment is None:
            refuse_used_run_folder(self.log_dir)
        return super().experiment

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().log_hyperparams(params, *args, **kwargs)
        self.wandb.log_hyperparams(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        self.wandb.log_metrics(metrics, step)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.wandb.after_save_checkpoint(checkpoint_callback)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        self.wandb.finalize(status)


RUN_FILES = ("config.yaml", "metrics.csv", "results.csv")


def refuse_used_run_folder(log_dir: str | Path) -> None:
    """Raise if ``log_dir`` already holds a run's files: a new run there would replace them
    (Lightning's CSV writer deletes ``metrics.csv`` as soon as it starts)."""
    found = [name for name in RUN_FILES if (Path(log_dir) / name).is_file()]
    if found:
        raise RuntimeError(
            f"run folder {log_dir} already holds a run ({', '.join(found)}); refusing to write "
            "into it, which would replace its metrics.csv. Leave the logger's version unset for a "
            "new version folder, give another one, or move the folder away"
        )


def wandb_logger(trainer: pl.Trainer | None) -> WandbLogger | None:
    """The trainer's Lightning WandbLogger (inside a WandbRunLogger or plain), else None."""
    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, WandbRunLogger):
            return logger.wandb
        if isinstance(logger, WandbLogger):
            return logger
    return None


def log_config(trainer: pl.Trainer, config: Mapping[str, Any]) -> None:
    """Puts the resolved CLI config (trainer, model, data, ...) into the wandb run config."""
    logger = wandb_logger(trainer)
    if logger is not None:
        logger.experiment.config.update(dict(config), allow_val_change=True)


def log_test_report(trainer: pl.Trainer, rows: Sequence[Mapping], figures: Mapping[str, Figure],
                    ) -> None:
    """Logs the result rows as the ``test/results`` table and each figure as ``test/{name}``."""
    logger = wandb_logger(trainer)
    if logger is None or not rows:
        return
    columns = [*COLUMNS, *(k for k in rows[0] if k not in COLUMNS)]
    logger.log_table("test/results", columns=columns,
                     data=[[row.get(c) for c in columns] for row in rows])
    for name, fig in figures.items():
        logger.log_image(f"test/{name}", [_pil(fig)])


def _pil(fig: Figure):
    """The figure as a PIL image (what wandb.Image stores as a PNG)."""
    from PIL import Image

    from iopfl_lightning.viz import figure_png

    return Image.open(io.BytesIO(figure_png(fig)))


def finish(trainer: pl.Trainer | None) -> None:
    """Closes the wandb run, if one was started (flushes its files; prints where they are)."""
    logger = wandb_logger(trainer)
    if logger is not None and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish()
