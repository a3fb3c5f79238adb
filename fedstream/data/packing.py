"""Balancing clients' sequential SGD steps over devices (or device lanes): pure functions of step counts."""

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


def pack_clients(step_counts: Sequence[int], num_devices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longest-first assignment of clients to the least-loaded device.

    Returns (device of each client, its first step in that device's stream,
    total steps per device). Ties go to the earlier client and lower device,
    so the plan is deterministic.
    """
    counts = np.asarray(step_counts, np.int64)
    device = np.zeros(counts.size, np.int32)
    offset = np.zeros(counts.size, np.int64)
    load = np.zeros(num_devices, np.int64)
    for i in np.argsort(-counts, kind="stable"):
        d = int(np.argmin(load))
        device[i], offset[i] = d, load[d]
        load[d] += counts[i]
    return device, offset, load


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
