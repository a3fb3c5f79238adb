"""Client-update transforms around any FedAvg-family algorithm: DP-FedAvg and compressed updates.

`TransformedFedAvg` wraps another registered algorithm (`base`, default
fedavg) and delegates every hook to it, except that it rewrites what each
client adds to the round's sum and what the server does with that sum. A
wrapper rather than a `DPFedAvg(FedAvg)` subclass, so the same code gives
DP-FedProx, DP-FedAdam (server optimizer adam), compressed SCAFFOLD, ...;
a subclass would have to be written once per algorithm.

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
`log_values`): clients, bits sent, pre-clip update norms, the number of
clipped clients and, with adaptive clipping, C_t (each client adds the C_t
it received; `round_log` divides by the clients). They are diagnostics and
are not privatized.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedstream.algorithms.compression import Codec, make_codec, padded_size
from fedstream.algorithms.base import Algorithm, Contribution, Params, RoundTotal, ServerState
from fedstream.algorithms.privacy import (DPMechanism, PrivacyLedger, calibrate_noise_multiplier, default_delta)
from fedstream.models import Model, TrainMetrics

# fold_in constants that keep the transforms' random streams apart from everything else (public: the
# tests reproduce the noise and the quantization from them).
CODEC_SALT = 0x636F6465  # client: quantization / rotation-free randomness
NOISE_SALT = 0x6E6F6973  # server: DP noise
ROTATION_SALT = 0x726F7461  # run: the key of the shared rotations
COUNT_NOISE_SALT = 0x636F756E  # server: noise on the count of unclipped clients (adaptive clipping)


@dataclasses.dataclass(frozen=True)
class TransformedFedAvg(Algorithm):
    """`inner` with compressed and/or clipped-and-noised client updates (see the module docstring).

    clip_norm C > 0 turns DP on (the initial C_0 with adaptive_clipping); noise_multiplier z, the
    overall one the ledger accounts; denominator D; codec the compression. adaptive_clipping with
    target_unclipped_quantile gamma, clip_learning_rate eta_C and clipped_count_stddev sigma_b
    (None: D / 20) adapts C per round. `mechanism`, `target_delta` and `accountant` describe the run
    for its `PrivacyLedger`.
    """

    inner: Algorithm | None = None
    codec: Codec = Codec()
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    denominator: float = 0.0
    mechanism: DPMechanism | None = None
    target_delta: float = 0.0
    accountant: str = "rdp"
    adaptive_clipping: bool = False
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None

    def __post_init__(self) -> None:
        if self.inner is None:
            raise ValueError("TransformedFedAvg needs the algorithm it wraps (inner)")
        if self.clip_norm < 0 or self.noise_multiplier < 0:
            raise ValueError("clip_norm and noise_multiplier must be >= 0")
        if self.dp and self.denominator <= 0:
            raise ValueError("DP-FedAvg needs a fixed denominator D > 0 (expected clients per round)")
        if self.dp and self.inner.uses_prepass:
            raise ValueError(f"DP over {type(self.inner).__name__}: its prepass sums per-client statistics outside "
                             "the Gaussian mechanism")
        if self.adaptive_clipping:
            _check_adaptive(self)

    @property
    def adaptive(self) -> bool:
        """Whether the clip norm adapts per round (adaptive clipping)."""
        return self.dp and self.adaptive_clipping

    @property
    def count_noise_stddev(self) -> float:
        """sigma_b: the option clipped_count_stddev, by default D / 20 (Andrew et al. 2021)."""
        if self.clipped_count_stddev is None:
            return self.denominator / 20.0
        return float(self.clipped_count_stddev)

    @property
    def delta_noise_multiplier(self) -> float:
        """The noise multiplier on the delta sum: z, or z_Delta with adaptive clipping."""
        if not self.adaptive:
            return self.noise_multiplier
        return delta_noise_multiplier(self.noise_multiplier, self.count_noise_stddev)

    @property
    def dp(self) -> bool:
        """Whether updates are clipped and noised."""
        return self.clip_norm > 0

    @property
    def uses_prepass(self) -> bool:  # type: ignore[override]
        return self.inner.uses_prepass

    @property
    def extra_features(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.extra_features

    @property
    def has_client_state(self) -> bool:  # type: ignore[override]
        """The base's client state, and / or the residual of error feedback."""
        return self.inner.has_client_state or self.codec.stateful

    @property
    def has_personal_models(self) -> bool:  # type: ignore[override]
        return self.inner.has_personal_models

    @property
    def is_clustered(self) -> bool:  # type: ignore[override]
        return self.inner.is_clustered

    def __getattr__(self, name: str) -> Any:
        """Other attributes (e.g. HypCluster's num_clusters, read by the train loop) are the base's."""
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def updates_on_empty_rounds(self) -> bool:  # type: ignore[override]
        """True with DP: the server update (noise / D) must run even in a round where no client trained.

        The round runner skips the server update when the weights sum to 0;
        with Poisson sampling that happens with probability (1 - q)^N, and a
        skipped round releases "no change" instead of pure noise. The runner
        reads this flag to run the update regardless.
        """
        return self.dp

    # -- state plumbing: the transform's own state (the shared-rotation key of rotating codecs, the adaptive
    # clip norm) lives next to the base's: ServerState.extra = {"inner": base extra, "transform_key": ...,
    # "clip_norm": ...} and broadcast = {"inner": base broadcast, "round_key": ..., "clip_norm": ...}, present
    # parts only; without such state both are the base's, unwrapped. --

    @property
    def _nested(self) -> bool:
        return self.codec.rotates or self.adaptive

    def _inner_state(self, state: ServerState) -> ServerState:
        return state.replace(extra=state.extra.get("inner")) if self._nested else state

    def _own(self, state: ServerState) -> dict[str, Any]:
        """The transform's own keys of ServerState.extra ({} when not nested)."""
        return {k: v for k, v in state.extra.items() if k != "inner"} if self._nested else {}

    def _outer_state(self, inner: ServerState, own: Mapping[str, Any]) -> ServerState:
        """The base's state `inner` with extra = {"inner": its extra, **own} when nested."""
        if not self._nested:
            return inner
        extra = dict(own)
        if inner.extra is not None:
            extra["inner"] = inner.extra
        return inner.replace(extra=extra)

    def _round_key(self, state: ServerState) -> jax.Array:
        """The key of the round's rotation R: fold_in(fold_in(key(seed), salt), round), shared by all clients."""
        return jax.random.fold_in(state.extra["transform_key"], state.round)

    def _split(self, broadcast: Any) -> tuple[Any, dict[str, Any]]:
        """(the base's broadcast, the transform's own part: round_key, clip_norm)."""
        if not self._nested:
            return broadcast, {}
        return broadcast["inner"], {k: v for k, v in broadcast.items() if k != "inner"}

    def _join(self, inner_broadcast: Any, own: Mapping[str, Any]) -> Any:
        return {"inner": inner_broadcast, **own} if self._nested else inner_broadcast

    @staticmethod
    def _inner_stored(stored: Any) -> Any:
        return stored.get("inner") if isinstance(stored, dict) else None

    # -- hooks --

    def init(self, rng: jax.Array) -> ServerState:
        """The base's state; nested (see above) with the rotations' key and / or the adaptive C_0."""
        state = self.inner.init(rng)
        own = {}
        if self.codec.rotates:
            key = rng if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.key_data(rng)
            own["transform_key"] = jax.random.fold_in(key, ROTATION_SALT)
        if self.adaptive:
            own["clip_norm"] = jnp.asarray(self.clip_norm, jnp.float32)
        return self._outer_state(state, own)

    def client_state_template(self, params: Params) -> Any:
        """{"inner": the base's client state, "residual": zeros(n) for error feedback}, present parts only."""
        if not self.has_client_state:
            return None
        template = {}
        if self.inner.has_client_state:
            template["inner"] = self.inner.client_state_template(params)
        if self.codec.stateful:
            template["residual"] = jnp.zeros((ravel_pytree(params)[0].shape[0],), jnp.float32)
        return template

    def personal_model(self, stored: Any) -> tuple[Params, Any]:
        """The base's personal models, from its part of the stored states."""
        return self.inner.personal_model(stored["inner"])

    def log_values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The base's log values of its own metrics, and the transform's (`round_log`)."""
        inner = self.inner.log_values({k: v for k, v in metrics.items() if k not in TRANSFORM_METRICS})
        return {**inner, **round_log(metrics)}

    def broadcast(self, state: ServerState) -> Any:
        own = {}
        if self.codec.rotates:
            own["round_key"] = self._round_key(state)
        if self.adaptive:
            own["clip_norm"] = state.extra["clip_norm"]
        return self._join(self.inner.broadcast(self._inner_state(state)), own)

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> Any:
        return self.inner.client_init(self._split(broadcast)[0], self._inner_stored(stored), prepass)

    def client_loss(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any) -> tuple[jax.Array, jax.Array]:
        return self.inner.client_loss(params, batch, rng, self._split(broadcast)[0])

    def client_step(self, state: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[Any, TrainMetrics]:
        return self.inner.client_step(state, batch, rng, self._split(broadcast)[0])

    def client_delta(self, state: Any, server_params: Params) -> Params:
        return self.inner.client_delta(state, server_params)

    def prepass_step(self, broadcast: Any, batch: Mapping[str, jax.Array]) -> Any:
        return self.inner.prepass_step(self._split(broadcast)[0], batch)

    def after_prepass(self, broadcast: Any, total: Any) -> Any:
        inner, own = self._split(broadcast)
        return self._join(self.inner.after_prepass(inner, total), own)

    def client_contribution(self, client: Any, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """Encodes (and, with DP, clips) the base's update; adds the transform's metrics (`TRANSFORM_METRICS`).

        With adaptive clipping the clip norm is the broadcast C_t, and the client also sends, in `summed`,
        "unclipped_centred": b_i - 1/2 with b_i = 1[||Delta_i|| <= C_t] (noised on the server, not a metric).
        """
        inner_broadcast, own = self._split(broadcast)
        round_key = own.get("round_key")
        contribution, inner_stored = self.inner.client_contribution(
            client, inner_broadcast, weight, self._inner_stored(stored), prepass, rng)
        if self.dp:
            outside = _named_parts(contribution)
            if outside:
                raise ValueError(f"DP over {type(self.inner).__name__}: its clients also send {outside}, which the "
                                 "Gaussian mechanism does not cover; DP composes with fedavg-like algorithms "
                                 "(fedavg, fedprox)")
        clash = sorted(set(contribution.metrics) & set(TRANSFORM_METRICS))
        if clash:
            raise ValueError(f"{type(self.inner).__name__}'s metrics {clash} clash with the names of the DP / "
                             f"compression metrics {TRANSFORM_METRICS}; rename them")
        flat, unravel = ravel_pytree(contribution.weighted)
        update = flat.astype(jnp.float32)  # Delta_i
        if self.codec.rotates or self.codec.stateful:
            _check_model_shaped(update.shape[0], inner_broadcast)
        residual = stored["residual"] if self.codec.stateful else None
        key = jax.random.fold_in(rng, CODEC_SALT) if rng is not None else jax.random.PRNGKey(0)
        decoded, new_residual, bits = self.codec.encode(update, key, round_key, residual)
        norm = jnp.linalg.norm(decoded)
        metrics = {"clients": jnp.float32(1), "bits": bits, "update_norm": norm}
        summed, weight_out = contribution.summed, contribution.weight
        if self.adaptive:
            clip = own["clip_norm"]
            sent = decoded * jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
            weight_out = jnp.ones((), jnp.float32)
            metrics["clipped"] = (norm > clip).astype(jnp.float32)
            metrics["dp_clip_norm"] = clip
            summed = {"unclipped_centred": (norm <= clip).astype(jnp.float32) - 0.5}
        elif self.dp:
            sent = decoded * jnp.minimum(1.0, self.clip_norm / jnp.maximum(norm, 1e-30))
            weight_out = jnp.ones((), jnp.float32)
            metrics["clipped"] = (norm > self.clip_norm).astype(jnp.float32)
        else:
            sent = decoded
        out = Contribution(weighted=sent if self.codec.rotates else unravel(sent), summed=summed,
                           metrics={**contribution.metrics, **metrics}, weight=weight_out)
        new_stored = {}
        if inner_stored is not None:
            new_stored["inner"] = inner_stored
        if self.codec.stateful:
            new_stored["residual"] = new_residual
        return out, (new_stored or stored)

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """S <- S + N(0, (zC)^2 I) and W <- D with DP; S <- R^{-1} S when rotating; then the base's update.

        With adaptive clipping the noise is z_Delta C_t and C_{t+1} is computed from the noised count.
        """
        inner_state = self._inner_state(state)
        own = self._own(state)
        summed, unclipped_centred = total.summed, None
        if self.adaptive and isinstance(summed, Mapping):
            unclipped_centred = summed.get("unclipped_centred")
            summed = {k: v for k, v in summed.items() if k != "unclipped_centred"} or None
        weighted, weight = total.weighted, total.weight
        if self.dp or self.codec.rotates:
            if self.codec.rotates:
                flat = weighted
                _, unravel = ravel_pytree(inner_state.params)
                n = ravel_pytree(inner_state.params)[0].shape[0]
                if flat.shape[0] != padded_size(n):
                    raise ValueError("rotating codecs need an update shaped like the model")
            else:
                flat, unravel = ravel_pytree(weighted)
            if self.dp:
                if rng is None:
                    raise ValueError("DP-FedAvg's server update needs the round's server key")
                noise = jax.random.normal(jax.random.fold_in(rng, NOISE_SALT), flat.shape, flat.dtype)
                if self.adaptive:
                    if unclipped_centred is None:
                        raise ValueError("adaptive clipping's server update needs the clients' 'unclipped_centred'")
                    clip = state.extra["clip_norm"]
                    flat = flat + (self.delta_noise_multiplier * clip) * noise
                    count_noise = jax.random.normal(jax.random.fold_in(rng, COUNT_NOISE_SALT), (), jnp.float32)
                    own["clip_norm"] = adapted_clip_norm(
                        clip, unclipped_centred, self.count_noise_stddev * count_noise, self.denominator,
                        self.clip_learning_rate, self.target_unclipped_quantile)
                else:
                    flat = flat + (self.noise_multiplier * self.clip_norm) * noise
                weight = jnp.asarray(self.denominator, jnp.float32)
            if self.codec.rotates:
                flat = self.codec.decode_sum(flat, self._round_key(state), n)
            weighted = unravel(flat)
        inner_total = RoundTotal(weighted=weighted, weight=weight, summed=summed,
                                 metrics={k: v for k, v in total.metrics.items() if k not in TRANSFORM_METRICS})
        return self._outer_state(self.inner.server_update(inner_state, inner_total, rng), own)

    def new_privacy_ledger(self) -> PrivacyLedger | None:
        """A fresh ledger for this run's mechanism (None without DP or without sampling facts)."""
        if not self.dp or self.mechanism is None:
            return None
        return PrivacyLedger(self.mechanism, self.target_delta, self.accountant)


def delta_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the delta's noise multiplier that, with the count's noise
    sigma_b, makes the round a Gaussian mechanism of overall multiplier z (Andrew et al. 2021, Section 3).

    0 when z = 0 (no noise anywhere). Raises ValueError when 2 sigma_b <= z: the count alone would then
    spend the whole budget or more.
    """
    z, sigma_b = float(noise_multiplier), float(clipped_count_stddev)
    if z == 0:
        return 0.0
    rest = z ** -2 - (2 * sigma_b) ** -2 if sigma_b > 0 else -math.inf
    if rest <= 0:
        raise ValueError(f"adaptive clipping: clipped_count_stddev sigma_b = {sigma_b:g} is too small for "
                         f"noise_multiplier z = {z:g}: z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) needs sigma_b > z / 2 "
                         f"= {z / 2:g} (default sigma_b: expected clients per round / 20); set "
                         "algorithm.options.clipped_count_stddev higher, or sample more clients per round")
    return rest ** -0.5


def adapted_clip_norm(clip_norm: jax.Array, unclipped_centred: jax.Array, count_noise: jax.Array,
                      denominator: float, learning_rate: float, target_quantile: float) -> jax.Array:
    """C_{t+1} = C_t exp(-eta_C (b_bar - gamma)), b_bar = (sum_i (b_i - 1/2) + noise) / D + 1/2: the geometric
    update of Andrew et al. (2021), which moves C towards the gamma-quantile of the update norms."""
    unclipped_fraction = (unclipped_centred + count_noise) / denominator + 0.5
    return clip_norm * jnp.exp(-learning_rate * (unclipped_fraction - target_quantile))


def _check_adaptive(algorithm: TransformedFedAvg) -> None:
    """Refuses adaptive-clipping options that are out of range (and sigma_b too small for z)."""
    if not algorithm.dp:
        raise ValueError("adaptive_clipping needs DP: clip_norm > 0 (the initial clip norm)")
    if not 0.0 <= algorithm.target_unclipped_quantile <= 1.0:
        raise ValueError(f"target_unclipped_quantile must be in [0, 1], got {algorithm.target_unclipped_quantile}")
    if algorithm.clip_learning_rate < 0:
        raise ValueError(f"clip_learning_rate must be >= 0, got {algorithm.clip_learning_rate}")
    if algorithm.count_noise_stddev < 0:
        raise ValueError(f"clipped_count_stddev must be >= 0, got {algorithm.count_noise_stddev}")
    delta_noise_multiplier(algorithm.noise_multiplier, algorithm.count_noise_stddev)


def _check_model_shaped(size: int, broadcast: Any) -> None:
    params = broadcast.get("params") if isinstance(broadcast, dict) else None
    expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)) if params is not None else None
    if expected != size:
        raise ValueError(f"rotating / error-feedback codecs need an update shaped like the model ({expected} "
                         f"entries); this algorithm's update has {size}")


# The names of the metrics DP and compression add to each client's `Contribution.metrics` (summed over the
# round's clients; `round_log` turns them into per-client means and fractions).
TRANSFORM_METRICS = ("clients", "bits", "update_norm", "clipped", "dp_clip_norm")


def round_log(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Log values of a round from the summed `TRANSFORM_METRICS` (the round's summed `Contribution.metrics`).

    Returns `transform_clients`, `bits_sent` (all clients), `bits_per_client`,
    `update_norm_mean` (pre-clip) and, with DP, `dp_clipped_fraction`; with
    adaptive clipping `dp_clip_norm`, the C_t the round's clients were clipped
    to (each client adds the C_t it received, so the sum over the clients is
    divided by their number; NaN, like the other per-client means, in a round
    without clients). Empty without the transform's metrics; other metrics
    are ignored (`TransformedFedAvg.log_values` logs the base's).
    """
    values = {k: float(v) for k, v in metrics.items() if k in TRANSFORM_METRICS}
    if "clients" not in values:
        return {}
    clients = values["clients"]
    per = 1.0 / clients if clients > 0 else float("nan")
    out = {"transform_clients": clients, "bits_sent": values["bits"], "bits_per_client": values["bits"] * per,
           "update_norm_mean": values["update_norm"] * per}
    if "clipped" in values:
        out["dp_clipped_fraction"] = values["clipped"] * per
    if "dp_clip_norm" in values:
        out["dp_clip_norm"] = values["dp_clip_norm"] * per
    return out


def _named_parts(contribution: Contribution) -> list[str]:
    """What a contribution sends besides `weighted` (keys of `summed` and `metrics`), by name."""
    parts = []
    if jax.tree.leaves(contribution.summed):
        summed = contribution.summed
        parts += sorted(summed) if isinstance(summed, Mapping) else ["summed"]
    parts += [f"metric {k}" for k in sorted(contribution.metrics)]
    return parts


def privacy_ledger(algorithm: Algorithm, saved: Mapping[str, Any] | None = None,
                   rounds_done: int = 0) -> PrivacyLedger | None:
    """The run's ledger: None unless `algorithm` is DP; `saved` is checkpoint meta["privacy"] on resume.

    A resumed ledger must hold exactly `rounds_done` rounds; later rounds use
    the algorithm's current mechanism (a new segment if it changed).
    """
    fresh = algorithm.new_privacy_ledger() if isinstance(algorithm, TransformedFedAvg) else None
    if fresh is None:
        return None
    if saved is None:
        if rounds_done:
            raise ValueError(f"resuming a DP run after {rounds_done} rounds, but its checkpoint has no privacy ledger")
        return fresh
    ledger = PrivacyLedger.from_json(saved, fresh.mechanism)
    if ledger.rounds != rounds_done:
        raise ValueError(f"privacy ledger holds {ledger.rounds} rounds, the checkpoint {rounds_done}")
    if (ledger.accountant, ledger.target_delta) != (fresh.accountant, fresh.target_delta):
        raise ValueError("the run's accountant or target_delta changed since its checkpoint")
    if ledger.segments and ledger.segments[-1][0] != fresh.mechanism:
        warnings.warn(f"DP mechanism changed on resume ({ledger.segments[-1][0]} -> {fresh.mechanism}), e.g. z "
                      "recalibrated for a new num_rounds (pin it with algorithm.options.calibration_rounds); the "
                      "ledger accounts the rounds of each exactly, but epsilon may end above target_epsilon",
                      stacklevel=2)
    return ledger


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
) -> TransformedFedAvg:
    """Builds `base` (with `base_options`) wrapped in compression and/or DP.

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
        return TransformedFedAvg(model, client_optimizer, server_optimizer, inner=inner, codec=codec)

    mechanism = None
    if population > 0 and (clients_per_round > 0 or sampling_rate > 0):
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
    if target_epsilon > 0:
        if noise_multiplier:
            raise ValueError("set either noise_multiplier or target_epsilon, not both")
        rounds = int(calibration_rounds or num_rounds)
        if mechanism is None or rounds < 1:
            raise ValueError("target_epsilon needs population, the sampling and num_rounds (or calibration_rounds)")
        noise_multiplier = calibrate_noise_multiplier(mechanism, rounds, target_epsilon, delta, accountant)
        mechanism = mechanism.with_noise(noise_multiplier)
    if denominator <= 0:
        raise ValueError("DP-FedAvg needs the expected clients per round: context population, sampling and "
                         "clients_per_round (or sampling_rate), or the option denominator")
    return TransformedFedAvg(model, client_optimizer, server_optimizer, inner=inner, codec=codec,
                             clip_norm=float(clip_norm), noise_multiplier=float(noise_multiplier),
                             denominator=float(denominator), mechanism=mechanism, target_delta=float(delta),
                             accountant=accountant, adaptive_clipping=bool(adaptive_clipping),
                             target_unclipped_quantile=float(target_unclipped_quantile),
                             clip_learning_rate=float(clip_learning_rate),
                             clipped_count_stddev=None if clipped_count_stddev is None else float(clipped_count_stddev))


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
