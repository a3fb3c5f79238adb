"""Privacy accounting for DP-FedAvg with Google's `dp-accounting` (`pip install fedstream[dp]`).

The unit of privacy is a client (user-level DP, McMahan et al. 2018). One
round releases  sum_i clip_C(Delta_i) + N(0, (z C)^2 I)  over the sampled
clients, so as a `dp_accounting` event it is:

* Poisson sampling with rate q (add/remove-one neighbours; the L2
  sensitivity of the sum is C):
      PoissonSampledDpEvent(q, GaussianDpEvent(z))
  supported by the RDP and the PLD accountant.
* A fixed-size uniform cohort of m out of N clients (sampling without
  replacement; replace-one neighbours, N public; replacing one client moves
  the sum by up to 2C, so the noise is z C = (z / 2) * 2C):
      SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))
  supported by the RDP accountant only (dp-accounting's PLD accountant has no
  sampling-without-replacement event; asking for it is an error).

With adaptive clipping (Andrew et al. 2021) a round also releases a noised
count of unclipped clients; dp_fedavg splits z between the two releases
(z_Delta on the sum, sigma_b on the count) so that together they are one
Gaussian mechanism of multiplier z, and the events above keep using z.

DP-FTRL (Kairouz et al. 2021) releases noisy prefix sums through tree
aggregation instead, without sampling: `TreeMechanism` (see its docstring),
accounted with dp-accounting's SingleEpochTreeAggregationDpEvent under the
REPLACE_SPECIAL relation (one client's data replaced by the zero update),
RDP only.

T rounds compose to  SelfComposedDpEvent(event, T)  (a `ComposedDpEvent` of
such segments if the mechanism changed, e.g. after recalibration on resume).
`PrivacyLedger` holds that history as JSON (stored in the checkpoint's
metadata) and computes epsilon(delta) as a pure function of it, so a resumed
run reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping, Sequence, Union

ACCOUNTANTS = ("rdp", "pld")
PLD_DISCRETIZATION = 1e-4  # dp-accounting's default value_discretization_interval


class PrivacyLedgerError(ValueError):
    """The privacy accounting went wrong: epsilon fell between rounds, or a saved ledger disagrees with itself."""


def _dp() -> Any:
    try:
        import dp_accounting
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("privacy accounting needs the dp-accounting package: pip install 'fedstream[dp]'") from e
    return dp_accounting


@dataclasses.dataclass(frozen=True)
class DPMechanism:
    """One round of DP-FedAvg as the accountant sees it.

    `sampling` is 'poisson' (each of `population` clients with probability
    `sampling_rate`) or 'uniform' (`cohort_size` of `population` without
    replacement); `noise_multiplier` is z = noise std / clip norm.
    """

    noise_multiplier: float
    sampling: str
    population: int
    sampling_rate: float = 0.0
    cohort_size: int = 0

    def __post_init__(self) -> None:
        if self.sampling not in ("poisson", "uniform"):
            raise ValueError(f"sampling must be 'poisson' or 'uniform', got {self.sampling!r}")
        if self.noise_multiplier < 0 or self.population < 1:
            raise ValueError(f"need noise_multiplier >= 0 and population >= 1, got {self}")
        if self.sampling == "poisson" and not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError(f"Poisson sampling needs a rate in (0, 1], got {self.sampling_rate}")
        if self.sampling == "uniform" and not 1 <= self.cohort_size <= self.population:
            raise ValueError(f"uniform sampling needs 1 <= cohort_size <= population, got {self.cohort_size}")

    def event(self) -> Any:
        """The `dp_accounting.DpEvent` of one round (see the module docstring)."""
        dp = _dp()
        if self.sampling == "poisson":
            return dp.PoissonSampledDpEvent(self.sampling_rate, dp.GaussianDpEvent(self.noise_multiplier))
        return dp.SampledWithoutReplacementDpEvent(self.population, self.cohort_size,
                                                   dp.GaussianDpEvent(self.noise_multiplier / 2))

    def neighboring_relation(self) -> Any:
        """ADD_OR_REMOVE_ONE for Poisson sampling, REPLACE_ONE for fixed-size cohorts."""
        relation = _dp().NeighboringRelation
        return relation.ADD_OR_REMOVE_ONE if self.sampling == "poisson" else relation.REPLACE_ONE

    def with_noise(self, noise_multiplier: float) -> "DPMechanism":
        """The same sampling with another z."""
        return dataclasses.replace(self, noise_multiplier=float(noise_multiplier))

    def event_of(self, rounds: int) -> Any:
        """The event of `rounds` rounds: SelfComposedDpEvent(event(), rounds)."""
        return _dp().SelfComposedDpEvent(self.event(), int(rounds))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DPMechanism":
        return cls(float(d["noise_multiplier"]), str(d["sampling"]), int(d["population"]),
                   float(d.get("sampling_rate", 0.0)), int(d.get("cohort_size", 0)))


@dataclasses.dataclass(frozen=True)
class TreeMechanism:
    """DP-FTRL's rounds as the accountant sees them: tree-aggregated Gaussian noise on prefix sums.

    No sampling: each client takes part at most once per epoch of
    `epoch_rounds` rounds (sampling 'epochs'), in any order, and the tree
    restarts every `restart_rounds` rounds, a divisor of `epoch_rounds`, so
    that every tree lies inside one epoch and a client is in at most one
    tree per epoch. Each tree node gets N(0, (z C)^2 I); a client's clipped
    update (norm <= C) is in at most ceil(log2(k + 1)) of the nodes released
    over a tree of k rounds, so an epoch is a Gaussian mechanism of
    sensitivity C sqrt(ceil(log2(k + 1))) (Kairouz et al. 2021, Appendix D):
    dp-accounting's SingleEpochTreeAggregationDpEvent(z, [tree lengths of the
    epoch]), composed over epochs, with neighbours that replace one client's
    data by the zero update (REPLACE_SPECIAL; the paper's Definition 1.1).
    """

    noise_multiplier: float
    population: int
    epoch_rounds: int
    restart_rounds: int

    sampling: ClassVar[str] = "epochs"
    KIND: ClassVar[str] = "tree_aggregation"

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.population < 1 or self.epoch_rounds < 1:
            raise ValueError(f"need noise_multiplier >= 0, population >= 1 and epoch_rounds >= 1, got {self}")
        if self.restart_rounds < 1 or self.epoch_rounds % self.restart_rounds:
            raise ValueError(f"the tree must restart every k rounds with k dividing the {self.epoch_rounds} rounds "
                             f"of an epoch (so that a client is in at most one tree per epoch), got k = "
                             f"{self.restart_rounds}")

    def tree_lengths(self, rounds: int) -> list[list[int]]:
        """The trees of the first `rounds` rounds, per epoch: [[k, k, ...], ..., [k, ..., rest]]."""
        full, rest = divmod(int(rounds), self.epoch_rounds)
        k = self.restart_rounds
        epochs = [[k] * (self.epoch_rounds // k) for _ in range(full)]
        if rest:
            epochs.append([k] * (rest // k) + ([rest % k] if rest % k else []))
        return epochs

    def event_of(self, rounds: int) -> Any:
        """The event of the first `rounds` rounds: one SingleEpochTreeAggregationDpEvent per epoch, composed."""
        dp = _dp()
        full, rest = divmod(int(rounds), self.epoch_rounds)
        epochs = self.tree_lengths(rounds)
        events = []
        if full:
            events.append(dp.SelfComposedDpEvent(
                dp.SingleEpochTreeAggregationDpEvent(self.noise_multiplier, epochs[0]), full))
        if rest:
            events.append(dp.SingleEpochTreeAggregationDpEvent(self.noise_multiplier, epochs[-1]))
        return dp.ComposedDpEvent(events)

    def neighboring_relation(self) -> Any:
        """REPLACE_SPECIAL: one client's data replaced by the special client that sends the zero update."""
        return _dp().NeighboringRelation.REPLACE_SPECIAL

    def with_noise(self, noise_multiplier: float) -> "TreeMechanism":
        """The same trees with another z."""
        return dataclasses.replace(self, noise_multiplier=float(noise_multiplier))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.KIND, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TreeMechanism":
        return cls(float(d["noise_multiplier"]), int(d["population"]), int(d["epoch_rounds"]),
                   int(d["restart_rounds"]))


Mechanism = Union[DPMechanism, TreeMechanism]


def mechanism_from_json(d: Mapping[str, Any]) -> Mechanism:
    """A `DPMechanism` or (with kind 'tree_aggregation') a `TreeMechanism` from its `to_json()`."""
    kind = d.get("kind")
    if kind is None:
        return DPMechanism.from_json(d)
    if kind == TreeMechanism.KIND:
        return TreeMechanism.from_json(d)
    raise ValueError(f"unknown DP mechanism kind {kind!r}")


def make_accountant(kind: str, mechanism: Mechanism, pld_discretization: float = PLD_DISCRETIZATION) -> Any:
    """A fresh dp_accounting RdpAccountant or PLDAccountant with the mechanism's neighbouring relation."""
    dp = _dp()
    if kind == "rdp":
        return dp.rdp.RdpAccountant(neighboring_relation=mechanism.neighboring_relation())
    if kind == "pld":
        if isinstance(mechanism, TreeMechanism):
            raise ValueError("dp-accounting's PLD accountant does not support tree aggregation (DP-FTRL): use "
                             "accountant='rdp'")
        if mechanism.sampling != "poisson":
            raise ValueError("dp-accounting's PLD accountant does not support sampling without replacement "
                             "(fixed-size uniform cohorts): use accountant='rdp', or Poisson sampling")
        return dp.pld.PLDAccountant(mechanism.neighboring_relation(), value_discretization_interval=pld_discretization)
    raise ValueError(f"unknown accountant {kind!r}; known: {', '.join(ACCOUNTANTS)}")


@functools.lru_cache(maxsize=32)
def _rdp_of_one_round(mechanism: DPMechanism) -> tuple[Any, Any]:
    """(orders, RDP of one round) from a fresh RdpAccountant that composed the event once."""
    accountant = make_accountant("rdp", mechanism)
    accountant.compose(mechanism.event())
    return accountant.orders, accountant.rdp


@functools.lru_cache(maxsize=32)
def _pld_of_one_round(mechanism: DPMechanism, discretization: float) -> Any:
    """The privacy-loss distribution of one round, as PLDAccountant builds it."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=mechanism.noise_multiplier, value_discretization_interval=discretization,
        sampling_prob=mechanism.sampling_rate, neighboring_relation=mechanism.neighboring_relation())


def epsilon_of(segments: Sequence[tuple[DPMechanism, int]], delta: float, accountant: str = "rdp",
               pld_discretization: float = PLD_DISCRETIZATION) -> float:
    """epsilon(delta) of composing each (mechanism, rounds) segment in order.

    Equal to `make_accountant(...).compose(ComposedDpEvent([SelfComposedDpEvent(m.event(), r), ...]))
    .get_epsilon(delta)`, computed from a cached one-round RDP vector / PLD
    (the accountants compose a count exactly so: rdp += count * rdp_1; pld
    <- pld.compose(pld_1.self_compose(count))).
    """
    segments = [(m, int(r)) for m, r in segments if int(r) > 0]
    if not segments:
        return 0.0
    if any(m.noise_multiplier == 0 for m, _ in segments):
        return math.inf
    if any(isinstance(m, TreeMechanism) for m, _ in segments):
        if len(segments) != 1:
            raise ValueError("tree aggregation (DP-FTRL) is accounted over one mechanism for the whole run; the "
                             "segments mix mechanisms")
        (mechanism, rounds), = segments
        return float(make_accountant(accountant, mechanism).compose(mechanism.event_of(rounds)).get_epsilon(delta))
    if accountant == "rdp":
        import numpy as np
        from dp_accounting.rdp import rdp_privacy_accountant

        orders, total = None, None
        for mechanism, rounds in segments:
            orders, one = _rdp_of_one_round(mechanism)
            total = np.zeros_like(one) if total is None else total
            if total.shape != one.shape:
                raise ValueError("segments mix RDP order sets")
            total += rounds * one
        return float(rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])
    if accountant == "pld":
        from dp_accounting.pld import privacy_loss_distribution

        for mechanism, _ in segments:
            make_accountant("pld", mechanism, pld_discretization)  # refuses what PLD cannot account
        pld = privacy_loss_distribution.identity(value_discretization_interval=pld_discretization)
        for mechanism, rounds in segments:
            pld = pld.compose(_pld_of_one_round(mechanism, pld_discretization).self_compose(rounds))
        return float(pld.get_epsilon_for_delta(delta))
    raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")


def calibrate_noise_multiplier(mechanism: Mechanism, rounds: int, target_epsilon: float, target_delta: float,
                               accountant: str = "rdp", tol: float = 1e-4,
                               pld_discretization: float = PLD_DISCRETIZATION) -> float:
    """The smallest z (within `tol`) whose `rounds`-fold composition has epsilon(target_delta) <= target_epsilon.

    Uses `dp_accounting.calibrate_dp_mechanism` (Brent's method, which
    guarantees the returned z meets the target) with the mechanism's sampling.
    """
    dp = _dp()
    if rounds < 1 or target_epsilon <= 0 or not 0 < target_delta < 1:
        raise ValueError(f"calibration needs rounds >= 1, target_epsilon > 0, 0 < target_delta < 1; got "
                         f"{rounds}, {target_epsilon}, {target_delta}")
    z = dp.calibrate_dp_mechanism(
        lambda: make_accountant(accountant, mechanism, pld_discretization),
        lambda noise: mechanism.with_noise(noise).event_of(int(rounds)),
        target_epsilon, target_delta, tol=tol)
    return float(z)


def noise_for_target(mechanism: Mechanism | None, noise_multiplier: float, target_epsilon: float, target_delta: float,
                     rounds: int, accountant: str, needs: str) -> tuple[float, Mechanism | None]:
    """(z, mechanism): the configured z, or with target_epsilon > 0 the z calibrated so that `rounds` rounds end there.

    `needs` names, in the error, what the calibration needs besides the rounds (the run's population, ...).
    """
    if not target_epsilon > 0:
        return noise_multiplier, mechanism
    if noise_multiplier:
        raise ValueError("set either noise_multiplier or target_epsilon, not both")
    if mechanism is None or rounds < 1:
        raise ValueError(f"target_epsilon needs {needs} and num_rounds (or calibration_rounds)")
    z = calibrate_noise_multiplier(mechanism, rounds, target_epsilon, target_delta, accountant)
    return z, mechanism.with_noise(z)


class PrivacyLedger:
    """Rounds of DP-FedAvg spent so far, and epsilon(delta) of them.

    State (`to_json`): the accountant, delta, and segments
    [{"mechanism": DPMechanism.to_json(), "rounds": r}, ...], in order. The
    train loop calls `record_round()` after every round, logs `epsilon()`,
    and stores `to_json()` in the checkpoint metadata; `from_json` resumes it.
    """

    def __init__(self, mechanism: Mechanism, target_delta: float, accountant: str = "rdp",
                 segments: Sequence[tuple[Mechanism, int]] = (), pld_discretization: float = PLD_DISCRETIZATION
                 ) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        if accountant == "pld":
            make_accountant("pld", mechanism, pld_discretization)  # refuses uniform sampling now, not mid-run
        self.mechanism = mechanism
        self.target_delta = float(target_delta)
        self.accountant = accountant
        self.pld_discretization = float(pld_discretization)
        self.segments: list[tuple[Mechanism, int]] = [(m, int(r)) for m, r in segments]
        self._check_tree(mechanism)

    @property
    def rounds(self) -> int:
        """Rounds recorded so far."""
        return sum(r for _, r in self.segments)

    def _check_tree(self, mechanism: Mechanism) -> None:
        """Refuses a change of mechanism in a DP-FTRL run (its trees are accounted as one mechanism)."""
        kinds = [m for m, _ in self.segments] + [mechanism]
        if any(isinstance(m, TreeMechanism) for m in kinds) and any(m != kinds[0] for m in kinds):
            raise PrivacyLedgerError(f"DP-FTRL's tree aggregation is accounted for one mechanism over the whole run; "
                                     f"it changed from {kinds[0]} to {mechanism} (a new noise_multiplier, "
                                     "clients_per_round or restart_every on resume, or target_epsilon recalibrated for "
                                     "a new num_rounds: keep the run's settings, e.g. set calibration_rounds)")

    def record_round(self, rounds: int = 1, mechanism: Mechanism | None = None) -> None:
        """Adds `rounds` rounds of `mechanism` (default: the ledger's current one)."""
        mechanism = mechanism or self.mechanism
        self._check_tree(mechanism)
        if self.segments and self.segments[-1][0] == mechanism:
            self.segments[-1] = (mechanism, self.segments[-1][1] + int(rounds))
        else:
            self.segments.append((mechanism, int(rounds)))

    def epsilon(self, delta: float | None = None) -> float:
        """epsilon(delta) of the rounds so far (delta defaults to the ledger's target_delta)."""
        return epsilon_of(self.segments, self.target_delta if delta is None else float(delta), self.accountant,
                          self.pld_discretization)

    def event(self) -> Any:
        """The composed dp_accounting event of the rounds so far."""
        dp = _dp()
        return dp.ComposedDpEvent([m.event_of(r) for m, r in self.segments])

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable state (plain dicts, lists, numbers and strings)."""
        return {"version": 1, "accountant": self.accountant, "target_delta": self.target_delta,
                "pld_discretization": self.pld_discretization, "rounds": self.rounds,
                "mechanism": self.mechanism.to_json(),
                "segments": [{"mechanism": m.to_json(), "rounds": r} for m, r in self.segments]}

    @classmethod
    def from_json(cls, state: Mapping[str, Any], mechanism: Mechanism | None = None) -> "PrivacyLedger":
        """The ledger of `to_json()`; later rounds use `mechanism` if given (else the saved one)."""
        if int(state.get("version", 1)) != 1:
            raise ValueError(f"unknown privacy ledger version {state.get('version')}")
        segments = [(mechanism_from_json(s["mechanism"]), int(s["rounds"])) for s in state["segments"]]
        ledger = cls(mechanism or mechanism_from_json(state["mechanism"]), float(state["target_delta"]),
                     str(state["accountant"]), segments, float(state.get("pld_discretization", PLD_DISCRETIZATION)))
        if ledger.rounds != int(state.get("rounds", ledger.rounds)):
            raise ValueError("privacy ledger: its segments do not add up to its round count")
        return ledger


def default_delta(population: int) -> float:
    """delta = 1 / N^1.1, as in McMahan et al. (2018)."""
    return 1.0 / float(population) ** 1.1
