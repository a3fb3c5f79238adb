"""Packing a round's clients into bins of sequential SGD steps, and what that packing costs.

A bin is whatever runs one stream of steps: a device, or one lane of a
device when the caller splits devices into lanes. A bin runs its clients one
after another (a client's steps are sequential SGD and are never split);
bins run in parallel and meet at the end of the round. Everything here is a
pure function of step counts, so every process computes the same plan from
client sizes alone, before reading any data.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket_steps(steps: int) -> int:
    """Rounds a stream length up to 2^k or 1.5 * 2^k (at most 50% padding).

    Few distinct lengths means few compiled round shapes (a 500-round run
    with 10 heavy-tailed clients per round compiles about 6). Padding steps
    are never run in a training round: it runs a `fori_loop` over exactly
    each client's own steps (`fedstream.training.rounds`). An evaluation
    pass skips them with `lax.cond`.
    """
    if steps <= 2:
        return max(steps, 1)
    quantum = 1 << (steps.bit_length() - 2)
    return -(-steps // quantum) * quantum


def longest_first(step_counts: Sequence[int], num_bins: int) -> np.ndarray:
    """Bin of each client: longest first, each onto the least-loaded bin (ties: earlier client, lower bin)."""
    counts = np.asarray(step_counts, np.int64)
    bins = np.zeros(counts.size, np.int32)
    load = np.zeros(num_bins, np.int64)
    for i in np.argsort(-counts, kind="stable"):
        b = int(np.argmin(load))
        bins[i] = b
        load[b] += counts[i]
    return bins


def rebalance(step_counts: Sequence[int], bins: np.ndarray, num_bins: int,
              max_moves: int | None = None) -> np.ndarray:
    """Lowers the busiest bin's load by moving or swapping clients until no single change helps.

    Longest-first leaves the busiest bin up to one client's length above the
    average; that can push a round's stream over a bucket boundary, and costs
    idle steps on every other bin. Each step takes the busiest bin (lowest
    index among ties) and makes the change that leaves the larger of the two
    touched bins smallest: one of its clients moves to another bin, or swaps
    with a shorter client there. Only changes that leave both bins below the
    old maximum are taken, so the sum of squared loads falls with every step
    (the loop ends) and the busiest load never rises. `max_moves` caps the
    steps (default: 2 * clients + bins). Deterministic.
    """
    counts = np.asarray(step_counts, np.int64)
    bins = np.array(bins, np.int32)
    load = np.bincount(bins, weights=counts, minlength=num_bins).astype(np.int64)
    limit = 2 * counts.size + num_bins if max_moves is None else max_moves
    for _ in range(limit):
        change = _best_change(counts, bins, load)
        if change is None:
            break
        client, partner, target = change
        source = int(bins[client])
        moved = int(counts[client]) - (int(counts[partner]) if partner >= 0 else 0)
        bins[client] = target
        if partner >= 0:
            bins[partner] = source
        load[source] -= moved
        load[target] += moved
    return bins


def _best_change(counts: np.ndarray, bins: np.ndarray, load: np.ndarray) -> tuple[int, int, int] | None:
    """(client of the busiest bin, partner client or -1 for a plain move, target bin) of the best change, or None."""
    busiest = int(np.argmax(load))
    members = np.flatnonzero((bins == busiest) & (counts > 0))
    if not members.size:
        return None
    member_counts = counts[members]
    best: tuple[int, int, int, int] | None = None  # (resulting larger load, client, partner, bin)
    for target in range(load.size):
        gap = int(load[busiest] - load[target])
        if target == busiest or gap < 2:
            continue
        # Partners: the bin's clients and an empty one (a plain move); the change moves delta =
        # member - partner steps, useful for 0 < delta < gap and best for delta nearest gap / 2.
        partners = np.concatenate([[-1], np.flatnonzero(bins == target)])
        partner_counts = np.where(partners >= 0, counts[np.maximum(partners, 0)], 0)
        order = np.argsort(partner_counts, kind="stable")
        partners, partner_counts = partners[order], partner_counts[order]
        ideal = member_counts - gap / 2
        above = np.minimum(np.searchsorted(partner_counts, ideal), partner_counts.size - 1)
        for pick in (np.maximum(above - 1, 0), above):
            delta = member_counts - partner_counts[pick]
            larger = np.maximum(load[busiest] - delta, load[target] + delta)
            larger = np.where((delta > 0) & (delta < gap), larger, np.iinfo(np.int64).max)
            k = int(np.argmin(larger))
            if larger[k] != np.iinfo(np.int64).max and (best is None or larger[k] < best[0]):
                best = (int(larger[k]), int(members[k]), int(partners[pick[k]]), target)
    return None if best is None else best[1:]


def stream_offsets(step_counts: Sequence[int], bins: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(first step of each client in its bin's stream, steps per bin): longest first within a bin."""
    counts = np.asarray(step_counts, np.int64)
    offset = np.zeros(counts.size, np.int64)
    load = np.zeros(num_bins, np.int64)
    for i in np.argsort(-counts, kind="stable"):
        b = int(bins[i])
        offset[i] = load[b]
        load[b] += counts[i]
    return offset, load


def pack_clients(step_counts: Sequence[int], num_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longest-first onto the least-loaded bin, then `rebalance`; clients longest-first within each bin.

    Returns (bin of each client, its first step in that bin's stream, total
    steps per bin). Deterministic (ties go to the earlier client and the
    lower bin); the busiest bin is never longer than plain longest-first's,
    and the plan is plain longest-first's whenever no move or swap shortens
    the busiest bin.
    """
    bins = rebalance(step_counts, longest_first(step_counts, num_bins), num_bins)
    offset, load = stream_offsets(step_counts, bins, num_bins)
    return bins, offset, load


def busiest_load_lower_bound(step_counts: Sequence[int], num_bins: int) -> int:
    """A load that the busiest bin of any whole-client assignment reaches at least.

    The largest of: the longest client; the average load, rounded up; and,
    for k >= 1, the k + 1 shortest of the k * bins + 1 longest clients (by
    pigeonhole, some bin holds k + 1 of those).
    """
    counts = np.sort(np.asarray(step_counts, np.int64))[::-1]
    if not counts.size:
        return 0
    bound = max(int(counts[0]), -(-int(counts.sum()) // num_bins))
    for k in range(1, (counts.size - 1) // num_bins + 1):
        bound = max(bound, int(counts[k * num_bins - k:k * num_bins + 1].sum()))
    return bound


def whole_client_waste_floor(step_counts: Sequence[int], num_bins: int) -> float:
    """The `padding_waste` below which no assignment of whole clients goes (from `busiest_load_lower_bound`).

    Above a few percent it means the round has a client longer than the
    average bin load (or a few long clients that cannot spread evenly): waste
    that no packing or bucket scheme removes, since a client's steps are
    sequential SGD.
    """
    busiest = busiest_load_lower_bound(step_counts, num_bins)
    return 1.0 - int(np.sum(step_counts)) / (num_bins * busiest) if busiest else 0.0


def padding_waste(device_steps: np.ndarray) -> float:
    """Idle bin-steps / bin-steps executed in a round: `1 - sum(load) / (bins * max(load))`.

    The `padding_waste` of the round metrics, with `device_steps` the steps
    per device. Bins run their clients' steps in parallel and meet at the
    psum, so a round executes `bins * max(load)` step slots, of which the
    `sum(load)` real steps are useful. It counts the imbalance between bins,
    including what a client longer than the average load forces (see
    `whole_client_waste_floor`). It does not count the bucketed stream's tail
    beyond the busiest bin (`bucket_steps`: allocated and transferred, never
    executed) nor the masked examples of a client's last partial batch.
    """
    load = np.asarray(device_steps, np.int64)
    slots = load.size * int(load.max()) if load.size else 0
    return float(slots - int(load.sum())) / slots if slots else 0.0
