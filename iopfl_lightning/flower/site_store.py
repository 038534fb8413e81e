"""A site's personalized copy: in the node's ``context.state`` and on the site's own disk.

Flower keeps ``context.state`` in the SuperNode's memory, so a restarted node would lose the
copy. Every update is therefore also written atomically (temporary file, fsync, rename) to
``<site-dir>/personalized-<federation id>.pt``, a plain dict loadable with
``weights_only=True``: ``format``, ``site``, ``client_index``, ``federation``, ``rounds`` (the
rounds folded into the copy), ``state`` and ``previous`` (the copy before the last of those
rounds, or None before the first). A server resumed after a crash re-sends the round it had not
checkpointed, which the sites may have folded already; they fold it again into ``previous``,
never twice. The federation id is the server's run id, so a new
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
STATE_PREVIOUS = "iopfl.personalized.previous"


@dataclass
class Personal:
    """A personalized copy as Flower holds it (an ArrayRecord) plus where it came from."""

    arrays: ArrayRecord
    site: str
    client_index: int
    rounds: list[int] = field(default_factory=list)
    source: str = "state"  # "state" or the file it was read from
    previous: ArrayRecord | None = None  # the copy before rounds[-1] (None before rounds[0])


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
                            int(meta["client-index"]), [int(r) for r in meta["rounds"]],
                            previous=context.state.get(STATE_PREVIOUS))
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


def fold_base(personal: Personal | None, round_no: int) -> tuple[ArrayRecord | None, list[int]]:
    """The copy and rounds that round ``round_no`` folds into: the current ones, or, when the
    copy already holds that round (a resumed server re-sends it), the ones before it."""
    if personal is None:
        return None, []
    if round_no not in personal.rounds:
        return personal.arrays, list(personal.rounds)
    before = personal.rounds[:-1]
    if personal.rounds[-1] != round_no or (before and personal.previous is None):
        raise ValueError(
            f"site {personal.site}: round {round_no} is already folded into the personalized "
            f"copy from {personal.source} (rounds {personal.rounds}) and the copy before it is "
            "not kept; the federation cannot resume from this round")
    return personal.previous, before


def save_personal(context: Context, path: Path | None, personal: Personal, federation: str) -> None:
    """Puts the copy into the node's state and, when the site has a folder, onto its disk."""
    context.state[STATE_ARRAYS] = personal.arrays
    context.state[STATE_META] = ConfigRecord({
        "site": personal.site, "client-index": personal.client_index,
        "rounds": list(personal.rounds),
    })
    if personal.previous is not None:
        context.state[STATE_PREVIOUS] = personal.previous
    elif STATE_PREVIOUS in context.state:
        del context.state[STATE_PREVIOUS]
    if path is not None:
        _write(path, personal, federation)


def _write(path: Path, personal: Personal, federation: str) -> None:
    from iopfl_lightning.fileio import atomic_torch_save
    from iopfl_lightning.flower.records import record_to_state

    payload = {
        "format": FORMAT, "site": personal.site, "client_index": personal.client_index,
        "federation": federation, "rounds": list(personal.rounds),
        "state": record_to_state(personal.arrays),
        "previous": None if personal.previous is None else record_to_state(personal.previous),
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
    previous = payload.get("previous")  # absent in files of earlier versions
    return Personal(state_to_record(payload["state"]), str(payload["site"]),
                    int(payload["client_index"]), [int(r) for r in payload["rounds"]],
                    source=str(path),
                    previous=None if previous is None else state_to_record(previous))
