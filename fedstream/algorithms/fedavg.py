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
from typing import Any, ClassVar, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.models import Model, TrainMetrics

Params = Any


def squared_distance(a: Params, b: Params) -> jax.Array:
    """||a - b||^2 over all leaves of two pytrees of the same structure (proximal terms)."""
    return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@flax.struct.dataclass
class ServerState:
    """What the server carries from round to round (and what is checkpointed).

    `extra` holds algorithm-specific server state (SCAFFOLD's control
    variate, AgnosticFedAvg's domain weights, ...); None for FedAvg.
    """

    params: Params
    opt_state: optax.OptState
    round: jax.Array  # rounds completed so far (int32 scalar)
    extra: Any = None


@flax.struct.dataclass
class ClientState:
    """A client's model and optimizer state during local training."""

    params: Params
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class FedAvg:
    """FedAvg with an optax client optimizer and an optax server optimizer.

    The round runner (`fedstream.training.rounds`) calls, per round:

        b = broadcast(state)                                   # once, replicated
        [prepass, only if `uses_prepass`: p_i = sum of prepass_step(b, batch) over
         client i's examples (each once), at the broadcast model;
         b = after_prepass(b, sum_i p_i)]
        per client i:  c = client_init(b, stored_i, p_i)       # stored_i: per-client state (if any)
                       c = client_step(c, batch, key, b)       # for each of its steps
                       contribution_i, stored_i' = client_contribution(c, b, weight_i, stored_i, p_i, key_i)
        state = server_update(state, sum_i contribution_i, server_key)  # skipped if the weights sum to 0

    Subclasses override these to define other algorithms.
    """

    model: Model
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation

    uses_prepass: ClassVar[bool] = False
    # Dataset features the algorithm reads besides the model's input and label (e.g. domain_id).
    extra_features: ClassVar[tuple[str, ...]] = ()

    def init(self, rng: jax.Array) -> ServerState:
        """Initial server state: fresh model params and server optimizer state."""
        params = self.model.init(rng)
        return ServerState(params, self.server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def client_state_template(self, params: Params) -> Any:
        """Zeros shaped like one client's persistent state, or None for a stateless algorithm."""
        return None

    def broadcast(self, state: ServerState) -> Any:
        """What every client of the round receives (here: the server params)."""
        return {"params": state.params}

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> ClientState:
        """A client starts from the server model with a fresh optimizer."""
        params = broadcast["params"]
        return ClientState(params, self.client_optimizer.init(params))

    def client_loss(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any) -> tuple[jax.Array, jax.Array]:
        """The local objective on one batch (mean over scored targets) and the logits."""
        logits = self.model.apply(params, batch[self.model.input_key], rng=rng)
        return self.model.batch_loss(logits, batch[self.model.label_key], batch["mask"]), logits

    def client_step(
        self, state: ClientState, batch: Mapping[str, jax.Array], rng: jax.Array, broadcast: Any = None
    ) -> tuple[ClientState, TrainMetrics]:
        """One local step on a batch; padded examples (mask False) do not count."""
        (_, logits), grads = jax.value_and_grad(self.client_loss, has_aux=True)(state.params, batch, rng, broadcast)
        updates, opt_state = self.client_optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ClientState(params, opt_state), self.model.metrics(logits, batch[self.model.label_key], batch["mask"])

    def client_delta(self, state: ClientState, server_params: Params) -> Params:
        """The update a client sends: its trained params minus the server's."""
        return jax.tree.map(jnp.subtract, state.params, server_params)

    def client_contribution(self, client: ClientState, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[dict[str, Any], Any]:
        """What this client adds to the round's sum (`weight` must be a key), and its new stored state.

        `prepass` is this client's own prepass sums; `rng` a key of (seed, round, client).
        """
        delta = self.client_delta(client, broadcast["params"])
        return {"delta": jax.tree.map(lambda d: weight * d, delta), "weight": weight}, stored

    def server_update(self, state: ServerState, total: Mapping[str, Any], rng: jax.Array | None = None) -> ServerState:
        """Applies the server optimizer to the pseudo-gradient: minus the weighted mean delta."""
        mean_delta = jax.tree.map(lambda d: d / total["weight"], total["delta"])
        return self.apply_server_optimizer(state, mean_delta)

    def apply_server_optimizer(self, state: ServerState, mean_delta: Params) -> ServerState:
        """ServerOpt(w, -mean_delta), round + 1."""
        pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
        updates, opt_state = self.server_optimizer.update(pseudo_grad, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                             round=state.round + 1)

    # Prepass hooks (used when `uses_prepass`): a pass over each client's
    # examples (each once) at the broadcast model before local training.
    def prepass_step(self, broadcast: Any, batch: Mapping[str, jax.Array]) -> Any:
        """Per-batch sums for the prepass (batch["mask"] marks the examples to count).

        Only called when `uses_prepass` is True; such algorithms must override it.
        """
        raise NotImplementedError(f"{type(self).__name__} sets uses_prepass but does not define prepass_step")

    def after_prepass(self, broadcast: Any, total: Any) -> Any:
        """The broadcast for local training, given the prepass sums over all clients."""
        return broadcast


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
