"""DP-FedAvg and compressed updates around any FedAvg-family algorithm: the registered factories.

`dp_fedavg` and `compressed_fedavg` build another registered algorithm
(`base`, default fedavg) and chain aggregators around it
(`fedstream.algorithms.aggregators`): `Aggregated(base, [Compress(codec),
Clip(C), GaussianNoise(z, D)])`, present stages only. The chain delegates
every hook to the base, except what each client adds to the round's sum and
what the server does with that sum, so the same code gives DP-FedProx,
DP-FedAdam (server optimizer adam), compressed SCAFFOLD, ...

Per client i, with Delta_i = the base's `Contribution.weighted` (its update,
e.g. w_i - w for FedAvg, not multiplied by the weight) as one flat vector:

    decoded_i, e_i, bits_i = Codec.encode(Delta_i)        # see fedstream.algorithms.compression
    DP:      sends  clip_C(decoded_i) = decoded_i * min(1, C / ||decoded_i||_2),  weight 1
    no DP:   sends  decoded_i,  weight p_i  (the base algorithm's; the runner forms p_i * decoded_i)

Server, with the sums S = sum_i sent_i and W = sum_i weight_i:

    DP:      S <- S + N(0, (z C)^2 I)                      # Gaussian mechanism on the SUM (server key)
             W <- D                                        # fixed denominator, public:
                                                           #   D = q N (Poisson sampling, McMahan et al. 2018's
                                                           #   fixed-denominator estimator) or m (m-client cohorts)
    rotating codecs:  S <- R^{-1} S                        # once, to the sum, so to the mean
    base.server_update(state, RoundTotal(weighted=S, weight=W, ...))   # FedAvg: w <- ServerOpt(w, -S / W)

so DP-FedAvg's update is  w <- ServerOpt(w, -(sum_i clip_C(Delta_i) + N(0, z^2 C^2 I)) / D),  whose
noise has standard deviation z C / D per coordinate. Clipping comes after
the codec, so the L2 bound holds for what the server actually sums.
DP needs a base whose clients send nothing but `weighted` (fedavg, fedprox;
any server optimizer, e.g. DP-FedAdam) and no prepass: anything else
(SCAFFOLD's Delta c_i in `summed`, Mime's gradient sums, the base's own
`metrics`, ...) would leave the mechanism, so it is refused. Compression
composes with any base (its `weighted` is compressed; `summed` and `metrics`
are sent as they are and not counted in the bits);
rotating codecs and error feedback need the update shaped like the model
(not HypCluster's stacked one). Empty rounds: see `updates_on_empty_rounds`.

Adaptive clipping (option adaptive_clipping; Andrew, Thakkar, McMahan and
Ramaswamy 2021, "Differentially private learning with adaptive clipping",
Algorithm 1 with the geometric update) makes C a server state C_t, started at
clip_norm, that tracks the gamma-quantile of the update norms (gamma =
target_unclipped_quantile). Client i (its update clipped to C_t as above) also
sends its bit b_i = 1[||Delta_i|| <= C_t] centred, b_i - 1/2, so that one
client moves the count's sum by at most 1/2 (its L2 sensitivity, which the
paper's 2 sigma_b below assumes; TensorFlow Privacy's QuantileEstimatorQuery
does the same); the server releases that sum through its own Gaussian
mechanism and updates C:

    b_bar   = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / D + 1/2   # = (sum_i b_i + N(0, sigma_b^2)) / D with D clients
    S      <- S + N(0, (z_Delta C_t)^2 I)                        # z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)
    C_{t+1} = C_t exp(-eta_C (b_bar - gamma))                    # eta_C = clip_learning_rate

with sigma_b = clipped_count_stddev (default D / 20). Centring matters under
Poisson sampling, where the number of clients is not D: uncentred bits would
have sensitivity 1, i.e. half the noise multiplier that z_Delta assumes.

The two Gaussian releases of a round compose to one with noise multiplier z
(the paper's Section 3: z^-2 = z_Delta^-2 + (2 sigma_b)^-2, under add/remove
as under replace-one neighbours), so the privacy ledger keeps accounting z,
the configured (or calibrated) noise_multiplier, and the update gets the
slightly larger z_Delta; that needs 2 sigma_b > z (refused otherwise). C_t
lives in ServerState.extra (checkpointed, so a resumed run continues exactly).

Each client's `Contribution.metrics` (summed over the cohort; names in
`TRANSFORM_METRICS`) feed the round's log (`round_log`, through
`Aggregated.log_values`): clients, bits sent, pre-clip update norms, the number of
clipped clients and, with adaptive clipping, C_t (each client adds the C_t
it received; `round_log` divides by the clients). They are diagnostics and
are not privatized.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import optax

from fedstream.algorithms.aggregators import (  # noqa: F401  (re-exported: the tests and older imports use them)
    CODEC_SALT, COUNT_NOISE_SALT, NOISE_SALT, ROTATION_SALT, TRANSFORM_METRICS, Aggregated, Aggregator, Clip,
    Compress, GaussianNoise, adapted_clip_norm, delta_noise_multiplier, round_log)
from fedstream.algorithms.compression import make_codec
from fedstream.algorithms.privacy import DPMechanism, default_delta, noise_for_target
from fedstream.models import Model


def build_transformed(
    model: Model, client_optimizer: optax.GradientTransformation, server_optimizer: optax.GradientTransformation, *,
    base: str = "fedavg", base_options: Mapping[str, Any] | None = None,
    clip_norm: float = 0.0, noise_multiplier: float = 0.0, target_epsilon: float = 0.0, target_delta: float = 0.0,
    accountant: str = "rdp", calibration_rounds: int = 0, denominator: float = 0.0,
    compression: str = "none", bits: int = 8, quantization_scale: str = "minmax", rotate: bool = False,
    topk_fraction: float = 0.01, topk: int = 0, error_feedback: bool = True,
    adaptive_clipping: bool = False, target_unclipped_quantile: float = 0.5, clip_learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
    population: int = 0, client_learning_rate: float = 0.0, sampling: str = "uniform", sampling_rate: float = 0.0,
    clients_per_round: int = 0, num_rounds: int = 0, require_dp: bool = False,
) -> Aggregated:
    """Builds `base` (with `base_options`) chained with `Compress`, `Clip` and `GaussianNoise` as the options ask.

    With adaptive_clipping, z stays the overall noise multiplier (accounted,
    calibrated) and the delta gets z_Delta (see the module docstring).
    population, sampling, sampling_rate, clients_per_round, num_rounds and
    client_learning_rate come from the train loop's context.

    Options:
      base: the algorithm wrapped (any registered one whose clients send only a delta; default fedavg).
      base_options: the wrapped algorithm's own options (a mapping, e.g. {'proximal_weight': 0.1}).
      clip_norm: C, each client delta is clipped to L2 norm C; > 0 turns DP on (C_0 with adaptive_clipping).
      noise_multiplier: z, Gaussian noise of std z*C on the sum of clipped deltas (or use target_epsilon).
      target_epsilon: calibrate z so that the run ends at this epsilon (0 = give noise_multiplier instead).
      target_delta: the delta of (epsilon, delta)-DP (0 = 1/N^1.1 for N clients).
      accountant: the privacy accountant: 'rdp' or 'pld' (Google's dp-accounting).
      calibration_rounds: rounds target_epsilon is calibrated over (0 = num_rounds).
      denominator: D of the noised mean (0 = q N under Poisson sampling, else clients_per_round).
      compression: client update compression: 'none', 'quantize', 'drive' or 'topk'.
      bits: bits per coordinate for compression='quantize'.
      quantization_scale: 'minmax' (per-vector range) or 'norm' (QSGD) for compression='quantize'.
      rotate: apply a randomized Hadamard rotation before quantizing.
      topk_fraction: fraction of coordinates each client sends for compression='topk' (when topk is 0).
      topk: number of coordinates each client sends for compression='topk' (0 = use topk_fraction).
      error_feedback: keep each client's unsent remainder for its next round (top-k).
      adaptive_clipping: adapt C each round towards the target_unclipped_quantile (Andrew et al. 2021).
      target_unclipped_quantile: gamma, the fraction of clients whose update should be unclipped.
      clip_learning_rate: eta_C of the geometric clip-norm update.
      clipped_count_stddev: sigma_b, noise std of the unclipped count (None = D / 20).
    """
    from fedstream.algorithms import build_algorithm

    if base in ("dp_fedavg", "compressed_fedavg"):
        raise ValueError(f"base {base!r}: the transforms do not nest; set both DP and compression options")
    context = {k: v for k, v in (("population", population), ("client_learning_rate", client_learning_rate)) if v}
    inner = build_algorithm(base, model, client_optimizer, server_optimizer, context=context,
                            **dict(base_options or {}))
    codec = make_codec(compression, bits=bits, scale=quantization_scale, rotate=rotate, topk_fraction=topk_fraction,
                       topk=topk, error_feedback=error_feedback)
    if require_dp and clip_norm <= 0:
        raise ValueError("dp_fedavg needs clip_norm > 0 (algorithm.options.clip_norm)")
    if not clip_norm > 0:
        if noise_multiplier or target_epsilon or adaptive_clipping:
            raise ValueError("noise_multiplier / target_epsilon / adaptive_clipping need clip_norm > 0")
        return Aggregated(inner, [Compress(codec)])

    mechanism = None
    if population > 0 and (clients_per_round > 0 or sampling_rate > 0):
        if sampling == "epochs":
            raise ValueError("dp_fedavg's accounting assumes uniform or Poisson sampling of each round's cohort; "
                             "sampling 'epochs' (each client once per epoch) is dp_ftrl's")
        if sampling == "poisson":
            from fedstream.data.cohort import poisson_rate

            q = poisson_rate(sampling_rate, clients_per_round, population)
            mechanism = DPMechanism(float(noise_multiplier), "poisson", int(population), sampling_rate=q)
            denominator = denominator or q * population
        else:
            mechanism = DPMechanism(float(noise_multiplier), "uniform", int(population),
                                    cohort_size=int(clients_per_round))
            denominator = denominator or float(clients_per_round)
    delta = target_delta or (default_delta(population) if population > 0 else 0.0)
    noise_multiplier, mechanism = noise_for_target(mechanism, noise_multiplier, target_epsilon, delta,
                                                   int(calibration_rounds or num_rounds), accountant,
                                                   needs="population, the sampling")
    if denominator <= 0:
        raise ValueError("DP-FedAvg needs the expected clients per round: context population, sampling and "
                         "clients_per_round (or sampling_rate), or the option denominator")
    stages: list[Aggregator] = [] if compression == "none" else [Compress(codec)]
    stages.append(Clip(float(clip_norm), adaptive=bool(adaptive_clipping),
                       target_quantile=float(target_unclipped_quantile), learning_rate=float(clip_learning_rate),
                       count_stddev=None if clipped_count_stddev is None else float(clipped_count_stddev)))
    stages.append(GaussianNoise(float(noise_multiplier), float(denominator), mechanism=mechanism,
                                target_delta=float(delta), accountant=accountant))
    return Aggregated(inner, stages)


dp_fedavg = functools.partial(build_transformed, require_dp=True)
compressed_fedavg = functools.partial(build_transformed, require_dp=False)


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("dp_fedavg", dp_fedavg,
                       "DP-FedAvg (McMahan et al. 2018): clip client updates to C, Gaussian noise z*C on the sum, "
                       "fixed denominator; base= any fedavg-like algorithm; optional compression and adaptive "
                       "clipping (Andrew et al. 2021)")
    register_algorithm("compressed_fedavg", compressed_fedavg,
                       "compressed client updates (stochastic quantization +- Hadamard rotation, DRIVE, top-k with "
                       "error feedback) around any algorithm (base=)")


_register()
