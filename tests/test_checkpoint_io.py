"""BackgroundCheckpointIO: writes in a worker thread during fit, in order, from a snapshot;
synchronous outside fit; a failed write is raised, never lost."""

import pickle
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from iopfl_lightning.checkpoint_io import AtomicCheckpointIO, BackgroundCheckpointIO
from iopfl_lightning.cli import main
from tests.test_crash_resume import _Unpicklable

REPO = Path(__file__).resolve().parents[1]


class SlowIO(TorchCheckpointIO):
    """Records what happens, in order; a save takes ``delay`` seconds (a slow disk)."""

    def __init__(self, delay: float = 0.3):
        self.delay, self.events, self.fail = delay, [], False

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        time.sleep(self.delay)
        if self.fail:
            raise OSError(f"disk full writing {path}")
        self.events.append(("saved", str(path), checkpoint["w"].clone()))

    def remove_checkpoint(self, path):
        self.events.append(("removed", str(path), None))


def _io(in_fit: bool, delay: float = 0.3):
    slow = SlowIO(delay)
    return BackgroundCheckpointIO(slow, in_fit=lambda: in_fit), slow


def test_during_fit_a_save_returns_at_once_and_writes_a_snapshot():
    io, slow = _io(in_fit=True)
    w = torch.zeros(4)
    start = time.perf_counter()
    io.save_checkpoint({"w": w}, "round0.ckpt")
    assert time.perf_counter() - start < 0.2  # did not wait for the 0.3 s write
    w += 1  # the next round changes the weights in place before the write happens
    assert slow.events == []
    io.teardown()  # fit's end waits for pending writes
    assert [e[:2] for e in slow.events] == [("saved", "round0.ckpt")]
    assert torch.equal(slow.events[0][2], torch.zeros(4))  # what the weights were at save time


def test_at_most_one_write_is_pending():
    io, slow = _io(in_fit=True)
    io.save_checkpoint({"w": torch.zeros(1)}, "round0.ckpt")
    start = time.perf_counter()
    io.save_checkpoint({"w": torch.ones(1)}, "round1.ckpt")  # round 1 was faster than the disk
    assert time.perf_counter() - start > 0.2  # waited for round 0's write, kept no 2nd snapshot
    assert [e[:2] for e in slow.events] == [("saved", "round0.ckpt")]
    io.teardown()
    assert [e[1] for e in slow.events] == ["round0.ckpt", "round1.ckpt"]


def test_an_older_checkpoint_is_removed_only_after_the_newer_one_is_written():
    io, slow = _io(in_fit=True)
    io.save_checkpoint({"w": torch.ones(1)}, "epoch=1.ckpt")
    io.remove_checkpoint("epoch=0.ckpt")
    assert slow.events == []  # not removed while epoch=1 is still being written
    io.teardown()
    assert [e[:2] for e in slow.events] == [("saved", "epoch=1.ckpt"), ("removed", "epoch=0.ckpt")]


def test_outside_fit_saves_wait_for_pending_writes_and_are_synchronous():
    in_fit = {"value": True}
    slow = SlowIO(0.2)
    io = BackgroundCheckpointIO(slow, in_fit=lambda: in_fit["value"])
    io.save_checkpoint({"w": torch.zeros(1)}, "round0.ckpt")
    in_fit["value"] = False  # fit ended; a notebook calls trainer.save_checkpoint
    io.save_checkpoint({"w": torch.ones(1)}, "manual.ckpt")
    assert [e[:2] for e in slow.events] == [("saved", "round0.ckpt"), ("saved", "manual.ckpt")]


def test_a_failed_background_write_is_raised_once_at_the_next_save_or_at_the_end():
    io, slow = _io(in_fit=True, delay=0.05)
    slow.fail = True
    io.save_checkpoint({"w": torch.zeros(1)}, "round0.ckpt")
    with pytest.raises(OSError, match="disk full writing round0.ckpt"):
        io.save_checkpoint({"w": torch.zeros(1)}, "round1.ckpt")
    io.teardown()  # already reported
    slow.fail = True
    io.save_checkpoint({"w": torch.zeros(1)}, "round2.ckpt")
    with pytest.raises(OSError, match="disk full writing round2.ckpt"):
        io.teardown()  # the last round's write failed: fit's end says so
    assert slow.events == []


def test_a_failed_real_write_names_the_file(tmp_path):
    io = BackgroundCheckpointIO(AtomicCheckpointIO(), in_fit=lambda: True)
    io.save_checkpoint({"w": torch.ones(1), "boom": _Unpicklable()}, tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError, match="simulated crash") as raised:
        io.teardown()
    assert f"while writing {tmp_path / 'last.ckpt'}" in "".join(raised.value.__notes__)
    assert not list(tmp_path.iterdir())  # no temp file left behind


def test_real_files_are_complete_after_teardown(tmp_path):
    io = BackgroundCheckpointIO(AtomicCheckpointIO(), in_fit=lambda: True)
    for r in range(3):
        io.save_checkpoint({"round": r, "w": torch.full((1000,), float(r))}, tmp_path / "last.ckpt")
    io.teardown()
    assert io.load_checkpoint(tmp_path / "last.ckpt")["round"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_cli_trainers_write_atomic_checkpoints_in_the_background(tmp_path):
    cli = main(["fit", "--config", str(REPO / "tests/configs/demo_tiny.yaml"),
                "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                "--trainer.limit_val_batches", "0", "--test_after_fit", "false"])
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, BackgroundCheckpointIO)
    assert isinstance(io.checkpoint_io, AtomicCheckpointIO)
    assert not io._in_fit()  # fit has ended
    pickle.dumps(io)  # a spawning strategy pickles its plugins
    # after fit a save is synchronous: the file is there when the call returns
    cli.trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert io.load_checkpoint(tmp_path / "after.ckpt")["epoch"] == cli.trainer.current_epoch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_are_snapshotted_and_written_from_the_worker(tmp_path):
    io = BackgroundCheckpointIO(AtomicCheckpointIO(), in_fit=lambda: True)
    w = torch.zeros(1 << 20, device="cuda")
    io.save_checkpoint({"w": w}, tmp_path / "last.ckpt")
    w += 1  # the next round's kernels, queued right after the save returned
    io.teardown()
    saved = io.load_checkpoint(tmp_path / "last.ckpt", map_location="cpu")
    assert torch.equal(saved["w"], torch.zeros(1 << 20))
