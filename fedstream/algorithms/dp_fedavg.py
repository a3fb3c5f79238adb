"""Client-update transforms around any FedAvg-family algorithm: DP-FedAvg and compressed updates.

`TransformedFedAvg` wraps another registered algorithm (`base`, default
fedavg) and delegates every hook to it, except that it rewrites what each
client adds to the round's sum and what the server does with that sum. A
wrapper rather than a `DPFedAvg(FedAvg)` subclass, so the same code gives
DP-FedProx, DP-FedAdam (server optimizer adam), compressed SCAFFOLD, ...;
a subclass would have to be written once per algorithm.

Per client i, with Delta_i = contribution["delta"] / contribution["weight"]
(the base algorithm's update, e.g. w_i - w for FedAvg) as one flat vector:

    decoded_i, e_i, bits_i = Codec.encode(Delta_i)        # see fedstream.algorithms.compression
    DP:      sends  clip_C(decoded_i) = decoded_i * min(1, C / ||decoded_i||_2),  weight 1
    no DP:   sends  p_i * decoded_i,  weight p_i  (the base algorithm's weight)

Server, with the sums S = sum_i sent_i and W = sum_i weight_i:

    DP:      S <- S + N(0, (z C)^2 I)                      # Gaussian mechanism on the SUM (server key)
             W <- D                                        # fixed denominator, public:
                                                           #   D = q N (Poisson sampling, McMahan et al. 2018's
                                                           #   fixed-denominator estimator) or m (m-client cohorts)
    rotating codecs:  S <- R^{-1} S                        # once, to the sum, so to the mean
    base.server_update(state, {"delta": S, "weight": W, ...})   # FedAvg: w <- ServerOpt(w, -S / W)

so DP-FedAvg's update is  w <- ServerOpt(w, -(sum_i clip_C(Delta_i) + N(0, z^2 C^2 I)) / D),  whose
noise has standard deviation z C / D per coordinate. Clipping comes after
the codec, so the L2 bound holds for what the server actually sums.
DP needs a base whose clients send nothing but "delta" and "weight" (fedavg,
fedprox; any server optimizer, e.g. DP-FedAdam) and no prepass: anything else
(SCAFFOLD's Delta c_i, Mime's gradient sums, ...) would leave the mechanism,
so it is refused. Compression composes with any base whose contribution has a
"delta" (other keys are sent as they are and not counted in the bits);
rotating codecs and error feedback need the update shaped like the model
(not HypCluster's stacked one). Empty rounds: see `updates_on_empty_rounds`.

Per-client `log_*` contribution keys (summed over the cohort) feed the
round's log (`round_log`): clients, bits sent, pre-clip update norms, the
number of clipped clients. They are diagnostics and are not privatized.
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
from fedstream.algorithms.fedavg import FedAvg, Params, ServerState
from fedstream.algorithms.privacy import (DPMechanism, PrivacyLedger, calibrate_noise_multiplier, default_delta)
from fedstream.models import Model, TrainMetrics

LOG_PREFIX = "log_"
# fold_in constants that keep the transforms' random streams apart from everything else.
_CODEC_SALT = 0x636F6465  # client: quantization / rotation-free randomness
_NOISE_SALT = 0x6E6F6973  # server: DP noise
_ROTATION_SALT = 0x726F7461  # run: the key of the shared rotations


@dataclasses.dataclass(frozen=True)
class TransformedFedAvg(FedAvg):
    """`inner` with compressed and/or clipped-and-noised client updates (see the module docstring).

    clip_norm C > 0 turns DP on; noise_multiplier z; denominator D; codec the compression.
    `mechanism`, `target_delta` and `accountant` describe the run for its `PrivacyLedger`.
    """

    inner: FedAvg | None = None
    codec: Codec = Codec()
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    denominator: float = 0.0
    mechanism: DPMechanism | None = None
    target_delta: float = 0.0
    accountant: str = "rdp"

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

    def __getattr__(self, name: str) -> Any:
        """Other attributes (e.g. HypCluster's num_clusters, read by the train loop) are the base's."""
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def updates_on_empty_rounds(self) -> bool:
        """True with DP: the server update (noise / D) must run even in a round where no client trained.

        The round runner skips the server update when the weights sum to 0;
        with Poisson sampling that happens with probability (1 - q)^N, and a
        skipped round releases "no change" instead of pure noise. The runner
        reads this flag to run the update regardless.
        """
        return self.dp

    # -- state plumbing: the shared-rotation key lives in ServerState.extra only for rotating codecs --

    def _inner_state(self, state: ServerState) -> ServerState:
        return state.replace(extra=state.extra.get("inner")) if self.codec.rotates else state

    def _outer_state(self, inner: ServerState, outer: ServerState) -> ServerState:
        if not self.codec.rotates:
            return inner
        extra = {"transform_key": outer.extra["transform_key"]}
        if inner.extra is not None:
            extra["inner"] = inner.extra
        return inner.replace(extra=extra)

    def _round_key(self, state: ServerState) -> jax.Array:
        """The key of the round's rotation R: fold_in(fold_in(key(seed), salt), round), shared by all clients."""
        return jax.random.fold_in(state.extra["transform_key"], state.round)

    def _split(self, broadcast: Any) -> tuple[Any, jax.Array | None]:
        return (broadcast["inner"], broadcast["round_key"]) if self.codec.rotates else (broadcast, None)

    def _join(self, inner_broadcast: Any, round_key: jax.Array | None) -> Any:
        return {"inner": inner_broadcast, "round_key": round_key} if self.codec.rotates else inner_broadcast

    @staticmethod
    def _inner_stored(stored: Any) -> Any:
        return stored.get("inner") if isinstance(stored, dict) else None

    # -- hooks --

    def init(self, rng: jax.Array) -> ServerState:
        """The base's state; with a rotating codec, extra = {"inner": base extra, "transform_key": key}."""
        state = self.inner.init(rng)
        if not self.codec.rotates:
            return state
        key = rng if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.key_data(rng)
        extra = {"transform_key": jax.random.fold_in(key, _ROTATION_SALT)}
        if state.extra is not None:
            extra["inner"] = state.extra
        return state.replace(extra=extra)

    def client_state_template(self, params: Params) -> Any:
        """{"inner": the base's client state, "residual": zeros(n) for error feedback}, present parts only."""
        template = {}
        inner = self.inner.client_state_template(params)
        if inner is not None:
            template["inner"] = inner
        if self.codec.stateful:
            template["residual"] = jnp.zeros((ravel_pytree(params)[0].shape[0],), jnp.float32)
        return template or None

    def broadcast(self, state: ServerState) -> Any:
        inner = self.inner.broadcast(self._inner_state(state))
        return self._join(inner, self._round_key(state) if self.codec.rotates else None)

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
        inner, round_key = self._split(broadcast)
        return self._join(self.inner.after_prepass(inner, total), round_key)

    def client_contribution(self, client: Any, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[dict[str, Any], Any]:
        """Encodes (and, with DP, clips) the base's update; adds the `log_*` counters."""
        inner_broadcast, round_key = self._split(broadcast)
        contribution, inner_stored = self.inner.client_contribution(
            client, inner_broadcast, weight, self._inner_stored(stored), prepass, rng)
        if self.dp and set(contribution) - {"delta", "weight"}:
            raise ValueError(f"DP over {type(self.inner).__name__}: its clients also send "
                             f"{sorted(set(contribution) - {'delta', 'weight'})}, which the Gaussian mechanism does "
                             "not cover; DP composes with fedavg-like algorithms (fedavg, fedprox)")
        w = jnp.asarray(contribution["weight"], jnp.float32)
        flat, unravel = ravel_pytree(contribution["delta"])
        flat = flat.astype(jnp.float32)
        if self.codec.rotates or self.codec.stateful:
            _check_model_shaped(flat.shape[0], inner_broadcast)
        update = jnp.where(w > 0, flat / jnp.where(w > 0, w, 1.0), 0.0)  # Delta_i
        residual = stored["residual"] if self.codec.stateful else None
        key = jax.random.fold_in(rng, _CODEC_SALT) if rng is not None else jax.random.PRNGKey(0)
        decoded, new_residual, bits = self.codec.encode(update, key, round_key, residual)
        norm = jnp.linalg.norm(decoded)
        logs = {"log_clients": jnp.float32(1), "log_bits": bits, "log_update_norm": norm}
        if self.dp:
            sent = decoded * jnp.minimum(1.0, self.clip_norm / jnp.maximum(norm, 1e-30))
            new_weight = jnp.ones_like(w)
            logs["log_clipped"] = (norm > self.clip_norm).astype(jnp.float32)
        else:
            sent, new_weight = w * decoded, w
        delta = sent if self.codec.rotates else unravel(sent)
        out = {**contribution, "delta": delta, "weight": new_weight, **logs}
        new_stored = {}
        if inner_stored is not None:
            new_stored["inner"] = inner_stored
        if self.codec.stateful:
            new_stored["residual"] = new_residual
        return out, (new_stored or stored)

    def server_update(self, state: ServerState, total: Mapping[str, Any], rng: jax.Array | None = None) -> ServerState:
        """S <- S + N(0, (zC)^2 I) and W <- D with DP; S <- R^{-1} S when rotating; then the base's update."""
        inner_state = self._inner_state(state)
        total = {k: v for k, v in total.items() if not k.startswith(LOG_PREFIX)}
        if self.dp or self.codec.rotates:
            if self.codec.rotates:
                flat = total["delta"]
                _, unravel = ravel_pytree(inner_state.params)
                n = ravel_pytree(inner_state.params)[0].shape[0]
                if flat.shape[0] != padded_size(n):
                    raise ValueError("rotating codecs need an update shaped like the model")
            else:
                flat, unravel = ravel_pytree(total["delta"])
            if self.dp:
                if rng is None:
                    raise ValueError("DP-FedAvg's server update needs the round's server key")
                noise = jax.random.normal(jax.random.fold_in(rng, _NOISE_SALT), flat.shape, flat.dtype)
                flat = flat + (self.noise_multiplier * self.clip_norm) * noise
                total["weight"] = jnp.asarray(self.denominator, jnp.float32)
            if self.codec.rotates:
                flat = self.codec.decode_sum(flat, self._round_key(state), n)
            total["delta"] = unravel(flat)
        return self._outer_state(self.inner.server_update(inner_state, total, rng), state)

    def new_privacy_ledger(self) -> PrivacyLedger | None:
        """A fresh ledger for this run's mechanism (None without DP or without sampling facts)."""
        if not self.dp or self.mechanism is None:
            return None
        return PrivacyLedger(self.mechanism, self.target_delta, self.accountant)


def _check_model_shaped(size: int, broadcast: Any) -> None:
    params = broadcast.get("params") if isinstance(broadcast, dict) else None
    expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)) if params is not None else None
    if expected != size:
        raise ValueError(f"rotating / error-feedback codecs need an update shaped like the model ({expected} "
                         f"entries); this algorithm's update has {size}")


def round_log(logs: Mapping[str, Any]) -> dict[str, float]:
    """Log values of a round from the summed `log_*` keys (`stats["logs"]` of the round runner).

    Returns `transform_clients`, `bits_sent` (all clients), `bits_per_client`,
    `update_norm_mean` (pre-clip) and, with DP, `dp_clipped_fraction`.
    Empty for algorithms without transforms.
    """
    values = {k: float(v) for k, v in logs.items() if k.startswith(LOG_PREFIX)}
    if "log_clients" not in values:
        return {}
    clients = values["log_clients"]
    per = 1.0 / clients if clients > 0 else float("nan")
    out = {"transform_clients": clients, "bits_sent": values["log_bits"], "bits_per_client": values["log_bits"] * per,
           "update_norm_mean": values["log_update_norm"] * per}
    if "log_clipped" in values:
        out["dp_clipped_fraction"] = values["log_clipped"] * per
    return out


def privacy_ledger(algorithm: FedAvg, saved: Mapping[str, Any] | None = None,
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
    population: int = 0, client_learning_rate: float = 0.0, sampling: str = "uniform", sampling_rate: float = 0.0,
    clients_per_round: int = 0, num_rounds: int = 0, require_dp: bool = False,
) -> TransformedFedAvg:
    """Builds `base` (with `base_options`) wrapped in compression and/or DP.

    Options (config `algorithm.options`): clip_norm C (> 0 = DP), noise_multiplier z, or target_epsilon
    (with target_delta, default 1/N^1.1) to calibrate z over calibration_rounds (default num_rounds);
    accountant 'rdp' | 'pld'; denominator D (default: q N under Poisson sampling, else clients_per_round);
    compression 'none' | 'quantize' (bits, quantization_scale 'minmax' | 'norm', rotate) | 'drive' |
    'topk' (topk_fraction or topk, error_feedback). population, sampling, sampling_rate, clients_per_round,
    num_rounds and client_learning_rate come from the train loop's context.
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
        if noise_multiplier or target_epsilon:
            raise ValueError("noise_multiplier / target_epsilon need clip_norm > 0")
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
                             accountant=accountant)


dp_fedavg = functools.partial(build_transformed, require_dp=True)
compressed_fedavg = functools.partial(build_transformed, require_dp=False)


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("dp_fedavg", dp_fedavg,
                       "DP-FedAvg (McMahan et al. 2018): clip client updates to C, Gaussian noise z*C on the sum, "
                       "fixed denominator; base= any fedavg-like algorithm; optional compression")
    register_algorithm("compressed_fedavg", compressed_fedavg,
                       "compressed client updates (stochastic quantization +- Hadamard rotation, DRIVE, top-k with "
                       "error feedback) around any algorithm (base=)")


_register()
