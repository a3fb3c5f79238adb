"""FedNova (Wang et al., 2020), "Tackling the objective inconsistency problem in
heterogeneous federated optimization": normalized averaging.

Client i runs tau_i local steps (heterogeneous: tau_i = its step count).
Its update is a linear combination of its stochastic gradients,
Delta_i = -eta * G_i a_i, with G_i = [g_i(w_i^0), ..., g_i(w_i^{tau_i - 1})]
and a_i the paper's coefficient vector. One round:

    for each sampled client i (in parallel):
        w_i <- w;  run tau_i steps of ClientOpt                  # client_step
        Delta_i = w_i - w
        d_i = Delta_i / ||a_i||_1                                  # normalized update
    p_i = n_i / sum_j n_j                                          # the run's client weights
    tau_eff = sum_i p_i ||a_i||_1
    w <- ServerOpt(w, -tau_eff * sum_i p_i d_i)                   # pseudo-gradient

||a_i||_1 for the paper's client optimizers:
    vanilla SGD:                a_i = [1, ..., 1],  ||a_i||_1 = tau_i
    SGD with momentum rho       ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)
    (v <- rho v + g; w <- w - eta v, the optax/PyTorch heavy-ball form)

Rather than a formula per optimizer, fedstream measures ||a_i||_1 directly:
each client also runs its ClientOpt on a scalar "shadow" parameter that sees
the gradient 1 at every step. For any client optimizer whose update is a
linear combination of past gradients (SGD, momentum, Nesterov, learning-rate
schedules), the shadow ends at -eta * ||a_i||_1, and dividing by the
displacement of one fresh step (-eta) gives ||a_i||_1: tau_i for SGD and
the closed form above for momentum (tests check both). Where that first
step is not -eta (Nesterov: -eta (1 + rho)) every ||a_i||_1 is off by the
same factor, which cancels in tau_eff * sum_i p_i d_i. Adaptive client
optimizers (Adam, ...) fall outside the paper's analysis. The paper's
FedProx variant (a_i with the (1 - eta mu) contraction) is not included.
With ServerOpt = SGD(1) this is the paper's update; a server optimizer
with its own state treats tau_eff sum_i p_i d_i as FedOpt treats the mean delta.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.base import Algorithm, ClientState, Contribution, Params, RoundTotal, ServerState
from fedstream.models import TrainMetrics


@flax.struct.dataclass
class NovaClient:
    """A client during local training: model, optimizer state, and the shadow scalar measuring ||a_i||_1."""

    params: Params
    opt_state: optax.OptState
    shadow: jax.Array  # float32 scalar: -eta * ||a_i||_1 so far
    shadow_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class FedNova(Algorithm):
    """FedNova: each client's delta is divided by ||a_i||_1 and the mean rescaled by tau_eff."""

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> NovaClient:
        """w_i <- w, a fresh client optimizer, shadow at 0."""
        base = super().client_init(broadcast, stored, prepass)
        shadow = jnp.zeros((), jnp.float32)
        return NovaClient(base.params, base.opt_state, shadow, self.client_optimizer.init(shadow))

    def client_step(self, state: NovaClient, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[NovaClient, TrainMetrics]:
        """One ClientOpt step on the model, and one on the shadow with gradient 1."""
        base, metrics = super().client_step(ClientState(state.params, state.opt_state), batch, rng, broadcast)
        updates, shadow_state = self.client_optimizer.update(jnp.ones((), jnp.float32), state.shadow_state,
                                                             state.shadow)
        return state.replace(params=base.params, opt_state=base.opt_state, shadow=state.shadow + updates,
                             shadow_state=shadow_state), metrics

    def a_norm(self, client: NovaClient) -> jax.Array:
        """||a_i||_1: the shadow's displacement over that of one fresh step (-eta)."""
        zero = jnp.zeros((), jnp.float32)
        unit, _ = self.client_optimizer.update(jnp.ones((), jnp.float32), self.client_optimizer.init(zero), zero)
        return client.shadow / unit

    def client_contribution(self, client: NovaClient, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """d_i = Delta_i / ||a_i||_1 and ||a_i||_1, both weighted by p_i (unnormalised: the runner's weight)."""
        a = self.a_norm(client)
        delta = self.client_delta(client, broadcast["params"])
        return Contribution(weighted={"delta": jax.tree.map(lambda d: d / a, delta), "a_norm": a}), stored

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """w <- ServerOpt(w, -tau_eff * sum_i p_i d_i)."""
        tau_eff = total.weighted["a_norm"] / total.weight
        update = jax.tree.map(lambda d: tau_eff * d / total.weight, total.weighted["delta"])
        return self.apply_server_optimizer(state, update)


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("fednova", FedNova,
                       "FedNova (Wang et al. 2020): deltas normalized by ||a_i||_1 (local steps), rescaled by tau_eff")


_register()
