"""Aggregators: small objects with one job each, chained around any algorithm's client update.

    import fedstream as fs
    algorithm = fs.Aggregated(fs.FedProx(model, client_opt, server_opt, proximal_weight=0.1),
                              [fs.Compress(make_codec("drive")), fs.Clip(0.5), fs.GaussianNoise(1.1, denominator=10)])

`Aggregated(base, stages)` is an `Algorithm`: it runs `base` unchanged
except for what each client adds to the round's sum and what the server does
with that sum (as TFF's aggregation factories and FedJAX's aggregators do).
With Delta_i = the base's `Contribution.weighted` as one flat float32 vector,
each client applies the stages in list order and the server undoes them in
reverse order before the base's `server_update`:

    Compress(codec)   client: Delta <- decoded codec.encode(Delta) (+ its residual, error feedback), bits
                      server: S <- R^{-1} S for rotating codecs (once, to the sum)
    Clip(norm)        client: Delta <- Delta min(1, C / ||Delta||)  (C fixed, or C_t with adaptive=True)
                      server: adaptive: C_{t+1} = C_t exp(-eta_C (b_bar - gamma)) from the noised count
    GaussianNoise(z, denominator=D)
                      client: weight 1 (the sum's sensitivity is C)
                      server: S <- S + N(0, (z C)^2 I), W <- D (fixed denominator)
    TreeNoise(z, denominator=D, restart_every=k)
                      client: weight 1
                      server: the tree's prefix sum P_t <- P_{t-1} + S (0 at each restart), handed on as
                              P_t + (sum of the tree nodes covering rounds 1..t of the tree), W <- D
                              (DP-FTRL; its base is `fedstream.algorithms.dp_ftrl.FTRL`)

With DP the order is codec first, then clipping, then noise
(`[Compress(...), Clip(...), GaussianNoise(...)]`), so the L2 bound holds for
what the server actually sums; GaussianNoise needs a Clip before it and comes
last, and its declared mechanism (`GaussianNoise.accounting`) is what the
training loop's privacy ledger accounts. The numerics (noise streams, state
layout) are those of `dp_fedavg` / `compressed_fedavg`, which build such
chains from their options (see `fedstream.algorithms.dp_fedavg` for the
equations, adaptive clipping included).

State: the stages' own server state (the rotations' key "transform_key",
the adaptive "clip_norm") lives next to the base's, ServerState.extra =
{"inner": base extra, ...}, broadcast = {"inner": base broadcast,
"round_key", "clip_norm"} (present parts only; without such state both are
the base's, unwrapped); per-client stored state = {"inner": the base's,
"residual": error feedback's}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedstream.algorithms.base import Algorithm, Contribution, Params, RoundTotal, ServerState
from fedstream.algorithms.compression import Codec, padded_size
from fedstream.algorithms.privacy import DPMechanism, PrivacyLedger, TreeMechanism
from fedstream.models import TrainMetrics

# fold_in constants that keep the aggregators' random streams apart from everything else (public: the
# tests reproduce the noise and the quantization from them).
CODEC_SALT = 0x636F6465  # client: quantization / rotation-free randomness
NOISE_SALT = 0x6E6F6973  # server: DP noise
ROTATION_SALT = 0x726F7461  # run: the key of the shared rotations
COUNT_NOISE_SALT = 0x636F756E  # server: noise on the count of unclipped clients (adaptive clipping)
TREE_SALT = 0x74726565  # run: the key of DP-FTRL's tree-aggregation noise (every node a function of it)

# The names of the metrics the aggregators add to each client's `Contribution.metrics` (summed over the
# round's clients; `round_log` turns them into per-client means and fractions).
TRANSFORM_METRICS = ("clients", "bits", "update_norm", "clipped", "dp_clip_norm")


@dataclasses.dataclass
class ClientPass:
    """One client's update on its way through the chain (what the stages' `client` read and change)."""

    update: jax.Array  # the flat float32 update, as the stages so far left it
    key: jax.Array | None  # the client's key (of seed, round, client)
    own: Mapping[str, Any]  # the chain's own broadcast entries (round_key, clip_norm)
    stored: Mapping[str, Any]  # the chain's own stored entries (residual)
    base_broadcast: Any
    base_name: str
    base_parts: list[str]  # what the base sends besides `weighted`, by name
    weight: Any  # None: the base's (or the runner's)
    summed: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    new_stored: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ServerPass:
    """The round's flat sum on its way back through the chain (what the stages' `server` read and change)."""

    flat: jax.Array  # S (in the summation domain of the stages still to undo)
    weight: jax.Array  # W
    summed: dict[str, Any]  # the stages' own summed parts (e.g. unclipped_centred)
    own: dict[str, Any]  # the chain's own server state; updated in place
    round: jax.Array
    rng: jax.Array | None
    size: int  # n, the model's number of entries


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """One stage of an `Aggregated` chain: a client part, a server part, and their state.

    Subclasses override what they need; the defaults do nothing.
    """

    # The server update must run even in a round without clients (e.g. the noise of DP).
    updates_on_empty_rounds = False

    @property
    def has_server_work(self) -> bool:
        """Whether `server` changes the flat sum (then the chain flattens it)."""
        return False

    @property
    def has_server_state(self) -> bool:
        """Whether `server_init` gives the stage entries of its own in ServerState.extra."""
        return self.has_server_work

    def check(self, chain: "Aggregated") -> None:
        """Refuses a chain this stage cannot be part of (ValueError)."""

    def server_init(self, rng: jax.Array, size: int = 0) -> dict[str, Any]:
        """The stage's own entries of ServerState.extra (`size`: the entries of the model's flat update)."""
        return {}

    def broadcast(self, own: Mapping[str, Any], round: jax.Array) -> dict[str, Any]:
        """The stage's own broadcast entries, from its server state."""
        return {}

    def client_template(self, size: int) -> dict[str, Any]:
        """The stage's own per-client stored entries (zeros), for an update of `size` entries."""
        return {}

    def client(self, p: ClientPass, chain: "Aggregated") -> None:
        """Transforms the client's update (`p.update`), adds metrics, summed parts, stored state."""

    def server(self, p: ServerPass, chain: "Aggregated") -> None:
        """Undoes / finishes the stage on the round's sum (`p.flat`, `p.weight`, `p.own`)."""


@dataclasses.dataclass(frozen=True)
class Compress(Aggregator):
    """Compresses each client's update with `codec` (fedstream.algorithms.compression: quantize, rotate,
    DRIVE, top-k with error feedback); the server sums the decoded updates and applies R^{-1} once to the sum
    for rotating codecs. Logs the bits sent."""

    codec: Codec = Codec()

    @property
    def has_server_work(self) -> bool:
        return self.codec.rotates

    def server_init(self, rng: jax.Array, size: int = 0) -> dict[str, Any]:
        if not self.codec.rotates:
            return {}
        key = rng if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.key_data(rng)
        return {"transform_key": jax.random.fold_in(key, ROTATION_SALT)}

    def broadcast(self, own: Mapping[str, Any], round: jax.Array) -> dict[str, Any]:
        """The key of the round's rotation R: fold_in(fold_in(key(seed), salt), round), shared by all clients."""
        return {"round_key": jax.random.fold_in(own["transform_key"], round)} if self.codec.rotates else {}

    def client_template(self, size: int) -> dict[str, Any]:
        return {"residual": jnp.zeros((size,), jnp.float32)} if self.codec.stateful else {}

    def client(self, p: ClientPass, chain: "Aggregated") -> None:
        if self.codec.rotates or self.codec.stateful:
            _check_model_shaped(p.update.shape[0], p.base_broadcast)
        residual = p.stored["residual"] if self.codec.stateful else None
        key = jax.random.fold_in(p.key, CODEC_SALT) if p.key is not None else jax.random.PRNGKey(0)
        decoded, new_residual, bits = self.codec.encode(p.update, key, p.own.get("round_key"), residual)
        p.update = decoded
        p.metrics["bits"] = bits
        if self.codec.stateful:
            p.new_stored["residual"] = new_residual

    def server(self, p: ServerPass, chain: "Aggregated") -> None:
        if self.codec.rotates:
            if p.flat.shape[0] != padded_size(p.size):
                raise ValueError("rotating codecs need an update shaped like the model")
            p.flat = self.codec.decode_sum(p.flat, jax.random.fold_in(p.own["transform_key"], p.round), p.size)


@dataclasses.dataclass(frozen=True)
class Clip(Aggregator):
    """Clips each client's update to L2 norm C: Delta * min(1, C / ||Delta||); logs the clipped fraction.

    Attributes:
      norm: C (> 0); with adaptive, the initial C_0.
      adaptive: adapt C each round towards the target_quantile of the update norms (Andrew et al. 2021;
        needs a GaussianNoise after it, which noises the count and whose denominator it uses).
      target_quantile: gamma, the fraction of clients whose update should be unclipped.
      learning_rate: eta_C of the geometric update C_{t+1} = C_t exp(-eta_C (b_bar - gamma)).
      count_stddev: sigma_b, noise std of the count of unclipped clients (None = D / 20).
    """

    norm: float = 0.0
    adaptive: bool = False
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        if not self.norm > 0:
            raise ValueError(f"Clip needs a clip norm > 0, got {self.norm}")
        if self.adaptive:
            if not 0.0 <= self.target_quantile <= 1.0:
                raise ValueError(f"target_quantile (dp_fedavg's target_unclipped_quantile) must be in [0, 1], got "
                                 f"{self.target_quantile}")
            if self.learning_rate < 0:
                raise ValueError(f"learning_rate (dp_fedavg's clip_learning_rate) must be >= 0, got {self.learning_rate}")
            if self.count_stddev is not None and self.count_stddev < 0:
                raise ValueError(f"count_stddev (dp_fedavg's clipped_count_stddev) must be >= 0, got {self.count_stddev}")

    @property
    def has_server_work(self) -> bool:
        return self.adaptive

    def count_noise_stddev(self, denominator: float) -> float:
        """sigma_b: count_stddev, by default D / 20 (Andrew et al. 2021)."""
        return denominator / 20.0 if self.count_stddev is None else float(self.count_stddev)

    def check(self, chain: "Aggregated") -> None:
        if self.adaptive and chain.noise_stage is None:
            raise ValueError("adaptive clipping needs DP: a GaussianNoise after the Clip (its denominator and the "
                             "noise of the count)")

    def server_init(self, rng: jax.Array, size: int = 0) -> dict[str, Any]:
        return {"clip_norm": jnp.asarray(self.norm, jnp.float32)} if self.adaptive else {}

    def broadcast(self, own: Mapping[str, Any], round: jax.Array) -> dict[str, Any]:
        return {"clip_norm": own["clip_norm"]} if self.adaptive else {}

    def client(self, p: ClientPass, chain: "Aggregated") -> None:
        """With adaptive clipping the norm is the broadcast C_t, and the client also sends, in `summed`,
        "unclipped_centred": b_i - 1/2 with b_i = 1[||Delta_i|| <= C_t] (noised on the server, not a metric)."""
        norm = jnp.linalg.norm(p.update)
        p.metrics["update_norm"] = norm
        clip = p.own["clip_norm"] if self.adaptive else self.norm
        p.update = p.update * jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
        p.metrics["clipped"] = (norm > clip).astype(jnp.float32)
        if self.adaptive:
            p.metrics["dp_clip_norm"] = clip
            p.summed["unclipped_centred"] = (norm <= clip).astype(jnp.float32) - 0.5

    def server(self, p: ServerPass, chain: "Aggregated") -> None:
        if not self.adaptive:
            return
        unclipped_centred = p.summed.pop("unclipped_centred", None)
        if unclipped_centred is None:
            raise ValueError("adaptive clipping's server update needs the clients' 'unclipped_centred'")
        if p.rng is None:
            raise ValueError("adaptive clipping's server update needs the round's server key")
        denominator = chain.noise_stage.denominator
        count_noise = jax.random.normal(jax.random.fold_in(p.rng, COUNT_NOISE_SALT), (), jnp.float32)
        p.own["clip_norm"] = adapted_clip_norm(
            p.own["clip_norm"], unclipped_centred, self.count_noise_stddev(denominator) * count_noise, denominator,
            self.learning_rate, self.target_quantile)


@dataclasses.dataclass(frozen=True)
class Accounting:
    """What the privacy accountant needs of a run's DP mechanism (declared by `GaussianNoise`).

    The training loop owns the ledger: `fedstream.training.simulation.open_privacy_ledger`.
    """

    mechanism: DPMechanism | TreeMechanism
    target_delta: float
    accountant: str = "rdp"
    description: str = ""  # one line for the run's log

    def new_ledger(self) -> PrivacyLedger:
        """A fresh ledger of this mechanism."""
        return PrivacyLedger(self.mechanism, self.target_delta, self.accountant)


@dataclasses.dataclass(frozen=True)
class GaussianNoise(Aggregator):
    """The Gaussian mechanism on the sum of clipped updates: S + N(0, (z C)^2 I), divided by a fixed D.

    Each client is given weight 1 (the sum's L2 sensitivity is the Clip's C); the server adds the noise
    (server key folded with NOISE_SALT) and replaces the weight sum by the public denominator D. With an
    adaptive Clip, z is the overall multiplier and the sum gets z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    Attributes:
      noise_multiplier: z (>= 0), the overall noise multiplier the ledger accounts.
      denominator: D > 0, the expected clients per round (q N under Poisson sampling, else the cohort size).
      mechanism: one round as the accountant sees it (sampling, population); None: not accounted.
      target_delta: the delta of (epsilon, delta)-DP the ledger reports epsilon at.
      accountant: 'rdp' or 'pld' (Google's dp-accounting).
    """

    noise_multiplier: float = 0.0
    denominator: float = 0.0
    mechanism: DPMechanism | None = None
    target_delta: float = 0.0
    accountant: str = "rdp"

    updates_on_empty_rounds = True

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.denominator <= 0:
            raise ValueError("DP-FedAvg needs a fixed denominator D > 0 (expected clients per round)")

    @property
    def has_server_work(self) -> bool:
        return True

    @property
    def has_server_state(self) -> bool:
        return False

    def check(self, chain: "Aggregated") -> None:
        stages = chain.stages
        if stages.index(self) != len(stages) - 1 or chain.clip_stage is None:
            raise ValueError("GaussianNoise needs a Clip before it (the sensitivity) and comes last in the chain")
        if any(isinstance(s, Compress) for s in stages[stages.index(chain.clip_stage):]):
            raise ValueError("with GaussianNoise, Compress must come before Clip (so that the L2 bound holds for "
                             "what the server sums)")
        if chain.base.uses_prepass:
            raise ValueError(f"DP over {type(chain.base).__name__}: its prepass sums per-client statistics outside "
                             "the Gaussian mechanism")
        if chain.clip_stage.adaptive:
            delta_noise_multiplier(self.noise_multiplier, chain.clip_stage.count_noise_stddev(self.denominator))

    def delta_multiplier(self, clip: Clip) -> float:
        """The noise multiplier on the sum: z, or z_Delta with adaptive clipping."""
        if not clip.adaptive:
            return self.noise_multiplier
        return delta_noise_multiplier(self.noise_multiplier, clip.count_noise_stddev(self.denominator))

    def accounting(self, clip_norm: float = 0.0) -> Accounting | None:
        """The mechanism the training loop's ledger accounts (None without sampling facts)."""
        if self.mechanism is None:
            return None
        return Accounting(self.mechanism, self.target_delta, self.accountant,
                          f"DP-FedAvg: clip C={clip_norm:g}, noise multiplier z={self.noise_multiplier:.4g}, "
                          f"denominator D={self.denominator:g}, {self.mechanism.sampling} sampling, "
                          f"{self.accountant} accountant, delta={self.target_delta:.3g}")

    def client(self, p: ClientPass, chain: "Aggregated") -> None:
        if p.base_parts:
            raise ValueError(f"DP over {p.base_name}: its clients also send {p.base_parts}, which the Gaussian "
                             "mechanism does not cover; DP composes with fedavg-like algorithms (fedavg, fedprox)")
        p.weight = jnp.ones((), jnp.float32)

    def server(self, p: ServerPass, chain: "Aggregated") -> None:
        if p.rng is None:
            raise ValueError("DP-FedAvg's server update needs the round's server key")
        clip = chain.clip_stage
        noise = jax.random.normal(jax.random.fold_in(p.rng, NOISE_SALT), p.flat.shape, p.flat.dtype)
        if clip.adaptive:
            p.flat = p.flat + (self.delta_multiplier(clip) * p.own["clip_norm"]) * noise
        else:
            p.flat = p.flat + (self.noise_multiplier * clip.norm) * noise
        p.weight = jnp.asarray(self.denominator, jnp.float32)


def tree_levels(restart_every: int) -> int:
    """Levels of a tree of k = `restart_every` leaves whose nodes a prefix sum can use: ceil(log2(k + 1))."""
    return max(1, int(restart_every).bit_length())


def tree_node_noise(tree_key: jax.Array, restart: jax.Array, level: int | jax.Array, index: jax.Array,
                    size: int) -> jax.Array:
    """N(0, I) of one tree node: node `index` of `level` (leaves [index 2^level + 1, (index + 1) 2^level]) of tree
    number `restart`, drawn from fold_in(fold_in(fold_in(tree_key, restart), level), index) (float32, `size`)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(tree_key, restart), level), index)
    return jax.random.normal(key, (size,), jnp.float32)


def tree_prefix_noise(tree_key: jax.Array, restart: jax.Array, t: jax.Array, size: int, levels: int) -> jax.Array:
    """The N(0, I) sum of the nodes that cover leaves 1..t of tree `restart` (t >= 1, t < 2^levels).

    Binary tree aggregation (Dwork et al. 2010; Kairouz et al. 2021): for
    every bit l set in t, the node of level l that ends at leaf
    (t >> l) 2^l, i.e. index (t >> l) - 1. At most `levels` nodes, each a pure
    function of (key, restart, level, index), so nothing but t is carried
    between rounds.
    """
    total = jnp.zeros((size,), jnp.float32)
    for level in range(levels):  # `levels` normal draws per round, a small cost next to the clients' training
        node = tree_node_noise(tree_key, restart, level, (t >> level) - 1, size)
        total = total + jnp.where((t >> level) & 1 == 1, node, 0.0)
    return total


@dataclasses.dataclass(frozen=True)
class TreeNoise(GaussianNoise):
    """Tree aggregation of the rounds' sums (DP-FTRL, Kairouz et al. 2021): noisy prefix sums, not noisy sums.

    Each client has weight 1 (its clipped update, norm <= C, is the sum's
    sensitivity). Rounds are grouped in trees of k = `restart_every` rounds
    (tree r' = round // k, leaf t = round % k + 1); every tree node gets
    N(0, (z C)^2 I) (`tree_node_noise`, from the run's key folded with
    TREE_SALT). The server keeps the tree's clean prefix sum P_t = sum of the
    tree's round sums so far (reset at each restart) and hands the base
    P_t + z C (sum of the nodes that cover leaves 1..t) with weight D, so
    the base (an FTRL server, `fedstream.algorithms.dp_ftrl.FTRL`) reads the
    noisy prefix sum of its tree. State: "tree_key" and "prefix_sum".

    Attributes:
      restart_every: k, rounds per tree (the tree, and the FTRL base, restart every k rounds).
    """

    restart_every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restart_every < 1:
            raise ValueError(f"restart_every must be >= 1 (rounds per tree), got {self.restart_every}")

    @property
    def has_server_state(self) -> bool:
        return True

    @property
    def levels(self) -> int:
        """ceil(log2(k + 1)): the most nodes a prefix of a tree of k leaves is made of."""
        return tree_levels(self.restart_every)

    def check(self, chain: "Aggregated") -> None:
        super().check(chain)
        if chain.clip_stage.adaptive:
            raise ValueError("TreeNoise (DP-FTRL) takes a fixed clip norm, not adaptive clipping")
        if not getattr(chain.base, "consumes_prefix_sums", False):
            raise ValueError(f"TreeNoise hands on noisy prefix sums; {type(chain.base).__name__}'s server update "
                             "expects a round's sum: use fedstream.algorithms.dp_ftrl.FTRL (dp_ftrl)")
        if getattr(chain.base, "restart_every", self.restart_every) != self.restart_every:
            raise ValueError("TreeNoise and its FTRL base must restart every the same number of rounds")

    def server_init(self, rng: jax.Array, size: int = 0) -> dict[str, Any]:
        key = rng if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.key_data(rng)
        return {"tree_key": jax.random.fold_in(key, TREE_SALT), "prefix_sum": jnp.zeros((size,), jnp.float32)}

    def accounting(self, clip_norm: float = 0.0) -> Accounting | None:
        if self.mechanism is None:
            return None
        return Accounting(self.mechanism, self.target_delta, self.accountant,
                          f"DP-FTRL: clip C={clip_norm:g}, noise multiplier z={self.noise_multiplier:.4g} per tree "
                          f"node, denominator D={self.denominator:g}, tree restart every {self.restart_every} "
                          f"rounds, epochs of {self.mechanism.epoch_rounds} rounds, {self.accountant} accountant, "
                          f"delta={self.target_delta:.3g}")

    def server(self, p: ServerPass, chain: "Aggregated") -> None:
        restart, leaf = p.round // self.restart_every, p.round % self.restart_every + 1
        prefix = jnp.where(leaf == 1, 0.0, p.own["prefix_sum"]) + p.flat
        p.own["prefix_sum"] = prefix
        noise = tree_prefix_noise(p.own["tree_key"], restart, leaf, p.flat.shape[0], self.levels)
        p.flat = prefix + (self.noise_multiplier * chain.clip_stage.norm) * noise
        p.weight = jnp.asarray(self.denominator, jnp.float32)


@dataclasses.dataclass(frozen=True, init=False)
class Aggregated(Algorithm):
    """`base` with its client updates passed through `stages` (see the module docstring).

    `Aggregated(base, [Compress(codec), Clip(C), GaussianNoise(z, denominator=D)])`; the model and the
    optimizers are the base's. Every hook is the base's except `client_contribution` and `server_update`
    (and the state they need).
    """

    base: Algorithm | None = None
    stages: tuple[Aggregator, ...] = ()

    def __init__(self, base: Algorithm, stages: Sequence[Aggregator] = (), *, model: Any = None,
                 client_optimizer: Any = None, server_optimizer: Any = None) -> None:
        """`model` and the optimizers are the base's (accepted, if the same, so that dataclasses.replace works)."""
        if not isinstance(base, Algorithm):
            raise TypeError(f"Aggregated wraps an Algorithm, got {type(base).__name__}")
        for name, given in (("model", model), ("client_optimizer", client_optimizer),
                            ("server_optimizer", server_optimizer)):
            if given is not None and given is not getattr(base, name):
                raise ValueError(f"Aggregated takes its {name} from its base: set it there")
        if isinstance(base, Aggregated):
            raise ValueError("aggregators do not nest: put all the stages in one Aggregated")
        stages = tuple(stages)
        for kind in (Compress, Clip, GaussianNoise):
            if sum(isinstance(s, kind) for s in stages) > 1:
                raise ValueError(f"a chain takes at most one {kind.__name__}")
        for s in stages:
            if not isinstance(s, Aggregator):
                raise TypeError(f"stages must be Aggregators (Compress, Clip, GaussianNoise), got {type(s).__name__}")
        for name, value in (("model", base.model), ("client_optimizer", base.client_optimizer),
                            ("server_optimizer", base.server_optimizer), ("base", base), ("stages", stages)):
            object.__setattr__(self, name, value)
        for s in stages:
            s.check(self)

    # -- the chain's parts and a summary of its options --

    def _stage(self, kind: type) -> Any:
        return next((s for s in self.stages if isinstance(s, kind)), None)

    @property
    def clip_stage(self) -> Clip | None:
        """The chain's Clip, if any."""
        return self._stage(Clip)

    @property
    def noise_stage(self) -> GaussianNoise | None:
        """The chain's GaussianNoise, if any."""
        return self._stage(GaussianNoise)

    @property
    def codec(self) -> Codec:
        """The chain's codec (identity without a Compress)."""
        compress = self._stage(Compress)
        return compress.codec if compress is not None else Codec()

    @property
    def dp(self) -> bool:
        """Whether updates are clipped and noised."""
        return self.noise_stage is not None

    @property
    def adaptive(self) -> bool:
        """Whether the clip norm adapts per round."""
        return self.clip_stage is not None and self.clip_stage.adaptive

    @property
    def clip_norm(self) -> float:
        """C (C_0 with adaptive clipping); 0 without a Clip."""
        return self.clip_stage.norm if self.clip_stage is not None else 0.0

    @property
    def noise_multiplier(self) -> float:
        """z, the overall noise multiplier; 0 without DP."""
        return self.noise_stage.noise_multiplier if self.dp else 0.0

    @property
    def denominator(self) -> float:
        """D of the noised mean; 0 without DP."""
        return self.noise_stage.denominator if self.dp else 0.0

    @property
    def mechanism(self) -> DPMechanism | None:
        """The accounted mechanism of one round (None without DP or sampling facts)."""
        return self.noise_stage.mechanism if self.dp else None

    @property
    def target_delta(self) -> float:
        """The delta the ledger reports epsilon at; 0 without DP."""
        return self.noise_stage.target_delta if self.dp else 0.0

    @property
    def count_noise_stddev(self) -> float:
        """sigma_b of adaptive clipping."""
        return self.clip_stage.count_noise_stddev(self.denominator)

    @property
    def delta_noise_multiplier(self) -> float:
        """The noise multiplier on the delta sum: z, or z_Delta with adaptive clipping."""
        return self.noise_stage.delta_multiplier(self.clip_stage) if self.dp else 0.0

    def privacy_accounting(self) -> Accounting | None:
        """The GaussianNoise's declared mechanism, for the training loop's privacy ledger (None without DP)."""
        return self.noise_stage.accounting(self.clip_norm) if self.dp else None

    # -- capabilities: the base's, and the stages' --

    @property
    def uses_prepass(self) -> bool:  # type: ignore[override]
        return self.base.uses_prepass

    @property
    def extra_features(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.base.extra_features

    @property
    def has_client_state(self) -> bool:  # type: ignore[override]
        """The base's client state, and / or a stage's (the residual of error feedback)."""
        return self.base.has_client_state or self.codec.stateful

    @property
    def has_personal_models(self) -> bool:  # type: ignore[override]
        return self.base.has_personal_models

    @property
    def per_client_broadcast(self) -> bool:  # type: ignore[override]
        return self.base.per_client_broadcast

    @property
    def slot_features(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.base.slot_features

    @property
    def is_asynchronous(self) -> bool:  # type: ignore[override]
        return self.base.is_asynchronous

    @property
    def is_clustered(self) -> bool:  # type: ignore[override]
        return self.base.is_clustered

    @property
    def updates_on_empty_rounds(self) -> bool:  # type: ignore[override]
        """The base's, or True with DP: a round without clients still releases noise / D."""
        return self.base.updates_on_empty_rounds or any(s.updates_on_empty_rounds for s in self.stages)

    def __getattr__(self, name: str) -> Any:
        """Other attributes (e.g. HypCluster's num_clusters, read by the train loop) are the base's."""
        if name in ("base", "stages") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    # -- state plumbing --

    @property
    def _nested(self) -> bool:
        return any(s.has_server_state for s in self.stages)

    def _base_state(self, state: ServerState) -> ServerState:
        return state.replace(extra=state.extra.get("inner")) if self._nested else state

    def _own(self, state: ServerState) -> dict[str, Any]:
        return {k: v for k, v in state.extra.items() if k != "inner"} if self._nested else {}

    def _outer_state(self, inner: ServerState, own: Mapping[str, Any]) -> ServerState:
        if not self._nested:
            return inner
        extra = dict(own)
        if inner.extra is not None:
            extra["inner"] = inner.extra
        return inner.replace(extra=extra)

    def _split(self, broadcast: Any) -> tuple[Any, dict[str, Any]]:
        if not self._nested:
            return broadcast, {}
        return broadcast["inner"], {k: v for k, v in broadcast.items() if k != "inner"}

    def _join(self, inner_broadcast: Any, own: Mapping[str, Any]) -> Any:
        return {"inner": inner_broadcast, **own} if self._nested else inner_broadcast

    @staticmethod
    def _base_stored(stored: Any) -> Any:
        return stored.get("inner") if isinstance(stored, dict) else None

    # -- hooks --

    def init(self, rng: jax.Array) -> ServerState:
        """The base's state, with the stages' own entries next to its extra."""
        state = self.base.init(rng)
        own: dict[str, Any] = {}
        size = ravel_pytree(state.params)[0].shape[0] if any(s.has_server_state for s in self.stages) else 0
        for s in self.stages:
            own.update(s.server_init(rng, size))
        return self._outer_state(state, own)

    def client_state_template(self, params: Params) -> Any:
        """{"inner": the base's client state, "residual": ...}, present parts only."""
        if not self.has_client_state:
            return None
        template = {}
        if self.base.has_client_state:
            template["inner"] = self.base.client_state_template(params)
        size = ravel_pytree(params)[0].shape[0]
        for s in self.stages:
            template.update(s.client_template(size))
        return template

    def personal_model(self, stored: Any, params: Params = None) -> tuple[Params, Any]:
        return self.base.personal_model(stored["inner"], params)

    def log_values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The base's log values of its own metrics, and the aggregators' (`round_log`)."""
        inner = self.base.log_values({k: v for k, v in metrics.items() if k not in TRANSFORM_METRICS})
        return {**inner, **round_log(metrics)}

    def broadcast(self, state: ServerState) -> Any:
        own: dict[str, Any] = {}
        extra = self._own(state)
        for s in self.stages:
            own.update(s.broadcast(extra, state.round))
        return self._join(self.base.broadcast(self._base_state(state)), own)

    def client_broadcast(self, broadcast: Any, slot: Mapping[str, jax.Array]) -> Any:
        inner, own = self._split(broadcast)
        return self._join(self.base.client_broadcast(inner, slot), own)

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> Any:
        return self.base.client_init(self._split(broadcast)[0], self._base_stored(stored), prepass)

    def client_loss(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any) -> tuple[jax.Array, jax.Array]:
        return self.base.client_loss(params, batch, rng, self._split(broadcast)[0])

    def client_step(self, state: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[Any, TrainMetrics]:
        return self.base.client_step(state, batch, rng, self._split(broadcast)[0])

    def client_delta(self, state: Any, server_params: Params) -> Params:
        return self.base.client_delta(state, server_params)

    def prepass_step(self, broadcast: Any, batch: Mapping[str, jax.Array]) -> Any:
        return self.base.prepass_step(self._split(broadcast)[0], batch)

    def after_prepass(self, broadcast: Any, total: Any) -> Any:
        inner, own = self._split(broadcast)
        return self._join(self.base.after_prepass(inner, total), own)

    def client_contribution(self, client: Any, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """The base's contribution with its update passed through the stages; adds `TRANSFORM_METRICS`."""
        base_broadcast, own = self._split(broadcast)
        contribution, base_stored = self.base.client_contribution(
            client, base_broadcast, weight, self._base_stored(stored), prepass, rng)
        clash = sorted(set(contribution.metrics) & set(TRANSFORM_METRICS))
        if clash:
            raise ValueError(f"{type(self.base).__name__}'s metrics {clash} clash with the names of the DP / "
                             f"compression metrics {TRANSFORM_METRICS}; rename them")
        flat, unravel = ravel_pytree(contribution.weighted)
        p = ClientPass(update=flat.astype(jnp.float32), key=rng, own=own,
                       stored=stored if isinstance(stored, dict) else {}, base_broadcast=base_broadcast,
                       base_name=type(self.base).__name__, base_parts=_named_parts(contribution),
                       weight=contribution.weight)
        p.metrics["clients"] = jnp.float32(1)
        for s in self.stages:
            s.client(p, self)
        if "bits" not in p.metrics:  # sent as float32 numbers
            p.metrics["bits"] = jnp.float32(32 * p.update.shape[0])
        if "update_norm" not in p.metrics:
            p.metrics["update_norm"] = jnp.linalg.norm(p.update)
        metrics = {k: p.metrics[k] for k in TRANSFORM_METRICS if k in p.metrics}
        summed = contribution.summed
        if p.summed:
            summed = {**(summed or {}), **p.summed}
        out = Contribution(weighted=p.update if self.codec.rotates else unravel(p.update), summed=summed,
                           metrics={**contribution.metrics, **metrics}, weight=p.weight)
        new_stored = {}
        if base_stored is not None:
            new_stored["inner"] = base_stored
        new_stored.update(p.new_stored)
        return out, (new_stored or stored)

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """The stages' server parts in reverse order on the flat sum (noise, C_t, R^{-1}), then the base's."""
        base_state = self._base_state(state)
        own = self._own(state)
        mine = {"unclipped_centred"} if self.adaptive else set()  # the adaptive Clip's count, not the base's
        summed, parts = total.summed, {}
        if mine and isinstance(summed, Mapping):
            parts = {k: v for k, v in summed.items() if k in mine}
            summed = {k: v for k, v in summed.items() if k not in mine} or None
        weighted, weight = total.weighted, total.weight
        if any(s.has_server_work for s in self.stages):
            size = ravel_pytree(base_state.params)[0].shape[0]
            if self.codec.rotates:
                flat, (_, unravel) = weighted, ravel_pytree(base_state.params)
            else:
                flat, unravel = ravel_pytree(weighted)
            p = ServerPass(flat=flat, weight=weight, summed=parts, own=own, round=state.round, rng=rng, size=size)
            for s in reversed(self.stages):
                s.server(p, self)
            weighted, weight = unravel(p.flat), p.weight
        base_total = RoundTotal(weighted=weighted, weight=weight, summed=summed,
                                metrics={k: v for k, v in total.metrics.items() if k not in TRANSFORM_METRICS})
        return self._outer_state(self.base.server_update(base_state, base_total, rng), own)


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


def _check_model_shaped(size: int, broadcast: Any) -> None:
    params = broadcast.get("params") if isinstance(broadcast, dict) else None
    expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)) if params is not None else None
    if expected != size:
        raise ValueError(f"rotating / error-feedback codecs need an update shaped like the model ({expected} "
                         f"entries); this algorithm's update has {size}")


def round_log(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Log values of a round from the summed `TRANSFORM_METRICS` (the round's summed `Contribution.metrics`).

    Returns `transform_clients`, `bits_sent` (all clients), `bits_per_client`,
    `update_norm_mean` (pre-clip) and, with clipping, `dp_clipped_fraction`;
    with adaptive clipping `dp_clip_norm`, the C_t the round's clients were
    clipped to (each client adds the C_t it received, so the sum over the
    clients is divided by their number; NaN, like the other per-client means,
    in a round without clients). Empty without the aggregators' metrics;
    other metrics are ignored (`Aggregated.log_values` logs the base's).
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


__all__ = ["Aggregator", "Aggregated", "Compress", "Clip", "GaussianNoise", "TreeNoise", "Accounting", "ClientPass",
           "ServerPass", "round_log", "delta_noise_multiplier", "adapted_clip_norm", "TRANSFORM_METRICS",
           "CODEC_SALT", "NOISE_SALT", "ROTATION_SALT", "COUNT_NOISE_SALT", "TREE_SALT", "tree_prefix_noise",
           "tree_node_noise", "tree_levels"]
