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


def pack_clients(step_counts: Sequence[int], num_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longest-first assignment of clients to the least-loaded bin.

    Returns (bin of each client, its first step in that bin's stream, total
    steps per bin). Ties go to the earlier client and lower bin, so the plan
    is deterministic.
    """
    counts = np.asarray(step_counts, np.int64)
    bins = np.zeros(counts.size, np.int32)
    offset = np.zeros(counts.size, np.int64)
    load = np.zeros(num_bins, np.int64)
    for i in np.argsort(-counts, kind="stable"):
        b = int(np.argmin(load))
        bins[i], offset[i] = b, load[b]
        load[b] += counts[i]
    return bins, offset, load


def padding_waste(device_steps: np.ndarray) -> float:
    """Idle device-steps / device-steps executed in a round.

    Devices run their clients' steps in parallel and meet at the psum, so a
    round costs `devices * max(device_steps)` step slots, of which the
    `sum(device_steps)` real steps are useful. (Stream padding beyond the
    busiest device is never executed and is not counted.)
    """
    load = np.asarray(device_steps, np.int64)
    slots = load.size * int(load.max()) if load.size else 0
    return float(slots - int(load.sum())) / slots if slots else 0.0
