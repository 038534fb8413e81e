"""Atomic, safe Lightning checkpoints: :class:`AtomicCheckpointIO`.

Lightning 2.6's ``TorchCheckpointIO`` saves through fsspec's local transaction: the bytes go to a
temporary file from ``tempfile.mkstemp()`` (the system temp folder) and are then moved with
``shutil.move``. When the temp folder is on another filesystem than the run folder (a tmpfs
``/tmp``, a network share for runs) that move is a copy into the final name, so a crash during it
leaves a truncated ``last.ckpt``; nothing is fsynced either. This plugin writes local checkpoints
to a temporary file in the checkpoint's own folder, fsyncs it and renames it over the old one
(``os.replace``, atomic on POSIX): a reader sees the old checkpoint or the new one, never half.

Loading passes ``weights_only=True`` explicitly (unless a caller asks otherwise), so the
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable cannot silently re-enable pickled code.

:class:`BackgroundCheckpointIO` wraps it so that, while ``fit`` runs, a checkpoint is written in
a worker thread and the next round does not wait for the disk (a round's checkpoint of the paper
UNet with six sites is about 250 MB). The CLI installs both on every trainer whose strategy uses
the stock ``TorchCheckpointIO``; in a notebook call ``use_atomic_checkpoints(trainer)``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from iopfl_lightning.fileio import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-folder temp file + fsync + rename, and safe loading."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(
                path, map_location=map_location,
                weights_only=True if weights_only is None else weights_only,
            )
        except pickle.UnpicklingError as err:  # names the refused global, not the file
            raise ValueError(f"cannot load checkpoint {path} safely (weights_only=True): {err}") from err


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's ``AsyncCheckpointIO`` (tensors snapshotted on the caller thread, then written
    by one worker thread in submission order) while ``in_fit()`` is true, made safe to rely on:

    - removals of older checkpoints go through the same worker, so a file is removed only after
      the newer one is completely written (a crash in between never leaves neither);
    - outside fit (``trainer.save_checkpoint`` in a notebook, after ``fit``) and for loads it
      first waits for pending writes, then works synchronously: the file is there on return;
    - at most one write is pending: a save waits for the previous one first, so a disk slower
      than the rounds slows the rounds down instead of queueing snapshots until memory runs out;
    - a failed background write is raised at the next save, or when fit ends.

    A hard kill (SIGKILL) during a write keeps the previous checkpoint (the writes are atomic),
    so at most the round being written is lost, as when killed during a synchronous write."""

    def __init__(self, checkpoint_io: TorchCheckpointIO, in_fit: Callable[[], bool]) -> None:
        super().__init__(checkpoint_io)
        self._in_fit = in_fit

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        if self._in_fit():
            self._wait_pending()
            return super().save_checkpoint(*args, **kwargs)
        self.teardown()
        self.checkpoint_io.save_checkpoint(*args, **kwargs)

    def _wait_pending(self) -> None:
        """Returns when every submitted write is done; raises a failed one (once)."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def teardown(self) -> None:
        try:
            self._wait_pending()
        finally:
            super().teardown()  # stops the worker; the error, if any, is already raised

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        if self._in_fit() and self._executor is not None:
            self._executor.submit(self._remove, *args, **kwargs)
            return
        self.teardown()
        self.checkpoint_io.remove_checkpoint(*args, **kwargs)

    def _remove(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.checkpoint_io.remove_checkpoint(*args, **kwargs)
        except BaseException as err:  # raised like a failed write: at the next save or at teardown
            self._error = err

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.teardown()
        return self.checkpoint_io.load_checkpoint(*args, **kwargs)


def use_atomic_checkpoints(trainer: Trainer, background: bool = True) -> None:
    """Swap the stock ``TorchCheckpointIO`` of ``trainer`` for :class:`AtomicCheckpointIO`,
    written in the background during ``fit`` (:class:`BackgroundCheckpointIO`) unless
    ``background=False`` (a user's own CheckpointIO plugin is left alone)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return
    atomic = AtomicCheckpointIO()
    strategy.checkpoint_io = BackgroundCheckpointIO(atomic, FitRunning(trainer)) if background else atomic


class FitRunning:
    """``trainer`` is inside ``fit`` (a class, not a closure, so a spawning strategy can pickle it)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self) -> bool:
        state = self.trainer.state
        return state.fn == TrainerFn.FITTING and state.status == TrainerStatus.RUNNING
