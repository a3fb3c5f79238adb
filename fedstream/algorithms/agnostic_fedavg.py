"""AgnosticFedAvg (Ro et al., 2021), "Communication-efficient agnostic federated
averaging" (arXiv 2104.02748), as FedJAX's `agnostic_fed_avg`.

Every example carries a domain id k in [0, K) (batch feature `domain_id`).
The server keeps domain weights lambda (on the simplex) and a window of the
last W rounds' per-domain example counts. One round:

    alpha_k = lambda_k / mean_{window}(N_k)                      # broadcast
    for each sampled client i:                                   # prepass at w (evaluation mode)
        L_i,k = sum_{z in D_i, dom(z) = k} l(w; z);  N_i,k = |{z in D_i : dom(z) = k}|
        beta_i = sum_k alpha_k N_i,k
    for each sampled client i (in parallel):
        w_i <- w
        for each local batch b:
            h_i(w_i; b) = sum_k alpha_k sum_{z in b, dom(z) = k} l(w_i; z) / beta_i
            w_i <- ClientOpt(w_i, grad h_i)
        Delta_i = w_i - w
    w <- ServerOpt(w, -sum_i beta_i Delta_i / sum_i beta_i)      # clients weighted by beta_i
    L_k = sum_i L_i,k / sum_i N_i,k                             # 0 where no example of k was seen
    lambda_k <- lambda_k exp(eta_lambda L_k) / sum_j lambda_j exp(eta_lambda L_j)   # 'eg'; 'none' keeps lambda
    window <- window[1:] + [sum_i N_i,k]

The per-example loss l is the model's (summed over scored targets for a
sequence model). The aggregation weight is beta_i by definition, so the
run's `aggregation` setting (examples or uniform) does not apply. The local
loss is a sum over the batch scaled by alpha / beta_i, as in FedJAX (not a
batch mean). Deviations from FedJAX: the prepass runs the model without a
dropout key and over each client's first-epoch (used) examples; no
regularizer. Examples with a domain id outside [0, K) count nowhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.base import Contribution, Params, RoundTotal, ServerState
from fedstream.algorithms.fedavg import FedAvg
from fedstream.models import TrainMetrics

DOMAIN_ALGORITHMS = ("eg", "none")


@flax.struct.dataclass
class AgnosticClient:
    """A client during local training: model, optimizer state and its scale beta_i."""

    params: Params
    opt_state: optax.OptState
    beta: jax.Array


def update_domain_weights(weights: jax.Array, domain_loss: jax.Array, learning_rate: float,
                          algorithm: str) -> jax.Array:
    """Exponentiated gradient ('eg') on the simplex, or unchanged ('none')."""
    if algorithm == "none":
        return weights
    new = jnp.maximum(weights * jnp.exp(learning_rate * domain_loss), 0.0)
    return new / jnp.sum(new)


@dataclasses.dataclass(frozen=True)
class AgnosticFedAvg(FedAvg):
    """AgnosticFedAvg; `ServerState.extra` holds `domain_weights` [K] and `domain_window` [W, K].

    Options:
      init_domain_weights: the initial domain weights lambda, one per domain K (on the simplex: >= 0, sum 1).
      domain_learning_rate: eta_lambda of the exponentiated-gradient step on the domain weights (0 = fixed).
      domain_algorithm: how the domain weights move: 'eg' (exponentiated gradient) or 'none'.
      domain_window_size: W, rounds of per-domain example counts averaged for alpha_k.
      init_domain_window: the initial per-domain counts in the window, one per domain (None = ones).
      domain_key: the dataset feature holding each example's domain id in [0, K).
    """

    init_domain_weights: Sequence[float] = (0.5, 0.5)
    domain_learning_rate: float = 0.0
    domain_algorithm: str = "eg"
    domain_window_size: int = 1
    init_domain_window: Sequence[float] | None = None  # default: ones
    domain_key: str = "domain_id"

    uses_prepass = True

    def __post_init__(self) -> None:
        weights = tuple(float(w) for w in self.init_domain_weights)
        window = tuple(float(w) for w in self.init_domain_window) if self.init_domain_window else (1.0,) * len(weights)
        if not weights or abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
            raise ValueError(f"init_domain_weights must be >= 0 and sum to 1, got {weights}")
        if len(window) != len(weights):
            raise ValueError(f"init_domain_window has {len(window)} entries for {len(weights)} domains")
        if self.domain_algorithm not in DOMAIN_ALGORITHMS:
            raise ValueError(f"domain_algorithm must be one of {DOMAIN_ALGORITHMS}, got {self.domain_algorithm!r}")
        if self.domain_window_size < 1:
            raise ValueError(f"domain_window_size must be >= 1, got {self.domain_window_size}")
        object.__setattr__(self, "init_domain_weights", weights)
        object.__setattr__(self, "init_domain_window", window)

    @property
    def num_domains(self) -> int:
        return len(self.init_domain_weights)

    @property
    def extra_features(self) -> tuple[str, ...]:
        """Batch features needed besides the model's input and label."""
        return (self.domain_key,)

    def init(self, rng: jax.Array) -> ServerState:
        """FedAvg's state plus the initial domain weights and window."""
        state = super().init(rng)
        window = jnp.tile(jnp.asarray(self.init_domain_window, jnp.float32)[None], (self.domain_window_size, 1))
        return state.replace(extra={"domain_weights": jnp.asarray(self.init_domain_weights, jnp.float32),
                                    "domain_window": window})

    def broadcast(self, state: ServerState) -> dict[str, Any]:
        """w and alpha = lambda / mean window counts."""
        alpha = state.extra["domain_weights"] / jnp.mean(state.extra["domain_window"], axis=0)
        return {"params": state.params, "alpha": alpha}

    def example_losses(self, params: Params, batch: Mapping[str, jax.Array],
                       rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Per-example losses [B] (zero where masked) and the logits."""
        logits = self.model.apply(params, batch[self.model.input_key], rng=rng)
        losses = self.model.example_scores(logits, batch[self.model.label_key])["loss"]
        return losses * batch["mask"].astype(losses.dtype), logits

    def prepass_step(self, broadcast: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-domain loss sums L_k and example counts N_k of the batch, at w."""
        if self.domain_key not in batch:
            raise KeyError(f"AgnosticFedAvg needs the batch feature {self.domain_key!r} (int, per example): build "
                           f"the CohortPipeline with the algorithm's extra_features {self.extra_features}; the batch "
                           f"has {sorted(batch)}")
        losses, _ = self.example_losses(broadcast["params"], batch, None)
        domains = batch[self.domain_key].astype(jnp.int32)
        counts = batch["mask"].astype(jnp.float32)
        return {"domain_loss": jax.ops.segment_sum(losses, domains, self.num_domains),
                "domain_num": jax.ops.segment_sum(counts, domains, self.num_domains)}

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> AgnosticClient:
        """w_i <- w; beta_i = sum_k alpha_k N_i,k."""
        params = broadcast["params"]
        beta = jnp.sum(broadcast["alpha"] * prepass["domain_num"])
        return AgnosticClient(params, self.client_optimizer.init(params), beta)

    def scaled_loss(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array, alpha: jax.Array,
                    beta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h_i(w_i; b) = sum_z alpha_dom(z) l(w_i; z) / beta_i, and the logits."""
        losses, logits = self.example_losses(params, batch, rng)
        scale = alpha[batch[self.domain_key].astype(jnp.int32)]
        in_range = (batch[self.domain_key] >= 0) & (batch[self.domain_key] < self.num_domains)
        total = jnp.sum(jnp.where(in_range, scale * losses, 0.0))
        return jnp.where(beta > 0, total / jnp.maximum(beta, 1e-30), 0.0), logits

    def client_step(self, state: AgnosticClient, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[AgnosticClient, TrainMetrics]:
        """w_i <- ClientOpt(w_i, grad h_i(w_i; b))."""
        (_, logits), grads = jax.value_and_grad(self.scaled_loss, has_aux=True)(
            state.params, batch, rng, broadcast["alpha"], state.beta)
        updates, opt_state = self.client_optimizer.update(grads, state.opt_state, state.params)
        metrics = self.model.metrics(logits, batch[self.model.label_key], batch["mask"])
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), metrics

    def client_contribution(self, client: AgnosticClient, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """Delta_i with the weight beta_i (the pipeline's weight is unused), and L_i,k and N_i,k summed."""
        delta = self.client_delta(client, broadcast["params"])
        return Contribution(weighted=delta, weight=client.beta,
                            summed={"domain_loss": prepass["domain_loss"], "domain_num": prepass["domain_num"]}), stored

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """ServerOpt on the beta-weighted mean delta; lambda by exponentiated gradient; window shifted."""
        new_state = super().server_update(state, total, rng)
        num = total.summed["domain_num"]
        mean_loss = jnp.where(num > 0, total.summed["domain_loss"] / jnp.maximum(num, 1e-30), 0.0)
        weights = update_domain_weights(state.extra["domain_weights"], mean_loss, self.domain_learning_rate,
                                        self.domain_algorithm)
        window = jnp.concatenate([state.extra["domain_window"][1:], num[None]], axis=0)
        return new_state.replace(extra={"domain_weights": weights, "domain_window": window})


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("agnostic_fedavg", AgnosticFedAvg,
                       "AgnosticFedAvg (Ro et al. 2021): per-domain weights by exponentiated gradient; needs the "
                       "domain_id feature (init_domain_weights, domain_learning_rate)")


_register()
