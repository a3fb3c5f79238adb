"""APFL (Deng, Kamani and Mahdavi, 2020), "Adaptive personalized federated learning".

Each client i keeps a personal model v_i and a mixing weight alpha_i in
[0, 1] (both in the client-state store); its personalized model is the mix

    vbar_i = alpha_i v_i + (1 - alpha_i) w_i

of the personal model and its copy w_i of the global model. One round (the
paper's Algorithm 1 with the adaptive alpha_i of its Section 3, one
synchronization per round; all three updates of a step read the values
before the step, on the same minibatch):

    for each sampled client i (in parallel):
        w_i <- w^t
        v_i, alpha_i <- stored ones, or w^t and alpha_0 the first time client i is sampled
        for each local batch b:                                           # client_step
            g    = grad f_i(vbar_i; b),  vbar_i = alpha_i v_i + (1 - alpha_i) w_i
            w_i <- ClientOpt(w_i, grad f_i(w_i; b))                           # FedAvg's local step
            v_i <- PersonalOpt(v_i, grad_v f_i(vbar_i; b) = alpha_i g)
            alpha_i <- clip(alpha_i - eta_alpha <v_i - w_i, g>, 0, 1)         # grad_alpha f_i(vbar_i; b)
        Delta_i = w_i - w^t;  store v_i, alpha_i
    w^{t+1} = ServerOpt(w^t, -sum_i p_i Delta_i / sum_i p_i)

grad_v and grad_alpha are the chain rule through the mix (autodiff of
f_i(alpha v + (1 - alpha) w) in v and alpha); clip is the projection onto
[0, 1]. With SGD at the client learning rate eta for w_i, v_i and alpha_i
this is the paper's single step size eta_t. PersonalOpt is the client
optimizer (fresh state each round), or SGD with `personal_learning_rate`;
eta_alpha is `alpha_learning_rate`, or the client learning rate. With
`adaptive_alpha` False, alpha_i stays alpha_0 (the paper's fixed-alpha APFL).
The paper averages uniformly (config aggregation='uniform'); 'example'
weights by examples.

FedJAX's `apfl` differs in two ways: it learns one coefficient per
parameter leaf (here one alpha_i per client, as in the paper) and steps v_i
along g rather than alpha_i g.

Stored per client: {"v": v_i, "alpha": alpha_i, "initialized": 1}; the
store's zeros for a client never trained read as "start from w^t and
alpha_0". A client whose v_i or alpha_i becomes non-finite sends a
non-finite update, so the round runner leaves it out (keeping its old
state). Personalized evaluation scores alpha_i v_i + (1 - alpha_i) w with w
the current global model (`personal_model`); a client never trained is
scored on w.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.base import Contribution, Params
from fedstream.algorithms.fedavg import FedAvg
from fedstream.models import TrainMetrics


@flax.struct.dataclass
class APFLClient:
    """A client during local training: w_i, v_i with their optimizer states, and alpha_i (float32 scalar)."""

    params: Params
    opt_state: optax.OptState
    personal: Params
    personal_opt_state: optax.OptState
    alpha: jax.Array


def mix(alpha: Any, v: Params, w: Params) -> Params:
    """alpha v + (1 - alpha) w, leaf by leaf; `alpha` has the leading shape of v's leaves (w may lack it).

    Works on NumPy and JAX arrays; keeps v's dtype.
    """
    def one(v_leaf: Any, w_leaf: Any) -> Any:
        a = alpha.reshape(alpha.shape + (1,) * (v_leaf.ndim - alpha.ndim)).astype(v_leaf.dtype)
        return a * v_leaf + (1 - a) * w_leaf.astype(v_leaf.dtype)

    return jax.tree.map(one, v, w)


@dataclasses.dataclass(frozen=True)
class APFL(FedAvg):
    """APFL: FedAvg for w plus per-client personal models v_i mixed with it by a learned alpha_i in [0, 1].

    Options:
      alpha_init: alpha_0 in [0, 1], the mixing weight of a client's first round (and of every round when
        adaptive_alpha is False).
      adaptive_alpha: whether alpha_i is learned by projected gradient steps on the mixed model's loss.
      alpha_learning_rate: eta_alpha of the alpha_i steps (0 = the client learning rate, the paper's single eta).
      personal_learning_rate: eta_p of plain SGD for the personal models v_i (0 = the client optimizer).
    """

    alpha_init: float = 0.5
    adaptive_alpha: bool = True
    alpha_learning_rate: float = 0.0  # 0 = client_learning_rate
    personal_learning_rate: float = 0.0  # 0 = the client optimizer for v_i too
    client_learning_rate: float = 0.0  # set by the train loop; the default eta_alpha

    has_client_state = True
    has_personal_models = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha_init <= 1.0:
            raise ValueError(f"alpha_init must be in [0, 1], got {self.alpha_init}")
        if not self.alpha_learning_rate >= 0:
            raise ValueError(f"alpha_learning_rate must be >= 0, got {self.alpha_learning_rate}")
        if not self.personal_learning_rate >= 0:
            raise ValueError(f"personal_learning_rate must be >= 0, got {self.personal_learning_rate}")
        if self.adaptive_alpha and self.alpha_step_size <= 0:
            raise ValueError("APFL with adaptive_alpha needs a learning rate for alpha: set "
                             "algorithm.options.alpha_learning_rate (or client_learning_rate in Python)")

    @property
    def alpha_step_size(self) -> float:
        """eta_alpha: `alpha_learning_rate`, or the client learning rate."""
        return float(self.alpha_learning_rate or self.client_learning_rate)

    @functools.cached_property
    def personal_optimizer(self) -> optax.GradientTransformation:
        """PersonalOpt: SGD(personal_learning_rate) if set, else the client optimizer."""
        return optax.sgd(self.personal_learning_rate) if self.personal_learning_rate > 0 else self.client_optimizer

    def client_state_template(self, params: Params) -> dict[str, Any]:
        """{"v": v_i shaped like the model, "alpha": float32 alpha_i, "initialized": int32 (0 = never trained)}."""
        return {"v": jax.tree.map(jnp.zeros_like, params), "alpha": jnp.zeros((), jnp.float32),
                "initialized": jnp.zeros((), jnp.int32)}

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> APFLClient:
        """w_i <- w^t; v_i, alpha_i <- the stored ones, or w^t and alpha_0 if the client has none yet."""
        w = broadcast["params"]
        known = stored["initialized"] > 0
        v = jax.tree.map(lambda s, g: jnp.where(known, s, g), stored["v"], w)
        alpha = jnp.where(known, stored["alpha"], jnp.float32(self.alpha_init)).astype(jnp.float32)
        return APFLClient(w, self.client_optimizer.init(w), v, self.personal_optimizer.init(v), alpha)

    def mixed_loss(self, v: Params, alpha: jax.Array, w: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                   broadcast: Any) -> jax.Array:
        """f_i(alpha v + (1 - alpha) w; b), the loss of the personalized model on one batch."""
        loss, _ = FedAvg.client_loss(self, mix(alpha, v, w), batch, rng, broadcast)
        return loss

    def client_step(self, state: APFLClient, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[APFLClient, TrainMetrics]:
        """One FedAvg step of w_i, one step of v_i and one projected step of alpha_i on the mix (metrics: of w_i)."""
        (_, logits), grads = jax.value_and_grad(self.client_loss, has_aux=True)(state.params, batch, rng, broadcast)
        grad_v, grad_alpha = jax.grad(self.mixed_loss, argnums=(0, 1))(
            state.personal, state.alpha, state.params, batch, jax.random.fold_in(rng, 1), broadcast)
        updates, opt_state = self.client_optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        updates, personal_opt_state = self.personal_optimizer.update(grad_v, state.personal_opt_state,
                                                                     state.personal)
        personal = optax.apply_updates(state.personal, updates)
        alpha = state.alpha
        if self.adaptive_alpha:
            alpha = jnp.clip(alpha - jnp.float32(self.alpha_step_size) * grad_alpha, 0.0, 1.0)
        metrics = self.model.metrics(logits, batch[self.model.label_key], batch["mask"])
        return APFLClient(params, opt_state, personal, personal_opt_state, alpha), metrics

    def client_contribution(self, client: APFLClient, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """FedAvg's Delta_i (made non-finite if v_i or alpha_i is), alpha_i as a metric, the new stored state."""
        contribution, _ = super().client_contribution(client, broadcast, weight, stored, prepass, rng)
        leaves = jax.tree.leaves(client.personal) + [client.alpha]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
        delta = jax.tree.map(lambda d: jnp.where(finite, d, jnp.nan), contribution.weighted)
        metrics = {"apfl_alpha": client.alpha, "apfl_clients": jnp.ones((), jnp.float32)}
        stored = {"v": client.personal, "alpha": client.alpha, "initialized": jnp.ones((), jnp.int32)}
        return contribution.replace(weighted=delta, metrics=metrics), stored

    def log_values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The round's mean alpha_i over its clients (`apfl_alpha_mean`), and any other metric as is."""
        values = {k: float(v) for k, v in metrics.items() if k not in ("apfl_alpha", "apfl_clients")}
        clients = float(metrics.get("apfl_clients", 0.0))
        if clients > 0:
            values["apfl_alpha_mean"] = float(metrics["apfl_alpha"]) / clients
        return values

    def personal_model(self, stored: Any, params: Params = None) -> tuple[Params, Any]:
        """(alpha_i v_i + (1 - alpha_i) w, whether client i has been trained) from stored states (leaves with any
        leading shape; NumPy or JAX) and the global model `params` w."""
        if params is None:
            raise ValueError("APFL's personal model mixes v_i with the global model: pass params")
        return mix(stored["alpha"], stored["v"], params), stored["initialized"] > 0


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("apfl", APFL,
                       "APFL (Deng et al. 2020): FedAvg global model plus personal models v_i mixed by a learned "
                       "alpha_i in the client-state store (alpha_init, adaptive_alpha, alpha_learning_rate, "
                       "personal_learning_rate)")


_register()
