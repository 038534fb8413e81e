"""What a RoutingModule checkpoint keeps besides the nets and optimizers (pure functions).

A routing fit's checkpoint must score without refitting (``test --ckpt_path``) and resume
(``fit --ckpt_path``): it keeps the online predictions of the passes done, the step count, the
per-layer mix choice, the mixture sums of the reported pass, and a fingerprint of the
``routing_space.pt`` whose models the baselines (global, uniform, ensemble) are read from, so a
space that changed since is refused instead of mixing two federations in one table.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from torch import Tensor

Online = dict[str, dict[tuple[int, int], Tensor]]


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def online_state(online: Online) -> dict[str, Any]:
    """The stored per-slice predictions as CPU tensors and plain ``[case, slice]`` keys."""
    return {name: {"keys": [list(key) for key in store],
                   "preds": [pred.cpu() for pred in store.values()]}
            for name, store in online.items()}


def load_online(saved: dict[str, Any], device: torch.device) -> Online:
    """Inverse of :func:`online_state`, the predictions moved to ``device``."""
    return {name: {(int(k[0]), int(k[1])): pred.to(device)
                   for k, pred in zip(part["keys"], part["preds"], strict=True)}
            for name, part in saved.items()}


def ends_a_pass(checkpoint: dict[str, Any]) -> bool:
    """Whether Lightning wrote ``checkpoint`` at the end of a training epoch (a pass)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    return progress is None or bool(progress.get("is_last_batch", True))
