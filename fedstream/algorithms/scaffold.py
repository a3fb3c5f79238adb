"""SCAFFOLD (Karimireddy et al., 2020), option II control variates.

Server state: model x and control variate c. Client i keeps c_i (zero until
its first round) in the client-state store. One round, with K_i the number
of local steps client i runs and eta_l its learning rate:

    client i:  y <- x
               K_i times:  y <- y - eta_l * (g_i(y) - c_i + c)
               c_i+ = c_i - c + (x - y) / (K_i * eta_l)          # option II
               sends  Delta y_i = y - x,  Delta c_i = c_i+ - c_i;  stores c_i+
    server:    x <- ServerOpt(x, -mean_i Delta y_i)               # SGD(eta_g): x + eta_g * mean Delta y
               c <- c + (1 / N) * sum_i Delta c_i                 # = c + |S|/N * mean_i Delta c_i

The mean of Delta y uses the run's aggregation weights (examples or
uniform); the control-variate update is the paper's uniform one over the N
clients of the population. The correction (c - c_i) is added to the
gradient before the client optimizer, so with plain SGD the step is exactly
the paper's; eta_l must equal the client optimizer's learning rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.base import Contribution, Params, RoundTotal, ServerState
from fedstream.algorithms.fedavg import FedAvg
from fedstream.models import TrainMetrics


@flax.struct.dataclass
class ScaffoldClient:
    """A client during local training: model, optimizer state, correction c - c_i, steps taken."""

    params: Params
    opt_state: optax.OptState
    correction: Params
    steps: jax.Array


@dataclasses.dataclass(frozen=True)
class Scaffold(FedAvg):
    """SCAFFOLD; `client_learning_rate` is eta_l, `population` is N (both set by the train loop)."""

    client_learning_rate: float = 0.0
    population: int = 0

    has_client_state = True

    def __post_init__(self) -> None:
        if self.client_learning_rate <= 0 or self.population < 1:
            raise ValueError("SCAFFOLD needs client_learning_rate > 0 and population >= 1")

    def init(self, rng: jax.Array) -> ServerState:
        """FedAvg's state plus the server control variate c = 0 in `extra`."""
        state = super().init(rng)
        return state.replace(extra={"c": jax.tree.map(jnp.zeros_like, state.params)})

    def client_state_template(self, params: Params) -> Params:
        """c_i, shaped like the model."""
        return jax.tree.map(jnp.zeros_like, params)

    def broadcast(self, state: ServerState) -> dict[str, Any]:
        """x and c."""
        return {"params": state.params, "c": state.extra["c"]}

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> ScaffoldClient:
        """y <- x; the gradient correction c - c_i is fixed for the round."""
        params = broadcast["params"]
        correction = jax.tree.map(jnp.subtract, broadcast["c"], stored)
        return ScaffoldClient(params, self.client_optimizer.init(params), correction, jnp.zeros((), jnp.int32))

    def client_step(self, state: ScaffoldClient, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[ScaffoldClient, TrainMetrics]:
        """y <- y - eta_l * (g(y) - c_i + c), through the client optimizer."""
        (_, logits), grads = jax.value_and_grad(self.client_loss, has_aux=True)(state.params, batch, rng, broadcast)
        grads = jax.tree.map(jnp.add, grads, state.correction)
        updates, opt_state = self.client_optimizer.update(grads, state.opt_state, state.params)
        metrics = self.model.metrics(logits, batch[self.model.label_key], batch["mask"])
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                             steps=state.steps + 1), metrics

    def client_contribution(self, client: ScaffoldClient, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """Delta y (weighted by the runner), Delta c_i (summed as is) and the new c_i (option II)."""
        x, c = broadcast["params"], broadcast["c"]
        scale = 1.0 / (jnp.maximum(client.steps, 1).astype(jnp.float32) * self.client_learning_rate)
        new_ci = jax.tree.map(lambda ci, c_, x_, y: ci - c_ + (x_ - y) * scale, stored, c, x, client.params)
        delta_y = jax.tree.map(jnp.subtract, client.params, x)
        delta_c = jax.tree.map(jnp.subtract, new_ci, stored)
        return Contribution(weighted=delta_y, summed={"delta_c": delta_c}), new_ci

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """x <- ServerOpt(x, -mean Delta y); c <- c + sum Delta c_i / N."""
        new_state = super().server_update(state, total, rng)
        c = jax.tree.map(lambda c_, dc: c_ + dc / self.population, state.extra["c"], total.summed["delta_c"])
        return new_state.replace(extra={"c": c})
