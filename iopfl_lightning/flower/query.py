"""The end of a federation: collect every site's personalized copy (``query.personalized``).

Every connected node is asked once; a node that connects later (a restarted site) is asked when
it appears, until every inside site has answered or ``timeout`` seconds have passed. Sites that
never answer are named in the log and left out of the routing space.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from iopfl_lightning.federated.state import StateDict, check_same_keys
from iopfl_lightning.flower.records import ARRAYS, CONFIG, METRICS, float_metrics, record_to_state

log = logging.getLogger(__name__)
QUERY = "query.personalized"


def collect_personalized(
    grid: Grid, sites: list[str], federation: str, reference: StateDict, timeout: float
) -> dict[str, StateDict]:
    """``{site: personalized state}`` in site order, for the sites that answered."""
    deadline = time.monotonic() + timeout
    asked: set[int] = set()
    found: dict[str, StateDict] = {}
    while len(found) < len(sites) and (left := deadline - time.monotonic()) > 0:
        nodes = [n for n in grid.get_node_ids() if n not in asked]
        if not nodes:
            time.sleep(min(1.0, left))
            continue
        asked.update(nodes)
        content = RecordDict({CONFIG: ConfigRecord({"federation": federation})})
        messages = [Message(content, dst_node_id=n, message_type=QUERY) for n in nodes]
        for reply in grid.send_and_receive(messages, timeout=left):
            _take(reply, sites, reference, found)
    missing = [s for s in sites if s not in found]
    if missing:
        log.warning("no personalized copy from site(s) %s within %.0f s; the routing space "
                    "leaves them out", missing, timeout)
    return {s: found[s] for s in sites if s in found}


def _take(reply: Message, sites: list[str], reference: StateDict, found: dict) -> None:
    if reply.has_error():
        log.warning("%s: error reply: %s", QUERY, reply.error.reason)
        return
    metrics = float_metrics(reply.content[METRICS])
    index = int(metrics.get("client-index", -1))
    if not 0 <= index < len(sites):
        log.warning("%s: node %d answered with client index %d; sites are %s", QUERY,
                    reply.metadata.src_node_id, index, sites)
        return
    state = record_to_state(reply.content[ARRAYS])
    check_same_keys(reference, state, f"personalized copy of site {sites[index]!r}")
    found[sites[index]] = state
    log.info("personalized copy of %s received (last trained in round %d, %d updates)",
             sites[index], int(metrics.get("last-round", 0)), int(metrics.get("updates", 0)))
