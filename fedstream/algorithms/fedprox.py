"""FedProx (Li et al., 2020), "Federated optimization in heterogeneous networks".

FedAvg whose clients minimise a proximally regularised objective. One round:

    for each sampled client i (in parallel):
        w_i <- w
        for each local batch b:
            h_i(w_i; w) = F_i(w_i; b) + mu/2 * ||w_i - w||^2        # client_loss
            w_i <- ClientOpt(w_i, grad h_i(w_i; w))
        Delta_i = w_i - w
    w <- ServerOpt(w, -sum_i p_i Delta_i / sum_i p_i)

F_i(w_i; b) is the mean loss over the batch's scored targets, so the term
is added once per step, as in FedJAX's `fed_prox` (mean over examples of
loss + mu/2 ||.||^2). mu = 0 is FedAvg (option `proximal_weight`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from fedstream.algorithms.fedavg import FedAvg, Params, squared_distance


@dataclasses.dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg with the proximal term mu/2 ||w_i - w||^2 (mu = `proximal_weight`) in the client objective.

    Options:
      proximal_weight: mu >= 0, the weight of the proximal term mu/2 ||w_i - w||^2 (0 = FedAvg).
    """

    proximal_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.proximal_weight < 0:
            raise ValueError(f"proximal_weight must be >= 0, got {self.proximal_weight}")

    def client_loss(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any) -> tuple[jax.Array, jax.Array]:
        """h_i(w_i; w) = F_i(w_i; b) + mu/2 ||w_i - w||^2, and the logits."""
        loss, logits = super().client_loss(params, batch, rng, broadcast)
        proximal = 0.5 * self.proximal_weight * squared_distance(params, broadcast["params"])
        return loss + proximal, logits


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("fedprox", FedProx,
                       "FedProx (Li et al. 2020): FedAvg plus mu/2 ||w - w_server||^2 on clients (proximal_weight)")


_register()
