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
client step streams on a device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.models import Model, TrainMetrics

Params = Any


@flax.struct.dataclass
class ServerState:
    """What the server carries from round to round (and what is checkpointed)."""

    params: Params
    opt_state: optax.OptState
    round: jax.Array  # rounds completed so far (int32 scalar)


@flax.struct.dataclass
class ClientState:
    """A client's model and optimizer state during local training."""

    params: Params
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class FedAvg:
    """FedAvg with an optax client optimizer and an optax server optimizer."""

    model: Model
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation

    def init(self, rng: jax.Array) -> ServerState:
        """Initial server state: fresh model params and server optimizer state."""
        params = self.model.init(rng)
        return ServerState(params, self.server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def client_init(self, server_params: Params) -> ClientState:
        """A client starts from the server model with a fresh optimizer."""
        return ClientState(server_params, self.client_optimizer.init(server_params))

    def client_step(
        self, state: ClientState, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[ClientState, TrainMetrics]:
        """One local step on a batch; padded examples (mask False) do not count."""
        x, y, mask = batch[self.model.input_key], batch[self.model.label_key], batch["mask"]

        def loss_fn(params: Params) -> tuple[jax.Array, jax.Array]:
            logits = self.model.apply(params, x, rng=rng)
            return self.model.batch_loss(logits, y, mask), logits

        (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.client_optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ClientState(params, opt_state), self.model.metrics(logits, y, mask)

    def client_delta(self, state: ClientState, server_params: Params) -> Params:
        """The update a client sends: its trained params minus the server's."""
        return jax.tree.map(jnp.subtract, state.params, server_params)

    def server_update(self, state: ServerState, mean_delta: Params) -> ServerState:
        """Applies the server optimizer to the pseudo-gradient -mean_delta."""
        pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
        updates, opt_state = self.server_optimizer.update(pseudo_grad, state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state, state.round + 1)


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
    raise ValueError(f"unknown optimizer {name!r}; known: sgd, adam, yogi, adagrad")
