"""Who trains in an asynchronous (FedBuff) run: an event-driven simulation on the simulated clock (pure NumPy).

Nguyen et al. (AISTATS 2022), "Federated Learning with Buffered Asynchronous
Aggregation": `concurrency` clients train at once, each from the model
version current when it started; the server steps after every `buffer_size`
(K) updates it accepts. In events:

    at time 0: start `concurrency` clients (version 0)
    repeat, in order of simulated finish time (ties: the earlier start first):
        client i arrives; staleness = (server version now) - (version i started from)
        if staleness > max_staleness: its update is dropped (counted)
        else: it joins the buffer; when the buffer holds K updates, the server
              steps (version + 1) at this time and the buffer empties
        a new client starts now, from the version current after that step

A new client is drawn uniformly from the clients that are available now
(`available`), not training, and not waiting in the buffer, with a random
stream of (seed, start index). When none is, the start is retried
`retry_seconds` later. Each start's duration is `durations(start index,
[client])`: the clock's device profile, a function of (seed, start, client).

Everything is a function of the seed, the clock and the options, so a
resumed run replays the schedule from the start (milliseconds per thousand
steps) instead of storing it. `max_staleness` is this library's cap (the
server keeps that many past versions on the device); the paper has none.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Callable

import numpy as np

_START_STREAM = 3  # the seed-sequence sub-stream of the asynchronous client draws (see fedstream.data.sampling)
_ARRIVE, _RETRY = 0, 1


@dataclasses.dataclass(frozen=True)
class ServerStep:
    """One server step of the schedule: the K updates it aggregates, in arrival order.

    Attributes:
      clients: the arriving clients (distinct), `[K]` int64.
      versions: the server version each started from, `[K]` int64;
        staleness = step index - version.
      time: simulated seconds at the step (the K-th accepted arrival).
      dropped: arrivals since the previous step discarded as staler than `max_staleness`.
    """

    clients: np.ndarray
    versions: np.ndarray
    time: float
    dropped: int


class AsyncSchedule:
    """The server steps of a FedBuff run, generated on demand and cached (see the module docstring).

    Args:
      seed: the run's seed.
      num_clients: clients of the train split (indices 0..N-1).
      concurrency: clients training at once (C).
      buffer_size: updates per server step (K).
      max_staleness: arrivals staler than this are dropped.
      durations: `durations(start_index, clients) -> seconds` per client (the clock's device profile).
      available: `available(time, clients) -> bool mask`, or None (every client always available).
      retry_seconds: when no client can start, the start is retried this much later.
    """

    slot_keys = ("slot_version",)

    def __init__(self, seed: int, num_clients: int, concurrency: int, buffer_size: int, max_staleness: int,
                 durations: Callable[[int, np.ndarray], np.ndarray],
                 available: Callable[[float, np.ndarray], np.ndarray] | None = None,
                 retry_seconds: float = 60.0) -> None:
        if not 1 <= buffer_size <= num_clients:
            raise ValueError(f"FedBuff's buffer of K={buffer_size} updates per server step (clients_per_round) must "
                             f"be in 1..{num_clients} (the clients of the split)")
        if not 1 <= concurrency <= num_clients:
            raise ValueError(f"algorithm.options.concurrency={concurrency} must be in 1..{num_clients} (the clients "
                             "of the split)")
        if max_staleness < 0:
            raise ValueError(f"algorithm.options.max_staleness={max_staleness} must be >= 0")
        if not retry_seconds > 0:
            raise ValueError(f"retry_seconds={retry_seconds} must be > 0")
        self.seed, self.num_clients = int(seed), int(num_clients)
        self.concurrency, self.buffer_size, self.max_staleness = int(concurrency), int(buffer_size), int(max_staleness)
        self.durations, self.available, self.retry_seconds = durations, available, float(retry_seconds)
        self._steps: list[ServerStep] = []
        self._events: list[tuple[float, int, int, int, int]] = []  # (time, start index, kind, client, version)
        self._busy = np.zeros(self.num_clients, bool)  # training, or its update waits in the buffer
        self._starts = 0
        self._dropped = 0
        self._buffer: list[tuple[int, int]] = []
        self._all = np.arange(self.num_clients)
        for _ in range(self.concurrency):
            self._start(0.0, 0)

    def step(self, t: int) -> ServerStep:
        """Server step `t` (0-based: it makes version t + 1 from updates of versions <= t)."""
        while len(self._steps) <= t:
            self._steps.append(self._next_step())
        return self._steps[t]

    def cohort(self, t: int) -> np.ndarray:
        """The clients whose updates server step `t` aggregates (the cohort pipeline's round t)."""
        return self.step(t).clients

    def slot_features(self, t: int) -> dict[str, np.ndarray]:
        """Per cohort position of step `t`: `slot_version`, the model version the client started from."""
        return {"slot_version": self.step(t).versions}

    def staleness(self, t: int) -> np.ndarray:
        """Staleness of each update of step `t`: t - the version it started from."""
        return t - self.step(t).versions

    # --- the event loop ---------------------------------------------------------------------------------------

    def _start(self, now: float, version: int) -> None:
        """Starts one client at `now` from server `version` (or retries later when none can start)."""
        index = self._starts
        self._starts += 1
        free = ~self._busy
        if self.available is not None:
            free &= np.asarray(self.available(now, self._all), bool)
        candidates = np.flatnonzero(free)
        if candidates.size == 0:
            heapq.heappush(self._events, (now + self.retry_seconds, index, _RETRY, -1, -1))
            return
        rng = np.random.default_rng([self.seed, index, _START_STREAM])
        client = int(candidates[rng.integers(candidates.size)])
        seconds = float(np.asarray(self.durations(index, np.array([client])), np.float64)[0])
        if not np.isfinite(seconds) or seconds < 0:
            raise ValueError(f"the device profile gave client {client} a duration of {seconds} s")
        self._busy[client] = True
        heapq.heappush(self._events, (now + seconds, index, _ARRIVE, client, version))

    def _next_step(self) -> ServerStep:
        version = len(self._steps)
        while True:
            now, _, kind, client, started = heapq.heappop(self._events)
            if kind == _RETRY:
                self._start(now, version)
                continue
            if version - started > self.max_staleness:
                self._busy[client] = False
                self._dropped += 1
                self._start(now, version)
                continue
            self._buffer.append((client, started))
            if len(self._buffer) < self.buffer_size:
                self._start(now, version)
                continue
            clients = np.array([c for c, _ in self._buffer], np.int64)
            step = ServerStep(clients, np.array([v for _, v in self._buffer], np.int64), now, self._dropped)
            self._busy[clients] = False
            self._buffer, self._dropped = [], 0
            self._start(now, version + 1)  # the replacement starts from the model this step makes
            return step
