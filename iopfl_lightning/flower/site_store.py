"""A site's personalized copy: in the node's ``context.state`` and on the site's own disk.

Flower keeps ``context.state`` in the SuperNode's memory, so a restarted node would lose the
copy. Every update is therefore also written atomically (temporary file, fsync, rename) to
``<site-dir>/personalized-<federation id>.pt``, a plain dict loadable with
``weights_only=True``: ``format``, ``site``, ``client_index``, ``federation``, ``rounds`` (the
rounds folded into the copy) and ``state``. The federation id is the server's run id, so a new
federation never picks up an old one's copy, while a restarted node (or a resumed server) does.

:func:`load_personal` prefers the node's state and falls back to the disk; it imports torch only
when it reads the disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context

log = logging.getLogger(__name__)

FORMAT = 1
STATE_ARRAYS = "iopfl.personalized"
STATE_META = "iopfl.personalized.meta"


@dataclass
class Personal:
    """A personalized copy as Flower holds it (an ArrayRecord) plus where it came from."""

    arrays: ArrayRecord
    site: str
    client_index: int
    rounds: list[int] = field(default_factory=list)
    source: str = "state"  # "state" or the file it was read from


def store_path(folder: Path | None, federation: str) -> Path | None:
    if folder is None:
        return None
    if not federation or not federation.replace("-", "").isalnum():
        raise ValueError(f"federation id {federation!r} is not a plain identifier")
    return folder / f"personalized-{federation}.pt"


def load_personal(context: Context, path: Path | None, site: str | None) -> Personal | None:
    """The site's current copy: the node's state first, else the file at ``path``, else None."""
    if STATE_ARRAYS in context.state:
        meta = context.state[STATE_META]
        personal = Personal(context.state[STATE_ARRAYS], str(meta["site"]),
                            int(meta["client-index"]), [int(r) for r in meta["rounds"]])
    elif path is not None and path.is_file():
        personal = _read(path)
        log.info("site %s: resumed its personalized copy from %s (rounds %s)",
                 personal.site, path, personal.rounds)
    else:
        return None
    if site is not None and personal.site != site:
        raise ValueError(
            f"personalized copy from {personal.source} belongs to site {personal.site!r}, "
            f"this node is site {site!r}"
        )
    return personal


def save_personal(context: Context, path: Path | None, personal: Personal, federation: str) -> None:
    """Puts the copy into the node's state and, when the site has a folder, onto its disk."""
    context.state[STATE_ARRAYS] = personal.arrays
    context.state[STATE_META] = ConfigRecord({
        "site": personal.site, "client-index": personal.client_index,
        "rounds": list(personal.rounds),
    })
    if path is not None:
        _write(path, personal, federation)


def _write(path: Path, personal: Personal, federation: str) -> None:
    from iopfl_lightning.fileio import atomic_torch_save
    from iopfl_lightning.flower.records import record_to_state

    payload = {
        "format": FORMAT, "site": personal.site, "client_index": personal.client_index,
        "federation": federation, "rounds": list(personal.rounds),
        "state": record_to_state(personal.arrays),
    }
    atomic_torch_save(payload, path)


def _read(path: Path) -> Personal:
    from iopfl_lightning.fileio import safe_torch_load
    from iopfl_lightning.flower.records import state_to_record

    payload: Any = safe_torch_load(path)
    keys = ("format", "site", "client_index", "rounds", "state")
    if not isinstance(payload, dict) or any(k not in payload for k in keys):
        raise ValueError(f"{path}: not a personalized copy (needs keys {list(keys)})")
    if payload["format"] != FORMAT:
        raise ValueError(f"{path}: format {payload['format']}, this version reads {FORMAT}")
    return Personal(state_to_record(payload["state"]), str(payload["site"]),
                    int(payload["client_index"]), [int(r) for r in payload["rounds"]],
                    source=str(path))
