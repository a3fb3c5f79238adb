"""Ditto (Li, Hu, Beirami and Smith, 2021), "Ditto: fair and robust federated learning through personalization".

The global model w is trained exactly as FedAvg; each client i also keeps a
personal model v_i, in the client-state store, that solves

    min_v  h_i(v; w) = f_i(v) + lambda/2 * ||v - w^t||^2

One round (the paper's Algorithm 1, with the personal steps on the same
minibatches as the global ones):

    for each sampled client i (in parallel):
        w_i <- w^t
        v_i <- stored v_i, or w^t the first time client i is sampled
        for each local batch b:                                   # client_step
            w_i <- ClientOpt(w_i, grad f_i(w_i; b))                   # FedAvg's local step
            v_i <- PersonalOpt(v_i, grad f_i(v_i; b) + lambda (v_i - w^t))
        Delta_i = w_i - w^t;  store v_i
    w^{t+1} = ServerOpt(w^t, -sum_i p_i Delta_i / sum_i p_i)

With SGD the personal step is the paper's v_i <- v_i - eta_p (grad f_i(v_i) +
lambda (v_i - w^t)); it is stable only for eta_p * lambda < 2. PersonalOpt is
the client optimizer (fresh state each round), or SGD with
`personal_learning_rate` when that is > 0. The paper's server average is
uniform (config aggregation='uniform'); 'example' weights by examples.

Stored per client: {"v": v_i, "initialized": 1}. The store hands out zeros
for a client never trained, so `initialized` = 0 marks "no v_i yet: start
from w^t" (zeros are a valid model, so v itself cannot mark it). A client
whose v_i becomes non-finite sends a non-finite update, so the round runner
leaves it out (and keeps its old v_i) under the run's `nonfinite` policy.

Personalized evaluation reads v_i from the store
(`fedstream.training.personalized_eval.evaluate_personal`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.base import Contribution, Params
from fedstream.algorithms.fedavg import FedAvg, squared_distance
from fedstream.models import TrainMetrics


@flax.struct.dataclass
class DittoClient:
    """A client during local training: the global-model copy w_i and the personal model v_i, with optimizer states."""

    params: Params
    opt_state: optax.OptState
    personal: Params
    personal_opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class Ditto(FedAvg):
    """Ditto: FedAvg for w plus per-client personal models v_i with the proximal weight lambda = `ditto_lambda`.

    Options:
      ditto_lambda: lambda >= 0, the weight of lambda/2 ||v_i - w||^2 in each personal objective.
      personal_learning_rate: eta_p of plain SGD for the personal models v_i (0 = the client optimizer).
    """

    ditto_lambda: float = 0.1
    personal_learning_rate: float = 0.0  # 0 = the client optimizer for v_i too
    client_learning_rate: float = 0.0  # set by the train loop; only used to warn about eta_p * lambda >= 2

    has_client_state = True
    has_personal_models = True

    def __post_init__(self) -> None:
        if not self.ditto_lambda >= 0:
            raise ValueError(f"ditto_lambda must be >= 0, got {self.ditto_lambda}")
        if self.personal_learning_rate < 0:
            raise ValueError(f"personal_learning_rate must be >= 0, got {self.personal_learning_rate}")
        eta = self.personal_learning_rate or self.client_learning_rate
        if eta * self.ditto_lambda >= 2:
            warnings.warn(f"Ditto: personal learning rate {eta} x ditto_lambda {self.ditto_lambda} >= 2, the "
                          "personal SGD steps diverge; set algorithm.options.personal_learning_rate <= 1/lambda",
                          stacklevel=2)

    @functools.cached_property
    def personal_optimizer(self) -> optax.GradientTransformation:
        """PersonalOpt: SGD(personal_learning_rate) if set, else the client optimizer."""
        return optax.sgd(self.personal_learning_rate) if self.personal_learning_rate > 0 else self.client_optimizer

    def client_state_template(self, params: Params) -> dict[str, Any]:
        """{"v": v_i shaped like the model, "initialized": int32 flag (0 = never trained)}."""
        return {"v": jax.tree.map(jnp.zeros_like, params), "initialized": jnp.zeros((), jnp.int32)}

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> DittoClient:
        """w_i <- w^t; v_i <- stored v_i, or w^t if the client has none yet."""
        w = broadcast["params"]
        known = stored["initialized"] > 0
        v = jax.tree.map(lambda s, g: jnp.where(known, s, g), stored["v"], w)
        return DittoClient(w, self.client_optimizer.init(w), v, self.personal_optimizer.init(v))

    def personal_loss(self, v: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                      broadcast: Any) -> jax.Array:
        """h_i(v; w^t) = f_i(v; b) + lambda/2 ||v - w^t||^2 on one batch."""
        loss, _ = FedAvg.client_loss(self, v, batch, rng, broadcast)
        return loss + 0.5 * self.ditto_lambda * squared_distance(v, broadcast["params"])

    def client_step(self, state: DittoClient, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[DittoClient, TrainMetrics]:
        """One FedAvg step of w_i and one step of v_i on h_i, on the same batch (metrics: of w_i)."""
        (_, logits), grads = jax.value_and_grad(self.client_loss, has_aux=True)(state.params, batch, rng, broadcast)
        updates, opt_state = self.client_optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        personal_grads = jax.grad(self.personal_loss)(state.personal, batch, jax.random.fold_in(rng, 1), broadcast)
        updates, personal_opt_state = self.personal_optimizer.update(personal_grads, state.personal_opt_state,
                                                                     state.personal)
        personal = optax.apply_updates(state.personal, updates)
        metrics = self.model.metrics(logits, batch[self.model.label_key], batch["mask"])
        return DittoClient(params, opt_state, personal, personal_opt_state), metrics

    def client_contribution(self, client: DittoClient, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """FedAvg's Delta_i (made non-finite if v_i is), and the new stored {v_i, initialized=1}."""
        contribution, _ = super().client_contribution(client, broadcast, weight, stored, prepass, rng)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(client.personal)]))
        delta = jax.tree.map(lambda d: jnp.where(finite, d, jnp.nan), contribution.weighted)
        return contribution.replace(weighted=delta), {"v": client.personal, "initialized": jnp.ones((), jnp.int32)}

    def personal_model(self, stored: Any, params: Params = None) -> tuple[Params, Any]:
        """(v_i, whether client i has one) from stored states (leaves with any leading shape; NumPy or JAX).

        `params` (the global model) is not needed: v_i is a model of its own."""
        return stored["v"], stored["initialized"] > 0


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("ditto", Ditto,
                       "Ditto (Li et al. 2021): FedAvg global model plus personal models v_i in the client-state "
                       "store, f_i(v) + lambda/2 ||v - w||^2 (ditto_lambda, personal_learning_rate)")


_register()
