"""Who trains in a round and on which examples: pure functions of (seed, round, client).

Cohort sampling (uniform without replacement, Poisson with a static cap of
client slots, or epochs of a shuffled population) and each client's local example order (epochs of fresh
permutations, caps on examples and steps). Nothing here reads data or
depends on devices, prefetching or restarts, so every process and every
resumed run computes the same numbers.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Sub-streams of numpy's seed sequence, so that sampling and shuffling never
# share random numbers.
_COHORT_STREAM = 0
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2
_EPOCH_STREAM = 3


@dataclasses.dataclass(frozen=True)
class ClientBatching:
    """How one client's local data becomes SGD steps.

    Attributes:
      batch_size: examples per step; the last batch of a client is masked.
      epochs: local passes over the client's (capped) examples. Epochs are
        concatenated before batching, like `shuffle().repeat(E).batch(B)`.
      max_examples: use at most this many examples of a client (a random
        subset per round); 0 means no cap.
      max_steps: stop a client after this many steps; 0 means no cap.
    """

    batch_size: int
    epochs: int = 1
    max_examples: int = 0
    max_steps: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size}, {self.epochs}")
        if self.max_examples < 0 or self.max_steps < 0:
            raise ValueError("max_examples and max_steps must be >= 0 (0 = no cap)")

    def examples_used(self, num_examples: int) -> int:
        """Examples of a client that take part in training (the cap applied)."""
        return min(num_examples, self.max_examples) if self.max_examples else num_examples

    def num_steps(self, num_examples: int) -> int:
        """SGD steps a client of `num_examples` examples takes."""
        steps = math.ceil(self.examples_used(num_examples) * self.epochs / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps


SAMPLINGS = ("uniform", "poisson", "epochs")
# Default cap of a Poisson cohort: P(cohort size > cap) <= this, per round.
POISSON_CAP_TAIL = 1e-9


def sample_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int, sampling: str = "uniform",
                  rate: float = 0.0) -> np.ndarray:
    """Client indices of a round, a function of (seed, round).

    ``uniform``: `cohort_size` clients without replacement. ``poisson``: each
    client independently with probability `rate` (`cohort_size` unused),
    in increasing order; the size is Binomial(num_clients, rate).
    ``epochs``: `epoch_cohort` (each client at most once per epoch).
    """
    if sampling == "epochs":
        return epoch_cohort(seed, round_index, num_clients, cohort_size)
    rng = np.random.default_rng([seed, round_index, _COHORT_STREAM])
    if sampling == "poisson":
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"Poisson sampling needs a rate in (0, 1], got {rate}")
        return np.flatnonzero(rng.random(num_clients) < rate)
    if sampling != "uniform":
        raise ValueError(f"unknown sampling {sampling!r} (config key sampling); known: {', '.join(SAMPLINGS)}")
    if cohort_size > num_clients:
        raise ValueError(f"clients_per_round={cohort_size} exceeds the {num_clients} clients of the split")
    return rng.choice(num_clients, size=cohort_size, replace=False)


def rounds_per_epoch(num_clients: int, cohort_size: int) -> int:
    """Rounds of an epoch under ``epochs`` sampling: floor(N / m) (the N mod m clients left over sit it out)."""
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"clients_per_round={cohort_size} must be in 1..{num_clients} (the clients of the split) "
                         "for sampling 'epochs'")
    return num_clients // cohort_size


def epoch_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Round `round_index`'s clients under ``epochs`` sampling: its slice of its epoch's permutation.

    Epoch e = round // R (R = `rounds_per_epoch`) draws a permutation of the N
    clients from (seed, e) and cuts its first R m entries into R rounds of m
    clients, so a client takes part at most once per epoch, in an order no
    client chooses (DP-FTRL's participation pattern; Kairouz et al. 2021 drop
    the remainder the same way). A pure function of (seed, round).
    """
    rounds = rounds_per_epoch(num_clients, cohort_size)
    epoch, position = divmod(int(round_index), rounds)
    order = np.random.default_rng([seed, epoch, _EPOCH_STREAM]).permutation(num_clients)
    return order[position * cohort_size:(position + 1) * cohort_size]


def poisson_rate(sampling_rate: float, cohort_size: int, num_clients: int) -> float:
    """q of Poisson sampling: `sampling_rate` if > 0, else `cohort_size / num_clients` (expected size = cohort_size)."""
    rate = float(sampling_rate) if sampling_rate > 0 else cohort_size / max(num_clients, 1)
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"Poisson sampling rate q={rate} must be in (0, 1] (config keys sampling_rate, "
                         "clients_per_round)")
    return rate


def poisson_cap(num_clients: int, rate: float, tail: float = POISSON_CAP_TAIL) -> int:
    """The smallest k with P(Binomial(num_clients, rate) > k) <= tail (at most num_clients, at least 1)."""
    from scipy.stats import binom

    return max(1, min(int(num_clients), int(binom.isf(tail, int(num_clients), float(rate)))))


def client_example_order(
    seed: int, round_index: int, client_index: int, num_examples: int, batching: ClientBatching
) -> np.ndarray:
    """Example indices of a client's steps, `[steps * batch_size]`, -1 marking padding.

    Each epoch is a fresh permutation drawn from (seed, round, client); with
    `max_examples` the subset is the first epoch's first `max_examples`.
    """
    rng = np.random.default_rng([seed, round_index, client_index, _SHUFFLE_STREAM])
    used = batching.examples_used(num_examples)
    subset = rng.permutation(num_examples)[:used]
    epochs = [subset] + [subset[rng.permutation(used)] for _ in range(batching.epochs - 1)]
    order = np.concatenate(epochs) if used else np.zeros(0, np.int64)
    steps = batching.num_steps(num_examples)
    total = steps * batching.batch_size
    order = order[:total]
    return np.concatenate([order, np.full(total - order.size, -1, order.dtype)])


def client_epoch_plan(
    seed: int, round_index: int, client_index: int, num_examples: int, batching: ClientBatching
) -> tuple[np.ndarray, np.ndarray]:
    """A client's round as (kept examples, step positions): each example stored once, epochs as index orders.

    Returns `(kept, order)`: `kept` holds the client's example indices that
    its steps read, each once (the first epoch's order); `order`
    (`[steps * batch_size]`, int32) holds positions into `kept`, -1 marking
    padding. `kept[order]` equals `client_example_order(...)` wherever
    `order >= 0` (same random draws), so a packed round stores a client's
    examples once however many local epochs it runs.
    """
    rng = np.random.default_rng([seed, round_index, client_index, _SHUFFLE_STREAM])
    used = batching.examples_used(num_examples)
    subset = rng.permutation(num_examples)[:used]
    total = batching.num_steps(num_examples) * batching.batch_size
    epochs_read = min(batching.epochs, -(-total // used)) if used else 0
    order = np.full(total, -1, np.int32)  # int32 from the start: a client's 20 epochs can be millions of steps
    filled = 0
    for epoch in range(epochs_read):
        part = np.arange(used) if epoch == 0 else rng.permutation(used)
        take = min(used, total - filled)
        order[filled:filled + take] = part[:take]
        filled += take
    return subset[:min(used, total)], order
