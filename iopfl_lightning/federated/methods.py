"""Federated methods as policies: the registry plus every built-in method.

``FederatedTrainer(method="fedprox", method_args={"mu": 0.01})`` picks one by name; a
:class:`FederatedMethod` instance (or ``class_path`` in a config) works too. See
``docs/methods.md`` for how to add one.
"""

from iopfl_lightning.federated.methods_base import (
    METHODS,
    FederatedMethod,
    build_method,
    register_method,
)
from iopfl_lightning.federated.methods_basic import (
    Centralized,
    FedAvg,
    FedBN,
    FedPer,
    IOPFLInside,
    LocalOnly,
)
from iopfl_lightning.federated.methods_prox import Ditto, FedProx, add_proximal_grad

__all__ = [
    "METHODS",
    "Centralized",
    "Ditto",
    "FedAvg",
    "FedBN",
    "FedPer",
    "FedProx",
    "FederatedMethod",
    "IOPFLInside",
    "LocalOnly",
    "add_proximal_grad",
    "build_method",
    "register_method",
]
