"""MimeLite (Karimireddy et al., 2021), as FedJAX's `mime_lite.mime_lite`.

Mime without the control variate: clients run the base optimizer B (the
configured client optimizer) with the server's B state s frozen; the server
moves x by the mean delta and updates s with the full-batch gradient at x.
One round:

    for each sampled client i (in parallel):
        y_i <- x
        for each local batch b:
            y_i <- y_i + B.update(grad f(y_i; b), s, y_i)      # s frozen
        Delta_i = y_i - x
        Delta_i <- Delta_i * min(1, C / ||Delta_i||)           # only with client_delta_clip_norm C > 0
    x' = x + eta_s * sum_i n_i Delta_i / sum_i n_i              # eta_s = server_learning_rate
    c  = (1/|D|) sum_{z in D} grad f(x; z)                      # full-batch gradient at the round's x
    s <- B.state_after(c, s)

Order: FedJAX computes c after local training, at the round-start x; here
it comes from the runner's prepass, before training, at the same x. Both
give the same c; clients do not use it. With B = SGD without momentum (empty
state), MimeLite is FedAvg with server SGD(eta_s). Deviations as for Mime
(evaluation-mode prepass, first-epoch examples).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fedstream.algorithms.base import ClientState, Contribution
from fedstream.algorithms.mime import Mime, prepass_sums


def clip_by_global_norm(tree: Any, max_norm: float) -> Any:
    """tree * min(1, max_norm / ||tree||) (FedJAX's tree_clip_by_global_norm)."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda leaf: leaf * scale.astype(leaf.dtype), tree)


@dataclasses.dataclass(frozen=True)
class MimeLite(Mime):
    """MimeLite: frozen base-optimizer state, no control variate; optional per-client delta clipping.

    Options:
      server_learning_rate: eta_s, the server's plain SGD step on the mean client delta (1 = apply it as is).
      client_delta_clip_norm: C, each client delta is scaled to L2 norm at most C (0 = no clipping).
    """

    client_delta_clip_norm: float = 0.0  # 0 = no clipping

    control_variate = False

    def client_contribution(self, client: ClientState, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """Delta_i (clipped to norm C when C > 0; weighted by the runner), and the client's prepass gradient sums."""
        delta = self.client_delta(client, broadcast["params"])
        if self.client_delta_clip_norm > 0:
            delta = clip_by_global_norm(delta, self.client_delta_clip_norm)
        return Contribution(weighted=delta, summed=prepass_sums(prepass)), stored


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("mimelite", MimeLite, "MimeLite (Karimireddy et al. 2021): frozen server state of the client "
                                             "optimizer, no control variate (server_learning_rate)")


_register()
