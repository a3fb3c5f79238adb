"""The algorithm contract: the hooks the round runner calls, and what they receive and return.

`Algorithm` is the interface every federated algorithm implements (FedAvg
is one of them: `fedstream.algorithms.fedavg.FedAvg`). A client's share of
the round is a typed `Contribution`; the runner sums the contributions of a
round into a `RoundTotal` and hands it to the server. See `Algorithm` for
the whole contract.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.models import Model, TrainMetrics

Params = Any


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


@flax.struct.dataclass
class Contribution:
    """What one client adds to the round's sums (returned by `Algorithm.client_contribution`).

    weighted: a pytree the RUNNER multiplies by the client's weight before
        summing (e.g. FedAvg's plain delta w_i - w: return what you mean,
        never pre-multiplied by the weight).
    summed: a pytree summed over the clients as it is (e.g. SCAFFOLD's
        Delta c_i, Mime's gradient sums); None for nothing.
    metrics: per-client scalars, summed over the round's clients and logged
        (metrics.jsonl, TensorBoard) under their names by default (see
        `Algorithm.log_values`).
    weight: the client's aggregation weight p_i, when the algorithm sets it
        itself (AgnosticFedAvg's beta_i, DP's 1); None (default): the weight
        the runner passed to `client_contribution` (the pipeline's: the
        client's examples, or 1 under uniform aggregation).

    Every client of an algorithm must return the same structure (leaf shapes
    and dtypes), whatever its data.
    """

    weighted: Any = None
    summed: Any = None
    metrics: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
    weight: jax.Array | None = None


@flax.struct.dataclass
class RoundTotal:
    """The sums of a round's contributions, as `Algorithm.server_update` receives them.

    weighted: sum_i p_i weighted_i;  weight: sum_i p_i (float32 scalar);
    summed: sum_i summed_i;  metrics: sum_i metrics_i (same keys).
    Clients left out of the round (not trained, or a non-finite
    contribution) add nothing.
    """

    weighted: Any
    weight: jax.Array
    summed: Any = None
    metrics: dict[str, jax.Array] = flax.struct.field(default_factory=dict)


def client_total(contribution: Contribution, weight: jax.Array) -> RoundTotal:
    """One client's share of the round's sums: `weighted` times its weight p_i, p_i, `summed`, `metrics`.

    p_i is `contribution.weight` if set, else `weight` (what the runner passed
    to `client_contribution`). The round's `RoundTotal` is the leaf-wise sum
    of these over its clients.
    """
    if not isinstance(contribution, Contribution):
        raise TypeError(f"client_contribution must return (Contribution, stored), got a {type(contribution).__name__} "
                        "first: put the update in Contribution(weighted=...) unmultiplied (the runner multiplies it "
                        "by the client's weight), other sums in summed=..., logged numbers in metrics=...")
    p = jnp.asarray(weight if contribution.weight is None else contribution.weight, jnp.float32)
    return RoundTotal(weighted=jax.tree.map(lambda x: p * x, contribution.weighted), weight=p,
                      summed=contribution.summed, metrics=dict(contribution.metrics))


def aggregate(contributions: Iterable[Contribution], weights: Iterable[Any]) -> RoundTotal:
    """The `RoundTotal` of some clients' contributions with the runner's weights (for tests and notebooks)."""
    total = None
    for contribution, weight in zip(contributions, weights, strict=True):
        one = client_total(contribution, weight)
        total = one if total is None else jax.tree.map(jnp.add, total, one)
    if total is None:
        raise ValueError("aggregate needs at least one contribution")
    return total


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The interface of a federated algorithm: pure hooks that the round runner calls.

    Per round (`fedstream.training.rounds` runs this sharded over devices,
    compiled; `build_debug_round` runs the same eagerly):

        b = broadcast(state)                                      # once, replicated
        [only if `per_client_broadcast`: each client i below uses b_i = client_broadcast(b, slot_i)]
        [only if `uses_prepass`: p_i = sum of prepass_step(b, batch) over client i's
         examples (each once), at the broadcast model; b = after_prepass(b, sum_i p_i)]
        per client i:  c = client_init(b, stored_i, p_i)          # stored_i: per-client state (if any)
                       c, m = client_step(c, batch, key, b)       # for each of its steps
                       contribution_i, stored_i' = client_contribution(c, b, weight_i, stored_i, p_i, key_i)
        total = RoundTotal(weighted = sum_i p_i * contribution_i.weighted,
                           weight   = sum_i p_i,                  # p_i = contribution_i.weight or weight_i
                           summed   = sum_i contribution_i.summed,
                           metrics  = sum_i contribution_i.metrics)
        state = server_update(state, total, server_key)           # skipped if total.weight == 0, unless
                                                                  # `updates_on_empty_rounds`
        round log: log_values(total.metrics)                      # metrics.jsonl / TensorBoard

    The contract:

    * Hooks are pure JAX functions of their arguments (no side effects, no
      Python control flow on traced values); they run inside `jit` and
      `shard_map`, once per client, with the same structure for every client.
    * `client_contribution` returns a `Contribution` and the client's new
      stored state. `weighted` is what the algorithm means (the plain
      delta): the runner multiplies it by p_i. `weight_i` is passed for
      reading only; an algorithm that aggregates with its own weights sets
      `Contribution.weight`.
    * A client whose contribution (times its weight) is not all finite is
      left out of the round's sums, its stored state unchanged, and counted.
    * `server_update` gets the `RoundTotal` and returns the next
      `ServerState` with `round` + 1.
    * Capabilities are declared as class attributes (below), never
      discovered: the runner and the simulation read them.

    Subclasses are frozen dataclasses; `model`, `client_optimizer` and
    `server_optimizer` come first, options after. The defaults below are the
    common local-training hooks (plain local steps of the client optimizer
    from the server model); `client_contribution` and `server_update` define
    the aggregation and have no default.
    """

    model: Model
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation

    # -- capabilities (class attributes; set to True by the algorithms that have them) --
    # Runs the prepass (`prepass_step`, `after_prepass`) before local training.
    uses_prepass: ClassVar[bool] = False
    # Keeps per-client state between rounds (`client_state_template`), in the client-state store.
    has_client_state: ClassVar[bool] = False
    # Keeps a personal model per client in its stored state (`personal_model`), evaluated as `personal_*`.
    has_personal_models: ClassVar[bool] = False
    # Keeps `num_clusters` models stacked on a leading axis of `ServerState.params`, evaluated per client on
    # its best cluster (HypCluster).
    is_clustered: ClassVar[bool] = False
    # The server update runs even in a round where no client trained (total.weight == 0), e.g. DP's noise.
    updates_on_empty_rounds: ClassVar[bool] = False
    # Dataset features the algorithm reads besides the model's input and label (e.g. domain_id).
    extra_features: ClassVar[tuple[str, ...]] = ()
    # Each client gets its own view of the broadcast (`client_broadcast`), chosen by its slot features (FedBuff:
    # the model version the client started from).
    per_client_broadcast: ClassVar[bool] = False
    # Per-client slot features the algorithm reads in `client_broadcast` (int32, besides the runner's own).
    slot_features: ClassVar[tuple[str, ...]] = ()
    # Clients train asynchronously on the simulated clock: a round is one server step over the updates that
    # arrived for it (FedBuff; the algorithm has `concurrency` and `max_staleness`).
    is_asynchronous: ClassVar[bool] = False

    # -- server side --

    def init(self, rng: jax.Array) -> ServerState:
        """Initial server state: fresh model params and server optimizer state."""
        params = self.model.init(rng)
        return ServerState(params, self.server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def broadcast(self, state: ServerState) -> Any:
        """What every client of the round receives (here: the server params, under "params")."""
        return {"params": state.params}

    def client_broadcast(self, broadcast: Any, slot: Mapping[str, jax.Array]) -> Any:
        """One client's view of the broadcast, from its slot features (only called when `per_client_broadcast`).

        `slot` holds the client's scalars: `slot_client`, `slot_weight`, ... and
        the algorithm's own `slot_features`. The result replaces the broadcast
        in every client hook of that client.
        """
        return broadcast

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """The next server state from the round's sums (`rng`: the round's server key); round + 1."""
        raise NotImplementedError(f"{type(self).__name__} does not define server_update")

    def apply_server_optimizer(self, state: ServerState, mean_delta: Params) -> ServerState:
        """ServerOpt(w, -mean_delta), round + 1 (a helper for `server_update`)."""
        pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
        updates, opt_state = self.server_optimizer.update(pseudo_grad, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                             round=state.round + 1)

    # -- client side --

    def client_state_template(self, params: Params) -> Any:
        """Zeros shaped like one client's stored state (a client never trained reads these).

        Only called when `has_client_state`; None otherwise.
        """
        if self.has_client_state:
            raise NotImplementedError(f"{type(self).__name__} sets has_client_state but does not define "
                                      "client_state_template")
        return None

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> Any:
        """A client starts from the server model with a fresh optimizer (`stored`, `prepass`: its own)."""
        params = broadcast["params"]
        return ClientState(params, self.client_optimizer.init(params))

    def client_loss(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any) -> tuple[jax.Array, jax.Array]:
        """The local objective on one batch (mean over scored targets) and the logits."""
        logits = self.model.apply(params, batch[self.model.input_key], rng=rng)
        return self.model.batch_loss(logits, batch[self.model.label_key], batch["mask"]), logits

    def client_step(self, state: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[Any, TrainMetrics]:
        """One local step on a batch; padded examples (mask False) do not count. Returns the train metrics too."""
        (_, logits), grads = jax.value_and_grad(self.client_loss, has_aux=True)(state.params, batch, rng, broadcast)
        updates, opt_state = self.client_optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ClientState(params, opt_state), self.model.metrics(logits, batch[self.model.label_key], batch["mask"])

    def client_delta(self, state: Any, server_params: Params) -> Params:
        """The client's trained params minus the server's."""
        return jax.tree.map(jnp.subtract, state.params, server_params)

    def client_contribution(self, client: Any, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """What this client adds to the round's sums, and its new stored state.

        `weight` is the runner's weight of the client (read only: the runner
        multiplies `Contribution.weighted` by it); `prepass` is this client's
        own prepass sums; `rng` a key of (seed, round, client).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define client_contribution")

    # -- prepass (used when `uses_prepass`): a pass over each client's examples (each once) at the
    # broadcast model before local training. --

    def prepass_step(self, broadcast: Any, batch: Mapping[str, jax.Array]) -> Any:
        """Per-batch sums for the prepass (batch["mask"] marks the examples to count).

        Only called when `uses_prepass` is True; such algorithms must override it.
        """
        raise NotImplementedError(f"{type(self).__name__} sets uses_prepass but does not define prepass_step")

    def after_prepass(self, broadcast: Any, total: Any) -> Any:
        """The broadcast for local training, given the prepass sums over all clients."""
        return broadcast

    # -- what else the runner and the simulation read --

    def personal_model(self, stored: Any, params: Params = None) -> tuple[Params, Any]:
        """(personal params, whether the client has one) from stored states (leaves with any leading shape).

        `params` is the current global model (host arrays, no leading axis),
        for personal models defined relative to it (APFL's mix); Ditto's v_i
        ignores it. Only called when `has_personal_models`.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no personal models")

    def privacy_accounting(self) -> Any:
        """The DP mechanism of one round that the training loop's privacy ledger accounts, or None (not DP).

        An `fedstream.algorithms.aggregators.Accounting` (declared by a
        `GaussianNoise` aggregator); the Simulation creates, restores, records
        and saves the ledger.
        """
        return None

    def log_values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """A round's log values (metrics.jsonl, TensorBoard) from its summed `Contribution.metrics`.

        By default each metric is logged under its own name: its sum over the
        round's clients.
        """
        return {k: float(v) for k, v in metrics.items()}
