"""Federated rounds (the Lightning callback) and the pure functions behind them."""

from iopfl_lightning.federated.aggregate import ServerOptimizer, UpdateAccumulator, weighted_average
from iopfl_lightning.federated.callback import FederatedTrainer
from iopfl_lightning.federated.participation import select_clients
from iopfl_lightning.federated.personalize import ema_update
from iopfl_lightning.federated.routing_space import read_routing_space, write_routing_space

__all__ = [
    "FederatedTrainer",
    "ServerOptimizer",
    "UpdateAccumulator",
    "ema_update",
    "read_routing_space",
    "select_clients",
    "weighted_average",
    "write_routing_space",
]
