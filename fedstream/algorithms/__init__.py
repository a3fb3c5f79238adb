"""Federated algorithms, selectable by name from a pipeline config (`config.algorithm`).

Every algorithm implements the interface `fedstream.algorithms.base.Algorithm`
(its docstring is the contract: hooks, `Contribution`, capabilities); the
round runner executes them sharded over devices, streamed and checkpointed.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from fedstream.algorithms.base import Algorithm, Contribution, RoundTotal
from fedstream.algorithms.fedavg import OPTIMIZER_NAMES, FedAvg, ServerState, make_optimizer
from fedstream.algorithms.scaffold import Scaffold
from fedstream.models import Model

AlgorithmFactory = Callable[..., Algorithm]
_ALGORITHMS: dict[str, tuple[AlgorithmFactory, str]] = {
    "fedavg": (FedAvg, "FedAvg / FedOpt (McMahan et al. 2017; Reddi et al. 2021): server optimizer on the mean delta"),
    "scaffold": (Scaffold, "SCAFFOLD (Karimireddy et al. 2020), option II control variates in the client-state store"),
}


def register_algorithm(name: str, factory: AlgorithmFactory, description: str) -> None:
    """Adds `factory(model, client_optimizer, server_optimizer, **options)` under `name`."""
    _ALGORITHMS[name] = (factory, description)


def algorithm_names() -> dict[str, str]:
    """Registered algorithm names and one-line descriptions."""
    return {name: description for name, (_, description) in sorted(_ALGORITHMS.items())}


def build_algorithm(name: str, model: Model, client_optimizer: optax.GradientTransformation,
                    server_optimizer: optax.GradientTransformation, *, context: dict[str, Any] | None = None,
                    **options: Any) -> Algorithm:
    """Builds the algorithm `name` with its options (config key `algorithm.options`).

    `context` holds facts of the run (`population`, `client_learning_rate`,
    ...), passed to factories whose signature asks for them.
    """
    if name not in _ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r} (config key algorithm.name); known: {', '.join(sorted(_ALGORITHMS))}")
    factory, _ = _ALGORITHMS[name]
    accepted = inspect.signature(factory).parameters
    extra = {k: v for k, v in (context or {}).items() if k in accepted and k not in options}
    try:
        return factory(model, client_optimizer, server_optimizer, **extra, **options)
    except TypeError as e:
        raise ValueError(f"algorithm {name!r}: bad options {sorted(options)} (config key algorithm.options): {e}") from None


# These modules call register_algorithm on import, so they come after it.
from fedstream.algorithms import agnostic_fedavg, fednova, fedprox, hyp_cluster, mime, mimelite  # noqa: E402,F401
from fedstream.algorithms import dp_fedavg  # noqa: E402,F401  (dp_fedavg, compressed_fedavg)
from fedstream.algorithms import ditto  # noqa: E402,F401

__all__ = ["Algorithm", "Contribution", "RoundTotal", "FedAvg", "ServerState", "make_optimizer", "OPTIMIZER_NAMES",
           "register_algorithm", "algorithm_names", "build_algorithm"]
