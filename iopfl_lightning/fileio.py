"""Atomic file writes and safe loading: a crash never leaves a truncated result or checkpoint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _process_umask() -> int:
    mask = os.umask(0)  # reading it means setting it: done once, at import
    os.umask(mask)
    return mask


# mkstemp creates 0600 files whatever the umask; results and checkpoints get the mode an
# ordinary open() would give them (0644 under umask 022), so a group or a host user reads them
_FILE_MODE = 0o666 & ~_process_umask()


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception):  # e.g. "No space left on device" does not name the file
            err.add_note(f"while writing {path}; the previous file, if any, is unchanged")
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda h: h.write(text.encode("utf-8")))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda h: h.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return _atomic(path, lambda h: torch.save(obj, h))


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: pickled code in the file is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler's own message says which global was refused
        raise ValueError(f"cannot load {path} safely (weights_only=True): {err}") from err
