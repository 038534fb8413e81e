"""``routing_space.pt``: everything an outside site needs to build its routed model.

Contents (a plain dict, loadable with ``weights_only=True``): ``format_version``, ``net_spec``
(how to rebuild the net), ``sites`` (inside sites, in client order), ``global`` (state dict),
``personalized`` (site -> state dict), ``sample_counts`` (site -> training slices), ``rounds``
and ``run_id`` (the run that wrote it; :func:`check_run_owns` keeps another run from clobbering it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from iopfl_lightning.federated.state import StateDict, check_same_keys
from iopfl_lightning.fileio import atomic_torch_save, safe_torch_load

FORMAT_VERSION = 1
_REQUIRED = ("format_version", "net_spec", "sites", "global", "personalized")


def write_routing_space(
    path: str | os.PathLike,
    *,
    net_spec: Mapping[str, Any] | None,
    sites: list[str],
    global_state: Mapping[str, torch.Tensor],
    personalized: Mapping[str, Mapping[str, torch.Tensor]],
    sample_counts: Mapping[str, int] | None = None,
    rounds: int = 0,
    run_id: str | None = None,
) -> Path:
    # own copies: each tensor its own storage, even from a flat state's shared buffer
    def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    cpu = cpu_copy(global_state)
    payload = {
        "format_version": FORMAT_VERSION,
        "net_spec": dict(net_spec) if net_spec is not None else None,
        "sites": list(sites),
        "global": cpu,
        "personalized": {s: cpu_copy(st) for s, st in personalized.items()},
        "sample_counts": dict(sample_counts or {}),
        "rounds": int(rounds),
        "run_id": run_id,
    }
    return atomic_torch_save(payload, path)


def check_run_owns(path: str | os.PathLike, run_id: str) -> None:
    """Raise ``FileExistsError`` if ``path`` exists and was written by a run other than ``run_id``.

    A file that cannot be read as a routing space, or carries no ``run_id``, is never ours.
    """
    path = Path(path)
    if not path.exists():
        return
    try:
        owner = safe_torch_load(path).get("run_id")
    except (ValueError, AttributeError):
        owner = None
    if owner != run_id:
        raise FileExistsError(
            f"{path} already exists and belongs to another run (run_id {owner!r}); "
            "refusing to overwrite it: use another folder or logger version, or move it away"
        )


def read_routing_space(path: str | os.PathLike) -> dict[str, Any]:
    """Loads and validates a routing space; errors name the file and the offending site or key."""
    space = safe_torch_load(path)
    if not isinstance(space, dict):
        raise ValueError(f"{path}: not a routing space (got {type(space).__name__})")
    missing = [k for k in _REQUIRED if k not in space]
    if missing:
        raise ValueError(f"{path}: not a routing space, missing keys {missing}")
    if space["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: routing space format_version {space['format_version']}, "
            f"this version reads {FORMAT_VERSION}"
        )
    strangers = [s for s in space["personalized"] if s not in space["sites"]]
    if strangers:  # a site that never trains (client_fraction) may lack a copy; no copy is foreign
        raise ValueError(f"{path}: personalized model(s) of {strangers}, which are not among "
                         f"its inside sites {list(space['sites'])}")
    reference: StateDict = space["global"]
    if space["net_spec"]:
        _check_architecture(path, space["net_spec"], reference)
    for site, state in space["personalized"].items():
        check_same_keys(reference, state, f"{path}: personalized model of site {site!r}")
    return space


def _check_architecture(path, spec: Mapping[str, Any], state: StateDict) -> None:
    """The global state must fit the net ``net_spec`` builds (built on the meta device: free)."""
    from iopfl_lightning.nets import build_from_spec  # nets import smp: only when needed

    try:
        with torch.device("meta"):
            expected = build_from_spec(dict(spec)).state_dict()
    except Exception as err:  # an unknown net name or argument of another version
        raise ValueError(f"{path}: cannot build the net of net_spec {dict(spec)}: {err}") from err
    check_same_keys(expected, state, f"{path}: global model vs its net_spec {dict(spec)}")
