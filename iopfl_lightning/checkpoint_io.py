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

The CLI installs it on every trainer whose strategy uses the stock ``TorchCheckpointIO``; in a
notebook pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import pickle
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer

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


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Swap the stock ``TorchCheckpointIO`` of ``trainer`` for :class:`AtomicCheckpointIO`
    (a user's own CheckpointIO plugin is left alone)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
