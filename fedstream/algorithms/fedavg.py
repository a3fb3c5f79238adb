"""FedAvg and FedOpt (FedAdam, FedYogi, FedAdagrad, FedAvgM).

McMahan et al. (2017), "Communication-efficient learning of deep networks
from decentralized data"; Reddi et al. (2021), "Adaptive federated
optimization". One round, in the papers' notation:

    for each sampled client i (in parallel):
        w_i <- w                                  # client_init
        for each local batch b:                   # client_step
            w_i <- ClientOpt(w_i, grad l(w_i; b))
        Delta_i = w_i - w                         # client_delta
    Delta = sum_i p_i Delta_i / sum_i p_i         # p_i = n_i (examples) or 1
    w <- ServerOpt(w, -Delta)                     # server_update: -Delta is the pseudo-gradient

ServerOpt = SGD with learning rate 1 is plain FedAvg; Adam, Yogi and Adagrad
give FedAdam, FedYogi and FedAdagrad; SGD with momentum gives FedAvgM.

The functions are pure; `fedstream.training.rounds` runs them over packed
client step streams on a device mesh. `FedAvg` implements the interface
`fedstream.algorithms.base.Algorithm`, which documents the hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.base import (Algorithm, ClientState, Contribution, Params, RoundTotal,  # noqa: F401
                                       ServerState)


def squared_distance(a: Params, b: Params) -> jax.Array:
    """||a - b||^2 over all leaves of two pytrees of the same structure (proximal terms)."""
    return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@dataclasses.dataclass(frozen=True)
class FedAvg(Algorithm):
    """FedAvg with an optax client optimizer and an optax server optimizer.

    One concrete `Algorithm` (see its docstring for the hooks and their
    contract): local steps of the client optimizer from the server model
    (the interface's defaults), each client contributing its plain delta
    w_i - w (the runner weights it by p_i), and the server optimizer applied
    to minus the weighted mean delta.
    """

    def client_contribution(self, client: ClientState, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """Delta_i = w_i - w (the runner multiplies it by p_i); the stored state unchanged."""
        return Contribution(weighted=self.client_delta(client, broadcast["params"])), stored

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """Applies the server optimizer to the pseudo-gradient: minus the weighted mean delta."""
        mean_delta = jax.tree.map(lambda d: d / total.weight, total.weighted)
        return self.apply_server_optimizer(state, mean_delta)


# The optimizer names `make_optimizer` accepts (config keys client.optimizer and server.optimizer).
OPTIMIZER_NAMES = ("sgd", "adam", "yogi", "adagrad")


def make_optimizer(name: str, learning_rate: float, **options: Any) -> optax.GradientTransformation:
    """An optax optimizer by name: 'sgd' (momentum=), 'adam', 'yogi', 'adagrad' (b1=, b2=, eps=, initial_accumulator_value=).

    Defaults of b1/b2/eps follow Reddi et al. (2021) as used in FedJAX's
    experiments where the config does not set them.
    """
    if name == "sgd":
        momentum = options.get("momentum", 0.0)
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "adam":
        return optax.adam(learning_rate, b1=options.get("b1", 0.9), b2=options.get("b2", 0.999),
                          eps=options.get("eps", 1e-8))
    if name == "yogi":
        return optax.yogi(learning_rate, b1=options.get("b1", 0.9), b2=options.get("b2", 0.999),
                          eps=options.get("eps", 1e-3))
    if name == "adagrad":
        return optax.adagrad(learning_rate, eps=options.get("eps", 1e-7),
                             initial_accumulator_value=options.get("initial_accumulator_value", 0.1))
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZER_NAMES)}")
