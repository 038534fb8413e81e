"""Crash and resume: a real training process is SIGKILLed mid-round and resumed from last.ckpt.

Also: checkpoints are written atomically, and an existing run folder is never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from iopfl_lightning.checkpoint_io import AtomicCheckpointIO
from iopfl_lightning.cli import main
from iopfl_lightning.federated import FederatedTrainer, read_routing_space
from iopfl_lightning.fileio import safe_torch_load
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
STALL_ROUND, STALL_BATCH = 1, 3  # round 1, client 1's second batch: mid-round and mid-client


class StallAt(Callback):
    """Test-only: writes ``marker`` and sleeps at one training batch, so the test can SIGKILL the
    process at a deterministic point (after round 0's checkpoint, in the middle of round 1)."""

    def __init__(self, round: int, batch: int, marker: str):
        self.round, self.batch, self.marker = round, batch, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.round and batch_idx == self.batch:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(3600)


def _config(path: Path, save_dir: Path, stall_marker: Path | None = None) -> Path:
    callbacks = [
        {"class_path": "iopfl_lightning.federated.FederatedTrainer",
         "init_args": {"alpha": 0.3, "client_fraction": 0.67, "seed": 3}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"filename": "last", "every_n_epochs": 1,  # as experiments/ do
                       "save_on_train_epoch_end": True}},
    ]
    if stall_marker is not None:
        callbacks.append({"class_path": "tests.test_crash_resume.StallAt", "init_args": {
            "round": STALL_ROUND, "batch": STALL_BATCH, "marker": str(stall_marker)}})
    config = {
        "seed_everything": 0,
        "test_after_fit": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": ROUNDS, "deterministic": True,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(save_dir), "name": ""}},
            "callbacks": callbacks,
        },
        "model": {"class_path": "iopfl_lightning.modules.SegmentationModule",
                  "init_args": {"net": "unet", "features": 4, "val_hd95": False}},
        "data": {"format": "synthetic", "sites": ["BIDMC", "HK", "UCL"], "batch_size": 4,
                 "synthetic": {"size": 32, "slices": 4,
                               "cases_per_split": {"train": 2, "val": 1, "test": 1}}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "iopfl_lightning", "fit", "--config", str(config), *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_mid_round_then_resume_matches_uninterrupted_run(tmp_path):
    marker = tmp_path / "stalled"
    clean = _fit(_config(tmp_path / "clean.yaml", tmp_path / "clean"))
    crash = _fit(_config(tmp_path / "crash.yaml", tmp_path / "run", marker))
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert crash.poll() is None, crash.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the training process never reached round 1"
        time.sleep(0.2)
    crash.send_signal(signal.SIGKILL)  # in round 1, client 1 half trained
    crash.wait()
    assert crash.returncode == -signal.SIGKILL

    crashed = tmp_path / "run" / "version_0"
    last = crashed / "checkpoints" / "last.ckpt"
    ckpt = safe_torch_load(last)  # complete and loadable with weights_only=True
    assert ckpt["epoch"] == STALL_ROUND - 1
    assert not (crashed / "routing_space.pt").exists()
    before = _digests(crashed)

    resumed = _fit(_config(tmp_path / "resume.yaml", tmp_path / "run"), "--ckpt_path", str(last))
    _finish(resumed)
    _finish(clean)

    # the resumed run wrote into a new version folder; the crashed run's folder is untouched
    assert _digests(crashed) == before
    assert not list(tmp_path.rglob("*.tmp"))
    reference = read_routing_space(tmp_path / "clean" / "version_0" / "routing_space.pt")
    space = read_routing_space(tmp_path / "run" / "version_1" / "routing_space.pt")
    assert space["rounds"] == reference["rounds"] == ROUNDS
    assert space["run_id"] == ckpt["callbacks"][next(k for k in ckpt["callbacks"]
                                                     if "FederatedTrainer" in k)]["run_id"]
    for k, v in reference["global"].items():
        assert torch.equal(space["global"][k], v), k
    assert space["personalized"].keys() == reference["personalized"].keys()
    for site, state in reference["personalized"].items():
        for k, v in state.items():
            assert torch.equal(space["personalized"][site][k], v), (site, k)

    # forcing the crashed run's version folder again is refused before anything is written
    with pytest.raises(RuntimeError, match="config.yaml"):
        main(["fit", "--config", str(tmp_path / "resume.yaml"),
              "--trainer.logger.init_args.version", "0"])
    assert _digests(crashed) == before


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing the checkpoint")


def test_checkpoint_write_failure_leaves_previous_checkpoint_intact(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.ones(1000)}, path)
    good = path.read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(1000), "boom": _Unpicklable()}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert io.load_checkpoint(path)["epoch"] == 0


def test_a_new_run_refuses_to_overwrite_another_runs_routing_space(tmp_path):
    def fit(fed):
        pl.seed_everything(0)
        trainer = tiny_trainer(1, [fed], tmp_path, limit_val_batches=0, limit_train_batches=1)
        trainer.fit(tiny_module(), datamodule=tiny_datamodule())

    first = FederatedTrainer()
    fit(first)
    written = (tmp_path / "routing_space.pt").read_bytes()
    assert safe_torch_load(tmp_path / "routing_space.pt")["run_id"] == first.run_id
    second = FederatedTrainer()
    with pytest.raises(FileExistsError, match="belongs to another run"):
        fit(second)
    assert second.round == 0  # refused at fit start, before any training
    assert (tmp_path / "routing_space.pt").read_bytes() == written
