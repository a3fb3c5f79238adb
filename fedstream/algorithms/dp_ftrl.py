"""DP-FTRL: private training without sampling (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, ICML 2021).

"Practical and Private (Deep) Learning without Sampling or Shuffling". The
server runs follow-the-regularized-leader with momentum (their DP-FTRLM) on
the clipped, summed client updates, and privatizes the *prefix sums* of
those sums by binary tree aggregation, so that privacy rests on each client
taking part at most once per epoch (in any order: fedstream's sampling
'epochs'), not on Poisson sampling. `dp_ftrl` builds the chain

    Aggregated(FTRL(...), [Clip(C), TreeNoise(z, D, restart_every=k)])

(`fedstream.algorithms.aggregators`). Round t of a tree (t = 1..k; the tree
restarts every k rounds, by default every epoch), with w the server model:

    client i:  Delta_i = w_i - w after local training;  sends clip_C(Delta_i), weight 1   # Clip
    server:    S_t  = sum_i clip_C(Delta_i)                                             # the round's sum
               P_t  = P_{t-1} + S_t                  (P_0 = 0)                          # TreeNoise
               N_t  = P_t + z C sum_{nodes covering leaves 1..t} xi_node,  xi ~ N(0, I)
               m_t  = beta m_{t-1} + N_t / D         (m_0 = 0)                          # FTRL (server_update)
               w_t  = w_0 + eta m_t                  (nesterov: w_0 + eta (beta m_t + N_t / D))

The paper writes FTRL on gradients, w_t = w_0 - eta m_t with m the momentum
of the noisy gradient prefix sums; a client's delta is minus its
pseudo-gradient, so on deltas the sign flips and the equations above are
theirs (TFF's DPFTRLMServerOptimizer, fed minus the mean delta, computes the
same).

w_0 is the model at the tree's first round; at a restart P, m and the tree
start afresh and w_0 becomes the current model (as the paper's restart and
TFF's `restart_dp_tree`). Without noise and momentum this is FedAvg with
server SGD on the mean of the clipped deltas (w_t = w_0 + eta sum_s g_s / D).
The tree node of level l and index j covers leaves [j 2^l + 1, (j + 1) 2^l]
of its tree; the prefix 1..t uses, for each bit l of t, the node (l,
(t >> l) - 1). Each node's noise is drawn from fold_in(fold_in(fold_in(key,
tree), l), j) of the run's tree key, so the server carries only O(1)
state besides P and m (the key; t comes from the round), a resumed run
draws the same noise, and the noise does not depend on the devices.

Privacy (`fedstream.algorithms.privacy.TreeMechanism`): with k dividing the
R = floor(N / m) rounds of an epoch, each tree lies inside one epoch, so a
client's clipped update enters one tree per epoch, in at most
ceil(log2(k + 1)) of its released nodes; with node noise z C, each epoch is
a Gaussian mechanism of noise multiplier z / sqrt(ceil(log2(k + 1))).
dp-accounting's SingleEpochTreeAggregationDpEvent accounts exactly that
(RDP, neighbours that replace a client's data by the zero update); the
training loop's privacy ledger records it and keeps it in the checkpoint.
The configured server optimizer is not used: eta and beta are the options
server_learning_rate and server_momentum.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.aggregators import Aggregated, Clip, TreeNoise
from fedstream.algorithms.base import RoundTotal, ServerState
from fedstream.algorithms.fedavg import FedAvg
from fedstream.algorithms.privacy import TreeMechanism, default_delta, noise_for_target
from fedstream.models import Model


@dataclasses.dataclass(frozen=True)
class FTRL(FedAvg):
    """The FTRL-with-momentum server of DP-FTRL; its round total is a tree's noisy prefix sum (see the module).

    Clients train as in FedAvg. `server_update` reads total.weighted / total.weight as N_t / D, the noisy
    prefix sum of the current tree over its denominator (what `TreeNoise` hands on), and sets
    m_t = beta m_{t-1} + N_t / D, w_t = w_0 + eta m_t (N_t sums deltas, minus pseudo-gradients); every
    `restart_every` rounds w_0 becomes the current model and m restarts at 0. State: ServerState.extra =
    {"params0": w_0, "momentum": m}.

    Attributes:
      server_learning_rate: eta, the server step on the momentum of the noisy prefix means.
      server_momentum: beta in [0, 1), momentum on the noisy prefix means (0.9 in the paper's FTRLM).
      nesterov: use w_0 + eta (beta m_t + N_t / D) (Nesterov's form, as TFF's DPFTRLMServerOptimizer).
      restart_every: k, rounds per tree (w_0, m and the tree restart every k rounds).
    """

    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    nesterov: bool = False
    restart_every: int = 1

    consumes_prefix_sums: ClassVar[bool] = True
    updates_on_empty_rounds: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum}")
        if not self.server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {self.server_learning_rate}")
        if self.restart_every < 1:
            raise ValueError(f"restart_every must be >= 1, got {self.restart_every}")
        if self.nesterov and self.server_momentum == 0:
            raise ValueError("nesterov needs server_momentum > 0")

    def init(self, rng: jax.Array) -> ServerState:
        """The model, no server optimizer state, w_0 = the initial model and m = 0."""
        params = self.model.init(rng)
        extra = {"params0": params, "momentum": jax.tree.map(jnp.zeros_like, params)}
        return ServerState(params, optax.EmptyState(), jnp.zeros((), jnp.int32), extra)

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """m_t = beta m_{t-1} + N_t / D;  w_t = w_0 + eta m_t  (w_0, m restarted at each tree's first round)."""
        restart = state.round % self.restart_every == 0
        params0 = jax.tree.map(lambda w, w0: jnp.where(restart, w, w0), state.params, state.extra["params0"])
        prefix_mean = jax.tree.map(lambda n: n / total.weight, total.weighted)
        momentum = jax.tree.map(lambda m, n: jnp.where(restart, 0.0, self.server_momentum * m) + n,
                                state.extra["momentum"], prefix_mean)
        step = momentum
        if self.nesterov:
            step = jax.tree.map(lambda m, n: self.server_momentum * m + n, momentum, prefix_mean)
        params = jax.tree.map(lambda w0, s: (w0 + self.server_learning_rate * s).astype(w0.dtype), params0, step)
        return state.replace(params=params, round=state.round + 1,
                             extra={"params0": params0, "momentum": momentum})


def dp_ftrl(
    model: Model, client_optimizer: optax.GradientTransformation, server_optimizer: optax.GradientTransformation, *,
    clip_norm: float, noise_multiplier: float = 0.0, target_epsilon: float = 0.0, target_delta: float = 0.0,
    server_learning_rate: float = 1.0, server_momentum: float = 0.9, nesterov: bool = False,
    restart_every: int = 0, denominator: float = 0.0, calibration_rounds: int = 0,
    population: int = 0, sampling: str = "uniform", clients_per_round: int = 0, num_rounds: int = 0,
) -> Aggregated:
    """DP-FTRL (Kairouz et al. 2021): `Aggregated(FTRL, [Clip(C), TreeNoise(z, D, k)])` (see the module docstring).

    population, sampling, clients_per_round and num_rounds come from the
    train loop's context; the privacy accounting needs sampling 'epochs'
    (each client at most once per epoch of floor(N / m) rounds).

    Options:
      clip_norm: C, each client's update is clipped to L2 norm C (> 0).
      noise_multiplier: z, the noise std of every tree node over C (or use target_epsilon).
      target_epsilon: calibrate z so that the run ends at this epsilon (0 = give noise_multiplier instead).
      target_delta: the delta of (epsilon, delta)-DP (0 = 1/N^1.1 for N clients).
      server_learning_rate: eta of w_t = w_0 + eta m_t.
      server_momentum: beta of m_t = beta m_{t-1} + N_t / D (0.9 in the paper).
      nesterov: Nesterov's form of the momentum step.
      restart_every: k, rounds per tree: it restarts every k rounds (0 = every epoch; k must divide the epoch).
      denominator: D of the noisy prefix mean (0 = clients_per_round).
      calibration_rounds: rounds target_epsilon is calibrated over (0 = num_rounds).
    """
    if not clip_norm > 0:
        raise ValueError("dp_ftrl needs clip_norm > 0 (algorithm.options.clip_norm)")
    mechanism = None
    epoch_rounds = 0
    if population > 0 and clients_per_round > 0:
        if sampling != "epochs":
            raise ValueError(f"dp_ftrl's privacy accounting assumes each client trains at most once per epoch: set "
                             f"config key sampling = 'epochs' (got {sampling!r})")
        from fedstream.data.sampling import rounds_per_epoch

        epoch_rounds = rounds_per_epoch(int(population), int(clients_per_round))
        restart_every = int(restart_every) or epoch_rounds
        mechanism = TreeMechanism(float(noise_multiplier), int(population), epoch_rounds, restart_every)
        denominator = denominator or float(clients_per_round)
    if restart_every < 1:
        raise ValueError("dp_ftrl needs restart_every >= 1 when the run's population and clients_per_round are not "
                         "known (they set the epoch)")
    delta = target_delta or (default_delta(population) if population > 0 else 0.0)
    noise_multiplier, mechanism = noise_for_target(mechanism, noise_multiplier, target_epsilon, delta,
                                                   int(calibration_rounds or num_rounds), "rdp",
                                                   needs="population, clients_per_round")
    if denominator <= 0:
        raise ValueError("dp_ftrl needs the clients per round (context clients_per_round) or the option denominator")
    base = FTRL(model, client_optimizer, optax.identity(), server_learning_rate=float(server_learning_rate),
                server_momentum=float(server_momentum), nesterov=bool(nesterov), restart_every=int(restart_every))
    return Aggregated(base, [Clip(float(clip_norm)),
                             TreeNoise(float(noise_multiplier), float(denominator), mechanism=mechanism,
                                       target_delta=float(delta), accountant="rdp",
                                       restart_every=int(restart_every))])


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("dp_ftrl", dp_ftrl,
                       "DP-FTRL (Kairouz et al. 2021): clip client updates to C, tree-aggregated noise z*C on the "
                       "prefix sums, FTRL with server momentum, tree restarts; no sampling (sampling='epochs')")


_register()
