"""HypCluster (Mansour et al., 2020), "Three approaches for personalization with
applications to federated learning" (arXiv 2002.10619), as FedJAX's `hyp_cluster`.

The server keeps k cluster models h_1..h_k (stacked on a leading axis of
`ServerState.params`) and one server-optimizer state per cluster. One round:

    for each sampled client i:                                      # prepass at every h_j
        L_i,j = sum_{z in D_i} l(h_j; z)
        c_i = argmin_j L_i,j                                        # "M-step": lowest average loss
    for each sampled client i (in parallel):                        # "E-step"
        w_i <- h_{c_i};  run ClientOpt on its batches
        Delta_i = w_i - h_{c_i}
    for each cluster j with sum_{i: c_i = j} p_i > 0:
        h_j <- ServerOpt_j(h_j, -sum_{i: c_i = j} p_i Delta_i / sum_{i: c_i = j} p_i)
    (a cluster no client chose keeps its model and optimizer state)

Ties go to the lowest cluster index (argmin). With k = 1 this is FedAvg.
Initialization: `init` draws k independent model inits (FedJAX's
`random_init`); `kmeans_init` is FedJAX's k-means++-style
`ModelKMeansInitializer` / `kmeans_init`, and `init_from` builds the server
state from any list of cluster models. Deviations: the assignment loss is
evaluated without a dropout key and over each client's first-epoch (used)
examples; no regularizer.

Evaluating a HypCluster model needs each test client's cluster (FedJAX's
`HypClusterEvaluator` assigns it by the client's loss on its train data);
`cluster_params(state, j)` gives one cluster's model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedstream.algorithms.base import Algorithm, ClientState, Contribution, Params, RoundTotal, ServerState
from fedstream.algorithms.fedavg import FedAvg
from fedstream.models import Model, TrainMetrics


@flax.struct.dataclass
class ClusterClient:
    """A client during local training: model, optimizer state, and the cluster it trains."""

    params: Params
    opt_state: optax.OptState
    cluster: jax.Array  # int32 scalar


def stack(trees: Sequence[Params]) -> Params:
    """k pytrees -> one pytree with a leading axis of k."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def cluster_params(state: ServerState, j: int) -> Params:
    """The model of cluster j."""
    return jax.tree.map(lambda p: p[j], state.params)


def _per_cluster(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    """`mask` [k] reshaped to broadcast against a stacked leaf [k, ...]."""
    return mask.reshape((-1,) + (1,) * (leaf.ndim - 1))


@dataclasses.dataclass(frozen=True)
class HypCluster(Algorithm):
    """HypCluster with `num_clusters` models; clients train the one with the lowest loss on their data.

    Options:
      num_clusters: k >= 1, the number of cluster models (1 = FedAvg).
    """

    num_clusters: int = 2

    uses_prepass = True
    is_clustered = True

    def __post_init__(self) -> None:
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {self.num_clusters}")

    def init(self, rng: jax.Array) -> ServerState:
        """k independent model inits (keys split from `rng`), one server-optimizer state each."""
        keys = jax.random.split(rng, self.num_clusters)
        return self.init_from([self.model.init(key) for key in keys])

    def init_from(self, clusters: Sequence[Params]) -> ServerState:
        """The server state for given cluster models (e.g. from `kmeans_init`)."""
        if len(clusters) != self.num_clusters:
            raise ValueError(f"{len(clusters)} cluster models given for num_clusters={self.num_clusters}")
        params = stack(clusters)
        return ServerState(params, jax.vmap(self.server_optimizer.init)(params), jnp.zeros((), jnp.int32))

    def prepass_step(self, broadcast: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """L_j: the batch's summed loss under every cluster model, [k]."""
        weights = batch["mask"].astype(jnp.float32)

        def loss_sum(params: Params) -> jax.Array:
            logits = self.model.apply(params, batch[self.model.input_key])
            return jnp.sum(self.model.example_scores(logits, batch[self.model.label_key])["loss"] * weights)

        return {"loss": jax.vmap(loss_sum)(broadcast["params"])}

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> ClusterClient:
        """c_i = argmin_j L_i,j; w_i <- h_{c_i} with a fresh client optimizer."""
        cluster = jnp.argmin(prepass["loss"]).astype(jnp.int32)
        params = jax.tree.map(lambda p: p[cluster], broadcast["params"])
        return ClusterClient(params, self.client_optimizer.init(params), cluster)

    def client_step(self, state: ClusterClient, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[ClusterClient, TrainMetrics]:
        """One ClientOpt step, as FedAvg's."""
        base, metrics = super().client_step(ClientState(state.params, state.opt_state), batch, rng, broadcast)
        return state.replace(params=base.params, opt_state=base.opt_state), metrics

    def client_contribution(self, client: ClusterClient, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """Delta_i in row c_i of a [k, ...] stack and 1 in row c_i of the cluster weights, both weighted by p_i."""
        onehot = (jnp.arange(self.num_clusters) == client.cluster).astype(jnp.float32)
        start = jax.tree.map(lambda p: p[client.cluster], broadcast["params"])
        delta = jax.tree.map(jnp.subtract, client.params, start)
        stacked = jax.tree.map(lambda d: _per_cluster(onehot, d[None]) * d[None], delta)
        return Contribution(weighted={"delta": stacked, "cluster_weight": onehot}), stored

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """Per cluster: ServerOpt on minus its weighted mean delta; clusters nobody chose stay as they are."""
        cluster_weight = total.weighted["cluster_weight"]
        chosen = cluster_weight > 0
        denominator = jnp.where(chosen, cluster_weight, 1.0)
        mean_delta = jax.tree.map(lambda d: d / _per_cluster(denominator, d), total.weighted["delta"])

        def step(params: Params, opt_state: optax.OptState, delta: Params) -> tuple[Params, optax.OptState]:
            updates, new_opt = self.server_optimizer.update(jax.tree.map(jnp.negative, delta), opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        new_params, new_opt = jax.vmap(step)(state.params, state.opt_state, mean_delta)
        keep = lambda new, old: jnp.where(_per_cluster(chosen, new), new, old)  # noqa: E731
        return state.replace(params=jax.tree.map(keep, new_params, state.params),
                             opt_state=jax.tree.map(keep, new_opt, state.opt_state), round=state.round + 1)


def combine_cluster_evals(train: Sequence[Mapping[str, np.ndarray]],
                          test: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-client evaluation of HypCluster, as FedJAX's `HypClusterEvaluator.evaluate_clients`.

    `train[j]` and `test[j]` are cluster j's per-client sums (`loss`,
    `loss_count`, ... as `fedstream.training.rounds.build_eval` returns them)
    on the train and test data of the same clients, in the same order. Each
    client takes the cluster of lowest mean train loss (ties: lowest index;
    no train data: cluster 0) and reports that cluster's test sums.
    Returns (the combined per-client sums, each client's cluster).
    """
    losses = np.stack([np.asarray(t["loss"], np.float64) / np.maximum(np.asarray(t["loss_count"], np.float64), 1.0)
                       for t in train])
    assignment = np.argmin(losses, axis=0)
    rows = np.arange(assignment.size)
    combined = {key: np.stack([np.asarray(t[key]) for t in test])[assignment, rows] for key in test[0]}
    return combined, assignment


def _client_batches(data: Mapping[str, np.ndarray], batch_size: int, epochs: int,
                    rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """A client's examples shuffled per epoch, in fixed-size batches with a mask."""
    n = len(next(iter(data.values())))
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)]) if n else np.zeros(0, np.int64)
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        take = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
        batch = {k: np.asarray(v)[take] for k, v in data.items()}
        batch["mask"] = np.arange(batch_size) < len(idx)
        batches.append(batch)
    return batches


def kmeans_init(model: Model, client_optimizer: optax.GradientTransformation,
                clients: Sequence[Mapping[str, np.ndarray]], num_clusters: int, rng: jax.Array,
                batch_size: int, epochs: int = 1, seed: int = 0) -> list[Params]:
    """k cluster models by FedJAX's k-means++ variant (`ModelKMeansInitializer.cluster_params`).

        w0 = model.init(init_key)
        w_i = ClientOpt training of every client from w0 (epochs over its examples, batch_size)
        centers = [w_r] for a client r drawn uniformly (center_key)
        best_i = +inf
        repeat k - 1 times:
            best_i <- min(best_i, mean loss of client i under the newest center)
            centers += [w_m],  m = argmax_i best_i        # the client worst served so far

    `clients` are dicts of arrays holding the model's input and label
    features; `seed` drives the per-epoch shuffles. Returns the k models
    (pass them to `HypCluster.init_from`).
    """
    if num_clusters < 1 or not clients:
        raise ValueError("kmeans_init needs num_clusters >= 1 and at least one client")
    init_key, center_key = jax.random.split(rng)
    init_params = model.init(init_key)
    first = int(jax.random.choice(center_key, len(clients)))
    trainer = FedAvg(model, client_optimizer, optax.sgd(1.0))

    @jax.jit
    def train_step(state: ClientState, batch: Mapping[str, jax.Array], key: jax.Array) -> ClientState:
        return trainer.client_step(state, batch, key)[0]

    @jax.jit
    def loss_and_count(params: Params, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits = model.apply(params, batch[model.input_key])
        scores = model.example_scores(logits, batch[model.label_key])
        weights = batch["mask"].astype(jnp.float32)
        return jnp.sum(scores["loss"] * weights), jnp.sum(scores["loss_count"] * weights)

    features = (model.input_key, model.label_key)
    shuffle = np.random.default_rng(seed)
    trained = []
    for index, data in enumerate(clients):
        state = trainer.client_init({"params": init_params})
        for step, batch in enumerate(_client_batches({k: data[k] for k in features}, batch_size, epochs, shuffle)):
            state = train_step(state, batch, jax.random.fold_in(jax.random.fold_in(init_key, index), step))
        trained.append(state.params)

    def mean_loss(params: Params, data: Mapping[str, np.ndarray]) -> float:
        sums = [loss_and_count(params, b) for b in _client_batches({k: data[k] for k in features}, batch_size, 1,
                                                                   np.random.default_rng(0))]
        total, count = (float(sum(s[i] for s in sums)) for i in (0, 1))
        return total / count if count > 0 else 0.0  # an empty client is never the worst served

    centers = [trained[first]]
    best = np.full(len(clients), np.inf)
    for _ in range(1, num_clusters):
        best = np.minimum(best, [mean_loss(centers[-1], data) for data in clients])
        centers.append(trained[int(np.argmax(best))])
    return centers


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("hyp_cluster", HypCluster,
                       "HypCluster (Mansour et al. 2020): k cluster models, clients train their lowest-loss one "
                       "(num_clusters)")


_register()
