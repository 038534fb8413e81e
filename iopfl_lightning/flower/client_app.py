"""The Flower ClientApp: one hospital site.

Messages it answers (every reply passes :func:`~iopfl_lightning.flower.records.check_outgoing`:
model arrays and scalar metrics only):

- ``train``: receives the global weights, trains locally (:class:`SiteRuntime`), folds the
  result into the site's personalized copy (IOP-FL EMA, ``p <- a p + (1 - a) w``, the
  YAML's ``alpha``), keeps the copy in ``context.state`` and on the site's disk, evaluates the
  received global model and the new copy on the site's validation split, and replies with the
  locally trained weights, the training sample count, its client index and the metrics.
  A client whose weights turn NaN/inf leaves its copy unchanged (the server drops the update).
- ``evaluate``: the final global model and the copy on the ``split`` the server names
  (``test``); metrics only.
- ``query.personalized``: replies with the stored copy (from the node's state or, after a
  restart, from the site's disk). This handler imports neither torch nor Lightning unless it
  must read the disk, so answering it is cheap.

``make_client_app(overrides)`` builds an app whose run config is ``overrides`` on top of the
run's own (the simulation passes its arguments this way); ``app`` is the one ``flwr run`` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from iopfl_lightning.flower import settings as cfg
from iopfl_lightning.flower.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    check_outgoing,
    metric_record,
    reply_content,
)
from iopfl_lightning.flower.site_store import (
    Personal,
    fold_base,
    load_personal,
    save_personal,
    store_path,
)

log = logging.getLogger(__name__)


def _runtime(context: Context, overrides: Mapping[str, Any] | None):
    from iopfl_lightning.flower.local import get_runtime

    settings = cfg.resolve_settings(context.run_config, overrides)
    node = context.node_config
    return get_runtime(
        cfg.experiment_path(node, settings), cfg.data_root(node),
        site_of=lambda sites: cfg.resolve_site(node, sites),
        folder_of=lambda site: cfg.site_dir(node, settings, site),
        torch_threads=settings.torch_threads,
    )


def _federation(message: Message) -> str:
    config = message.content[CONFIG] if CONFIG in message.content else {}
    if "federation" not in config:
        raise ValueError(f"{message.metadata.message_type} message carries no 'federation' id")
    return str(config["federation"])


def handle_train(
    message: Message, context: Context, overrides: Mapping[str, Any] | None
) -> Message:
    from iopfl_lightning.federated.personalize import ema_update
    from iopfl_lightning.federated.state import all_finite
    from iopfl_lightning.flower.records import record_to_state, state_to_record

    runtime = _runtime(context, overrides)
    federation = _federation(message)
    round_no = int(message.content[CONFIG]["server-round"])
    global_state = record_to_state(message.content[ARRAYS])
    path = store_path(runtime.folder, federation)
    personal = load_personal(context, path, runtime.site)
    local = runtime.train(global_state, round_no - 1)
    metrics: dict[str, float | int] = {
        "num-examples": runtime.num_examples, "client-index": runtime.index,
        "server-round": round_no,
    }
    if all_finite(local):
        base, rounds = fold_base(personal, round_no)
        copy = ema_update(None if base is None else record_to_state(base), local, runtime.alpha)
        save_personal(context, path, Personal(state_to_record(copy), runtime.site, runtime.index,
                                              [*rounds, round_no], previous=base), federation)
        metrics.update(runtime.evaluate(global_state, copy, "val"))
    else:
        log.warning("site %s, round %d: NaN/inf weights after local training; the "
                    "personalized copy is unchanged", runtime.site, round_no)
    return _reply(message, reply_content(local, metrics), runtime.reference)


def handle_evaluate(
    message: Message, context: Context, overrides: Mapping[str, Any] | None
) -> Message:
    from iopfl_lightning.flower.records import record_to_state

    runtime = _runtime(context, overrides)
    split = str(message.content[CONFIG].get("split", "test"))
    personal = load_personal(context, store_path(runtime.folder, _federation(message)),
                             runtime.site)
    state = record_to_state(personal.arrays) if personal else None
    metrics = runtime.evaluate(record_to_state(message.content[ARRAYS]), state, split)
    metrics.update({"client-index": runtime.index, "num-examples": metrics[f"{split}-cases"]})
    return _reply(message, reply_content(None, metrics), runtime.reference)


def handle_query_personalized(
    message: Message, context: Context, overrides: Mapping[str, Any] | None
) -> Message:
    settings = cfg.resolve_settings(context.run_config, overrides)
    node = context.node_config
    site = str(node["site-name"]) if "site-name" in node else None
    federation = _federation(message)
    if site is not None or "site-dir" in node:
        path = store_path(cfg.site_dir(node, settings, site or ""), federation)
        personal = load_personal(context, path, site)
    else:  # a simulated node known by partition id: resolving its folder needs the YAML
        personal = load_personal(context, None, None)
        if personal is None:
            runtime = _runtime(context, overrides)
            personal = load_personal(context, store_path(runtime.folder, federation), runtime.site)
    if personal is None:
        raise LookupError(f"node {site or node}: no personalized copy for federation {federation}"
                          " (this site never finished a round)")
    content = RecordDict({
        ARRAYS: personal.arrays,
        METRICS: metric_record({
            "client-index": personal.client_index, "last-round": max(personal.rounds),
            "updates": len(personal.rounds),
        }),
    })
    return _reply(message, content, None)


def _reply(message: Message, content: RecordDict,
           reference: Mapping[str, Any] | None) -> Message:
    """Every reply leaves through here, after the privacy check of what it carries."""
    check_outgoing(content, reference)
    return Message(content, reply_to=message)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``overrides`` over the run's own."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, overrides)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle_evaluate(message, context, overrides)

    @app.query("personalized")
    def personalized(message: Message, context: Context) -> Message:
        return handle_query_personalized(message, context, overrides)

    return app


app = make_client_app()
