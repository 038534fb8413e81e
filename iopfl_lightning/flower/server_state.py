"""The server's checkpoint: ``<out>/checkpoint.pt`` after every round, and ``rounds.json``.

The checkpoint is a plain dict (loadable with ``weights_only=True``), written atomically:
``format``, ``federation`` (the run id clients key their personalized copies on), ``round``
(rounds done), ``sites``, ``global``, ``server_optimizer`` (its ``state_dict``),
``sample_counts``, ``history`` (one record per round: sites trained, missing, NaN, metrics).
A server started with ``resume=true`` continues from it; without, an existing checkpoint is an
error rather than something silently overwritten.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iopfl_lightning.federated.state import StateDict, check_same_keys, clone_state
from iopfl_lightning.fileio import atomic_torch_save, atomic_write_text, safe_torch_load

FORMAT = 1
_KEYS = ("format", "federation", "round", "sites", "global", "server_optimizer",
         "sample_counts", "history")


@dataclass
class ServerState:
    """Where the federation stands after ``round`` rounds."""

    federation: str
    round: int
    sites: list[str]
    global_state: StateDict
    server_optimizer: dict | None = None
    sample_counts: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_path(out: Path) -> Path:
    return out / "checkpoint.pt"


def start_state(out: Path, resume: bool, sites: list[str], initial: StateDict) -> ServerState:
    """A fresh state, or the checkpoint's when ``resume`` (checked against sites and model)."""
    path = checkpoint_path(out)
    if not path.exists():
        return ServerState(uuid.uuid4().hex, 0, list(sites), clone_state(initial))
    if not resume:
        raise FileExistsError(
            f"{path} exists: set resume=true to continue that federation, or use another 'out'"
        )
    payload = safe_torch_load(path)
    missing = [k for k in _KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"{path}: not a server checkpoint (missing keys {missing})")
    if payload["format"] != FORMAT:
        raise ValueError(f"{path}: format {payload['format']}, this version reads {FORMAT}")
    if list(payload["sites"]) != list(sites):
        raise ValueError(f"{path}: trained on sites {payload['sites']}, the config has {sites}")
    check_same_keys(initial, payload["global"], f"{path}: global model vs the config's model")
    return ServerState(
        str(payload["federation"]), int(payload["round"]), list(sites), payload["global"],
        payload["server_optimizer"], dict(payload["sample_counts"]), list(payload["history"]),
    )


def save_state(out: Path, state: ServerState) -> None:
    """Checkpoint (atomic) plus a human-readable ``rounds.json`` of the history."""
    payload = {
        "format": FORMAT, "federation": state.federation, "round": state.round,
        "sites": list(state.sites), "global": {k: v.detach().cpu() for k, v in
                                                state.global_state.items()},
        "server_optimizer": state.server_optimizer, "sample_counts": dict(state.sample_counts),
        "history": state.history,
    }
    atomic_torch_save(payload, checkpoint_path(out))
    atomic_write_text(out / "rounds.json", json.dumps(state.history, indent=1) + "\n")
