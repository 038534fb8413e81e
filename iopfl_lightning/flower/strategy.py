"""The server strategy: the engine's participation count and aggregation over Flower's messages.

:class:`IOPFLStrategy` keeps Flower's message plumbing and samples nodes itself: as many as
the engine trains (``ceil(client_fraction * sites)``), after waiting for ``min_available``
connected nodes at most ``node_wait`` seconds (a dead site must not stall the federation); it
replaces the aggregation with the engine's
pure functions: client updates ``w_k - w_global`` weighted by training sample counts
(:class:`UpdateAccumulator`, added in client-index order, as the engine adds them) applied by the
:class:`ServerOptimizer` (``fedavg`` = plain averaging, ``fedavgm``, ``fedadam``); normalization
statistics are averaged and integer buffers take the maximum. So a Flower round and an
in-process round compute the same numbers.

Faults: a sampled node that sends no usable reply (it died, timed out, raised, or sent NaN/inf
weights) is left out and named in the log and in the round's record (:attr:`history`); the round
is aggregated when at least ``min_replies`` usable updates arrived, otherwise the global model is
left unchanged. After every aggregated round ``on_round`` is called (the server checkpoints).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from iopfl_lightning.federated.aggregate import ServerOptimizer, UpdateAccumulator
from iopfl_lightning.federated.participation import participant_count
from iopfl_lightning.federated.state import StateDict, all_finite, check_same_keys
from iopfl_lightning.flower.records import ARRAYS, METRICS, float_metrics, record_to_state

log = logging.getLogger(__name__)


class IOPFLStrategy(FedAvg):
    """FedAvg-style rounds over the sites of one experiment (see the module docstring).

    Args:
        global_state: initial global model state (parameters and buffers).
        param_keys: the parameter names (the rest are buffers).
        server: the server optimizer over ``global_state``'s parameters.
        sites: inside sites; a reply's ``client-index`` metric indexes this list.
        min_replies: usable updates a round needs to be aggregated.
        min_available: connected nodes a round waits for before sampling.
        fraction_train: fraction of connected nodes sampled per round.
        on_nonfinite: ``skip`` a NaN/inf update (warning) or ``raise``.
        round_offset: rounds already done (a resumed run numbers rounds after them).
        final_round: the last round; the test evaluation runs after it if ``test_at_end``.
        on_round: called with the round number after each aggregated round.
        node_wait: seconds a round waits for ``min_available`` connected nodes before it goes
            on with those connected.
    """

    def __init__(
        self, *, global_state: StateDict, param_keys: set[str], server: ServerOptimizer,
        sites: list[str], min_replies: int, min_available: int, fraction_train: float = 1.0,
        on_nonfinite: str = "skip", round_offset: int = 0, final_round: int = 0,
        test_at_end: bool = True, on_round: Callable[[int], None] | None = None,
        node_wait: float = 3600.0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=1.0, min_train_nodes=min_replies,
            min_evaluate_nodes=min_replies, min_available_nodes=min_available,
        )
        self.global_state, self.param_keys, self.server = global_state, param_keys, server
        self.sites, self.min_replies, self.on_nonfinite = sites, min_replies, on_nonfinite
        self.round_offset, self.final_round = round_offset, final_round
        self.test_at_end = test_at_end
        self.on_round = on_round
        self.min_available, self.node_wait = min_available, node_wait
        self.node_sites: dict[int, str] = {}  # learned from replies
        self.sample_counts: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.test_rows: list[dict[str, Any]] = []
        self._sampled: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ sampling
    def _connected(self, grid: Grid) -> list[int]:
        """The connected nodes once ``min_available`` are, or whoever is connected after
        ``node_wait`` seconds (a site that died for good must not stall the federation)."""
        deadline = time.monotonic() + self.node_wait
        while len(nodes := list(grid.get_node_ids())) < self.min_available:
            if time.monotonic() >= deadline:
                log.warning("%d of the %d nodes a round waits for are connected after %.0f s; "
                            "going on with them", len(nodes), self.min_available, self.node_wait)
                break
            log.info("waiting for nodes: %d connected, %d wanted", len(nodes), self.min_available)
            time.sleep(1.0)
        return nodes

    def _messages(self, grid: Grid, count: int, arrays: ArrayRecord, config: ConfigRecord,
                  kind: str, round_no: int) -> list[Message]:
        nodes = self._connected(grid)
        chosen = random.sample(nodes, min(count, len(nodes)))
        config["server-round"] = round_no
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, chosen, kind))

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_no = server_round + self.round_offset
        # as many sites as the engine trains (ceil), not Flower's floor of the fraction
        count = max(participant_count(len(self.sites), self.fraction_train), self.min_replies)
        messages = self._messages(grid, count, arrays, config, MessageType.TRAIN, round_no)
        self._sampled[round_no] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_no = server_round + self.round_offset
        record: dict[str, Any] = {"round": round_no, "trained": [], "missing": [],
                                  "nonfinite": [], "errors": [], "metrics": {}}
        updates = self._usable_updates(round_no, list(replies), record)
        self._name_missing(round_no, {node for node, *_ in updates}, record)
        aggregated = len(updates) >= self.min_replies
        record["aggregated"] = aggregated
        if aggregated:
            self._apply(updates)
        else:
            log.error("round %d: %d usable update(s), %d needed: the global model is unchanged",
                      round_no, len(updates), self.min_replies)
        self.history.append(record)
        if self.on_round is not None:
            self.on_round(round_no)
        means = _mean_metrics(record["metrics"])
        return (ArrayRecord.from_torch_state_dict(self.global_state) if aggregated else None,
                MetricRecord(means) if means else None)

    def _usable_updates(self, round_no: int, replies: list[Message], record: dict) -> list:
        """``(node, client index, state, sample count)`` of every usable reply, by client index."""
        updates: dict[int, tuple[int, int, StateDict, int]] = {}
        for msg in replies:
            if msg.has_error():
                record["errors"].append(msg.error.reason)
                log.warning("round %d: error reply: %s", round_no, msg.error.reason)
                continue
            node = msg.metadata.src_node_id
            metrics = float_metrics(msg.content[METRICS])
            index = self._client_index(metrics, node)
            site = self.sites[index]
            if index in updates:
                raise ValueError(f"round {round_no}: two nodes ({updates[index][0]}, {node}) "
                                 f"reply as site {site!r}; check their node config")
            self.node_sites[node] = site
            state = record_to_state(msg.content[ARRAYS])
            check_same_keys(self.global_state, state, f"round {round_no}: update of site {site!r}")
            if not all_finite(state):
                self._nonfinite(round_no, site, record)
                continue
            count = int(metrics["num-examples"])
            self.sample_counts[site] = count
            record["metrics"][site] = {
                k: v for k, v in metrics.items() if k.startswith(("val-", "test-"))
            }
            updates[index] = (node, index, state, count)
        record["trained"] = [self.sites[i] for i in sorted(updates)]
        return [updates[i] for i in sorted(updates)]

    def _client_index(self, metrics: dict[str, float], node: int) -> int:
        index = int(metrics.get("client-index", -1))
        if not 0 <= index < len(self.sites) or "num-examples" not in metrics:
            raise ValueError(f"node {node}: reply without a valid client-index/num-examples "
                             f"(got {metrics}); sites are {self.sites}")
        return index

    def _nonfinite(self, round_no: int, site: str, record: dict) -> None:
        message = f"round {round_no}: site {site!r} sent NaN/inf weights"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"{message} (on_nonfinite='raise')")
        log.warning("%s; left out of the aggregate", message)
        record["nonfinite"].append(site)

    def _name_missing(self, round_no: int, replied: set[int], record: dict) -> None:
        """Logs every sampled node without a usable update, by site name where known."""
        for node in self._sampled.get(round_no, []):
            if node in replied or self.node_sites.get(node) in record["nonfinite"]:
                continue
            site = self.node_sites.get(node)
            who = f"site {site!r} (node {node})" if site else f"node {node} (site not yet known)"
            log.warning("round %d: %s sent no update; the round goes on without it", round_no, who)
            record["missing"].append({"node": node, "site": site})

    def _apply(self, updates: list) -> None:
        accumulator = UpdateAccumulator(self.global_state, self.param_keys)
        for _, _, state, count in updates:
            accumulator.add(state, float(count))
        params = self.server.step(accumulator.mean_delta())
        merged = {**accumulator.mean_buffers(), **params}
        self.global_state = {k: merged[k] for k in self.global_state}  # keep key order

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_no = server_round + self.round_offset
        if not (self.test_at_end and round_no == self.final_round):
            return []
        return self._messages(grid, len(self.sites), arrays, config, MessageType.EVALUATE,
                              round_no)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rows = []
        for msg in replies:
            if msg.has_error():
                log.warning("test evaluation: error reply: %s", msg.error.reason)
                continue
            metrics = float_metrics(msg.content[METRICS])
            site = self.sites[self._client_index(metrics, msg.metadata.src_node_id)]
            for model in ("global", "personalized"):
                if f"test-{model}-dice" in metrics:
                    rows.append({"site": site, "model": model,
                                 "dice": metrics[f"test-{model}-dice"],
                                 "hd95": metrics.get(f"test-{model}-hd95", float("nan")),
                                 "cases": int(metrics.get("test-cases", 0))})
        self.test_rows = sorted(rows, key=lambda r: (self.sites.index(r["site"]), r["model"]))
        means = _mean_metrics({r["site"] + r["model"]: {f"test-{r['model']}-dice": r["dice"]}
                               for r in rows})
        return MetricRecord(means) if means else None


def _mean_metrics(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over sites of each metric."""
    keys = sorted({k for metrics in per_site.values() for k in metrics})
    out = {}
    for key in keys:
        values = [m[key] for m in per_site.values() if key in m]
        out[key] = sum(values) / len(values)
    return out
