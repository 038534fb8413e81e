"""The Flower ServerApp: rounds, per-round checkpoints, and the routing space at the end.

1. Reads the experiment YAML (the file ``fit --config`` takes): the initial global model (built
   after ``seed_everything`` as ``fit`` builds it), the inside sites and the
   ``FederatedTrainer`` settings (server optimizer, ``client_fraction``, ``on_nonfinite``).
2. Runs ``num-rounds`` rounds with :class:`IOPFLStrategy` (the in-process engine's
   aggregation), writing ``<out>/checkpoint.pt`` and ``<out>/rounds.json`` after every round.
3. Optionally evaluates the final global model and every site's personalized copy on the sites'
   test splits (``<out>/results.{csv,md}``).
4. Collects every site's personalized copy with the ``query.personalized`` message and writes
   ``<out>/routing_space.pt`` with :func:`write_routing_space`, the file the RoutingModule and
   ``--model.routing_space`` read, exactly as the in-process engine writes it.

``make_server_app(overrides)`` builds an app with ``overrides`` over the run config (the
simulation's way of passing its arguments); ``app`` is the one ``flwr run`` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from iopfl_lightning.flower.settings import FlowerSettings, resolve_settings

log = logging.getLogger(__name__)


def run_server(grid: Grid, context: Context, overrides: Mapping[str, Any] | None = None) -> Path:
    """The ServerApp's main; returns the routing space it wrote."""
    from iopfl_lightning.federated.routing_space import check_run_owns
    from iopfl_lightning.flower.experiment import load_experiment
    from iopfl_lightning.flower.server_state import start_state

    _ensure_logging()
    settings = resolve_settings(context.run_config, overrides)
    experiment = load_experiment(settings.config)
    out = Path(settings.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    net = experiment.model.net
    state = start_state(out, settings.resume, experiment.sites, net.state_dict())
    check_run_owns(out / "routing_space.pt", state.federation)
    total = settings.num_rounds or experiment.max_epochs
    if total <= 0:
        raise ValueError(f"{settings.config}: no rounds (num-rounds 0 and trainer.max_epochs 0)")
    strategy = _strategy(settings, experiment, state, out, total)
    if total > state.round:
        strategy.start(
            grid, ArrayRecord.from_torch_state_dict(state.global_state),
            num_rounds=total - state.round, timeout=settings.round_timeout,
            train_config=ConfigRecord({"federation": state.federation}),
            evaluate_config=ConfigRecord({"federation": state.federation, "split": "test"}),
        )
    elif settings.test_at_end and not (out / "results.csv").exists():
        _final_test(grid, settings, strategy, state)  # the run stopped during it: once more
    return _finish(grid, settings, experiment, strategy, state, out)


def _final_test(grid: Grid, settings: FlowerSettings, strategy, state) -> None:
    """The test evaluation that follows the last round, on its own (every round is done)."""
    log.info("all %d rounds are done but the test evaluation is not: running it", state.round)
    arrays = ArrayRecord.from_torch_state_dict(strategy.global_state)
    config = ConfigRecord({"federation": state.federation, "split": "test"})
    messages = strategy.configure_evaluate(0, arrays, config, grid)  # round 0 after the offset
    strategy.aggregate_evaluate(0, grid.send_and_receive(messages,
                                                         timeout=settings.round_timeout))


def _strategy(settings: FlowerSettings, experiment, state, out: Path, total: int):
    from iopfl_lightning.federated.aggregate import ServerOptimizer
    from iopfl_lightning.federated.state import subset
    from iopfl_lightning.flower.server_state import save_state
    from iopfl_lightning.flower.strategy import IOPFLStrategy

    fed, sites = experiment.federation, experiment.sites
    min_replies = settings.min_replies or min(2, len(sites))
    min_available = settings.min_available or len(sites)
    if not min_replies <= min_available <= len(sites):
        raise ValueError(f"need min-replies ({min_replies}) <= min-available ({min_available}) "
                         f"<= number of sites ({len(sites)})")
    param_keys = {k for k, _ in experiment.model.net.named_parameters()}
    server = ServerOptimizer(subset(state.global_state, param_keys),
                             name=fed.server_optimizer_name, lr=fed.server_lr,
                             momentum=fed.server_momentum)
    if state.server_optimizer is not None:
        server.load_state_dict(state.server_optimizer)
    strategy = IOPFLStrategy(
        global_state=state.global_state, param_keys=param_keys, server=server, sites=sites,
        min_replies=min_replies, min_available=min_available,
        fraction_train=fed.client_fraction, on_nonfinite=fed.on_nonfinite,
        round_offset=state.round, final_round=total, test_at_end=settings.test_at_end,
        node_wait=settings.round_timeout,
    )
    strategy.history, strategy.sample_counts = state.history, state.sample_counts

    def checkpoint(round_no: int) -> None:
        state.round, state.global_state = round_no, strategy.global_state
        state.server_optimizer = server.state_dict()
        save_state(out, state)
        log.info("round %d done; checkpoint %s", round_no, out / "checkpoint.pt")

    strategy.on_round = checkpoint
    return strategy


def _finish(grid: Grid, settings: FlowerSettings, experiment, strategy, state, out: Path) -> Path:
    from iopfl_lightning.federated.routing_space import write_routing_space
    from iopfl_lightning.flower.query import collect_personalized
    from iopfl_lightning.results import write_results

    if strategy.test_rows:
        write_results(strategy.test_rows, out, title="Flower test results")
    personalized = collect_personalized(grid, experiment.sites, state.federation,
                                        strategy.global_state, settings.query_timeout)
    if not personalized:
        raise RuntimeError("no site returned its personalized copy; routing space not written")
    # every site of the federation, as the engine writes it: one that trained but did not
    # answer the query still trained the global model, so it must never pass as unseen
    sites = list(experiment.sites)
    missing = [s for s in sites if s not in personalized]
    if missing:
        log.warning("no personalized copy of %s in the routing space (no answer to the query); "
                    "outside sites route over the others", missing)
    path = write_routing_space(
        out / "routing_space.pt", net_spec=experiment.net_spec, sites=sites,
        global_state=strategy.global_state, personalized=personalized,
        sample_counts={s: strategy.sample_counts[s] for s in sites if s in strategy.sample_counts},
        rounds=state.round, run_id=state.federation,
    )
    log.info("wrote %s (%d rounds, sites %s, copies of %s)", path, state.round, sites,
             list(personalized))
    return path


def _ensure_logging() -> None:
    """INFO logs of this package reach the ServerApp's output (Flower streams it)."""
    package = logging.getLogger("iopfl_lightning")
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``overrides`` over the run's own."""
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, overrides)

    return app


app = make_server_app()
