"""FedBuff (Nguyen et al., AISTATS 2022), "Federated Learning with Buffered Asynchronous Aggregation".

`concurrency` clients train at once, each from the server model current when
it started; the server steps after every K = `clients_per_round` updates it
receives (the schedule on the simulated clock:
`fedstream.data.async_schedule.AsyncSchedule`). One server step t, in the
paper's notation, over the K updates that arrived for it:

    for each arriving client i (started from version v_i, staleness tau_i = t - v_i):
        w_i <- w^(v_i)                                   # client_broadcast + client_init
        for each local batch b:  w_i <- ClientOpt(w_i, grad l(w_i; b))
        Delta_i = w_i - w^(v_i)
    Delta = sum_i p_i s(tau_i) Delta_i / sum_i p_i       # s(tau) = (1 + tau)^(-a), a = 1/2: 1/sqrt(1 + tau)
    w^(t+1) <- ServerOpt(w^(t), -Delta)                  # server_update

p_i = 1 under `aggregation='uniform'` gives the paper's sum / K; the
example weights (the default) weight by the client's examples. The K
arrivals of a step are trained together as one packed, sharded round: the
server keeps the last `max_staleness + 1` model versions stacked on the
device (`ServerState.extra["versions"]`, a ring indexed by version mod
V), and each client reads its own from its `slot_version`. An update staler
than `max_staleness` is dropped by the schedule and counted
(`stale_dropped`); the paper has no such cap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from fedstream.algorithms.base import Algorithm, ClientState, Contribution, RoundTotal, ServerState


def staleness_weight(staleness: jax.Array, exponent: float) -> jax.Array:
    """s(tau) = (1 + tau)^(-exponent): the paper's polynomial staleness scaling (exponent 1/2)."""
    return jnp.power(1.0 + staleness.astype(jnp.float32), -jnp.float32(exponent))


@dataclasses.dataclass(frozen=True)
class FedBuff(Algorithm):
    """FedBuff: buffered asynchronous aggregation with staleness-scaled deltas and a server optimizer.

    Options:
      concurrency: clients training at the same time (C); the server steps after every
        clients_per_round (K) updates.
      max_staleness: updates staler than this many server steps are dropped (and counted); the server keeps
        max_staleness + 1 model versions on the device.
      staleness_exponent: a in the staleness scaling s(tau) = (1 + tau)^(-a); 0.5 is the paper's 1/sqrt(1 + tau),
        0 weights every update alike.
    """

    concurrency: int = 100
    max_staleness: int = 20
    staleness_exponent: float = 0.5

    is_asynchronous: ClassVar[bool] = True
    per_client_broadcast: ClassVar[bool] = True
    updates_on_empty_rounds: ClassVar[bool] = True  # a step of empty clients still enters its version in the ring
    slot_features: ClassVar[tuple[str, ...]] = ("slot_version",)

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_staleness"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "concurrency" else 0):
                raise ValueError(f"config key 'algorithm.options.{name}' must be an integer >= "
                                 f"{1 if name == 'concurrency' else 0}, got {value!r}")
        if not self.staleness_exponent >= 0:
            raise ValueError(f"config key 'algorithm.options.staleness_exponent' must be >= 0, got "
                             f"{self.staleness_exponent!r}")

    @property
    def num_versions(self) -> int:
        """V: model versions kept on the device (the ring of `ServerState.extra['versions']`)."""
        return self.max_staleness + 1

    def init(self, rng: jax.Array) -> ServerState:
        """The initial model, its optimizer state, and the ring of versions (every slot the initial model)."""
        state = super().init(rng)
        ring = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_versions, *a.shape)), state.params)
        return state.replace(extra={"versions": ring})

    def broadcast(self, state: ServerState) -> Any:
        """The ring of recent versions and the current version number (= server steps done)."""
        return {"versions": state.extra["versions"], "version": state.round}

    def client_broadcast(self, broadcast: Any, slot: Mapping[str, jax.Array]) -> Any:
        """The model the client started from, w^(v_i), and its staleness t - v_i."""
        started = slot["slot_version"]
        params = jax.tree.map(lambda ring: jax.lax.dynamic_index_in_dim(ring, started % self.num_versions, 0, False),
                              broadcast["versions"])
        return {"params": params, "staleness": broadcast["version"] - started}

    def client_contribution(self, client: ClientState, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """s(tau_i) Delta_i with Delta_i = w_i - w^(v_i) (the runner multiplies it by p_i)."""
        scale = staleness_weight(broadcast["staleness"], self.staleness_exponent)
        delta = self.client_delta(client, broadcast["params"])
        return Contribution(weighted=jax.tree.map(lambda d: scale * d, delta)), stored

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """ServerOpt on minus the weighted mean of the scaled deltas; the new model enters the ring."""
        def step() -> ServerState:
            return self.apply_server_optimizer(state, jax.tree.map(lambda d: d / total.weight, total.weighted))

        new = jax.lax.cond(total.weight > 0, step, lambda: state.replace(round=state.round + 1))
        slot = new.round % self.num_versions
        ring = jax.tree.map(lambda r, p: jax.lax.dynamic_update_index_in_dim(r, p.astype(r.dtype), slot, 0),
                            state.extra["versions"], new.params)
        return new.replace(extra={"versions": ring})


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("fedbuff", FedBuff,
                       "FedBuff (Nguyen et al. 2022): asynchronous clients on the simulated clock, a server step "
                       "per K arrivals with 1/sqrt(1+staleness)-scaled deltas")


_register()
