"""Flower adapter: the same experiment YAML across machines (flwr 1.42, the ``flwr`` extra).

- ``client_app``: the ClientApp (``app``; ``make_client_app``): one site's local training,
  personalized EMA copy (node state + site disk) and evaluation.
- ``server_app``: the ServerApp (``app``; ``make_server_app``): rounds, per-round checkpoint,
  routing space collected with ``query.personalized``.
- ``strategy``: Flower's FedAvg sampling with the in-process engine's aggregation.
- ``simulate``: ``python -m iopfl_lightning.flower.simulate`` (``run_simulation`` on Ray).
- ``settings``, ``experiment``, ``local``, ``records``, ``site_store``, ``server_state``,
  ``query``: the pieces behind them.

Every Flower import of the project lives in this package, and importing the package itself
imports nothing (the ClientApp's light query handler relies on it). See ``docs/flower.md``.
"""
