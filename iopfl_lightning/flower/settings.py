"""Settings of a Flower run: the run config (shared by the ServerApp and every ClientApp) and the
node config (one site's own keys).

Run config keys (``[tool.flwr.app.config]`` of ``experiments/flower/pyproject.toml``, or
``flwr run --run-config 'key=value ...'``; the simulation passes them directly):

- ``config``: path of the experiment YAML, the file ``fit --config`` takes (required).
- ``num-rounds``: federated rounds (0 = the YAML's ``trainer.max_epochs``).
- ``min-replies``: updates a round needs to be aggregated (0 = ``min(2, sites)``); a round with
  fewer leaves the global model unchanged.
- ``min-available``: connected nodes a round waits for before it starts (0 = every site), at
  most ``round-timeout`` seconds; then it goes on with the nodes connected.
- ``round-timeout``: seconds a round waits for nodes to connect, and then for replies; a node
  that has not answered by then is missing from that round.
- ``out``: server folder (checkpoint, ``rounds.json``, ``routing_space.pt``, results).
- ``resume``: continue from ``out/checkpoint.pt`` (otherwise an existing one is an error).
- ``test-at-end``: evaluate the final global and personalized models on each site's test split.
- ``torch-threads``: torch threads in each ClientApp (0 = leave torch's default).
- ``query-timeout``: seconds the final collection of personalized copies waits for every site.
- ``site-root``: simulation only: each site's folder is ``<site-root>/<site>``.

Node config keys (``flower-supernode --node-config '...'``): ``site-name`` (deployment) or
``partition-id`` (simulation: index into the YAML's inside sites), ``site-dir`` (where the
personalized copy and local results are kept), and optionally ``config`` and ``data-root`` (the
site's own copy of the YAML and its data folder).

This module imports neither torch nor flwr: the light query handler uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "",
    "num-rounds": 0,
    "min-replies": 0,
    "min-available": 0,
    "round-timeout": 3600.0,
    "out": "runs/flower",
    "resume": False,
    "test-at-end": True,
    "torch-threads": 0,
    "query-timeout": 600.0,
    "site-root": "",
}


@dataclass(frozen=True)
class FlowerSettings:
    """Validated run config (see the module docstring for each key)."""

    config: str
    num_rounds: int
    min_replies: int
    min_available: int
    round_timeout: float
    out: str
    resume: bool
    test_at_end: bool
    torch_threads: int
    query_timeout: float
    site_root: str


def resolve_settings(
    run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> FlowerSettings:
    """Defaults, then the run config, then ``overrides`` (the simulation's arguments)."""
    values = dict(RUN_CONFIG_DEFAULTS)
    for source, mapping in (("run config", run_config), ("overrides", overrides or {})):
        unknown = sorted(set(mapping) - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {unknown}; valid keys: {sorted(RUN_CONFIG_DEFAULTS)}"
            )
        values.update(mapping)
    for key, default in RUN_CONFIG_DEFAULTS.items():
        values[key] = _typed(key, values[key], type(default))
    if not values["config"]:
        raise ValueError("run config: 'config' (the experiment YAML) is required")
    for key in ("num-rounds", "min-replies", "min-available", "torch-threads"):
        if values[key] < 0:
            raise ValueError(f"run config: {key!r} must be >= 0, got {values[key]}")
    for key in ("round-timeout", "query-timeout"):
        if values[key] <= 0:
            raise ValueError(f"run config: {key!r} must be positive, got {values[key]}")
    return FlowerSettings(**{k.replace("-", "_"): v for k, v in values.items()})


def _typed(key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(
            f"run config: {key!r} must be {kind.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def resolve_site(node_config: Mapping[str, Any], sites: list[str]) -> tuple[str, int]:
    """The node's site and its client index (position among the YAML's inside sites)."""
    if "site-name" in node_config:
        site = str(node_config["site-name"])
        if site not in sites:
            raise ValueError(f"node config: site-name {site!r} is not an inside site of {sites}")
        return site, sites.index(site)
    if "partition-id" in node_config:
        index = node_config["partition-id"]
        if not isinstance(index, int) or not 0 <= index < len(sites):
            raise ValueError(
                f"node config: partition-id {index!r} must index the inside sites {sites}"
            )
        return sites[index], index
    raise ValueError(
        "node config: give 'site-name' (e.g. --node-config 'site-name=\"HK\"') or 'partition-id'"
    )


def site_dir(node_config: Mapping[str, Any], settings: FlowerSettings, site: str) -> Path | None:
    """The site's own folder (personalized copy, local results); None keeps nothing on disk."""
    if "site-dir" in node_config:
        return Path(str(node_config["site-dir"])).expanduser()
    if settings.site_root:
        return Path(settings.site_root).expanduser() / site
    return None


def experiment_path(node_config: Mapping[str, Any], settings: FlowerSettings) -> str:
    """The YAML a node reads: its own copy if the node config names one, else the run's."""
    return str(node_config.get("config") or settings.config)


def data_root(node_config: Mapping[str, Any]) -> str | None:
    """The node's data folder, overriding the YAML's ``data.root`` when given."""
    root = node_config.get("data-root")
    return str(root) if root else None
