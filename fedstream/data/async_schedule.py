"""Who trains in an asynchronous (FedBuff) run: an event-driven simulation on the simulated clock (pure NumPy).

Nguyen et al. (AISTATS 2022), "Federated Learning with Buffered Asynchronous
Aggregation": `concurrency` clients train at once, each from the model
version current when it started; the server steps after every `buffer_size`
(K) updates it accepts. In events, on the clock of `fedstream.data.clock`:

    at time 0: start `concurrency` clients (from version 0)
    repeat, in order of simulated time (ties: the earlier start first):
        client i arrives; staleness = (server version now) - (version i started from)
        if staleness > max_staleness: its update is dropped (counted)
        else: it joins the buffer; when the buffer holds K updates, the server
              steps (version + 1) at this time and the buffer empties
        -- or client i goes offline before it finishes: its work is lost (counted)
        a new client starts now, from the version current after that step

A new client is drawn uniformly from the clients that are online now, not
training and not waiting in the buffer, with a random stream of (seed, start
index): by rejection (uniform draws over the population until one
qualifies), so a refill costs O(1) rather than an availability pass over the
population (`fedstream.data.clock.sample_online`, a synchronous round's draw,
is that pass); when none qualifies, the start waits until the first free
client comes online (`Availability.next_available`) and draws then. Its
job takes `DeviceProfile.durations(seed, start index, [client], work)`
seconds: the start index is the clock's task. A client that goes offline
(`Availability.available_until`) before it finishes is lost at that time,
as a synchronous round drops it (`fedstream.data.clock.sample_with_deadline`).

Everything is a function of the seed, the clock and the options, so a
resumed run replays the schedule from the start (cheap NumPy) instead of
storing it. `max_staleness` is this library's cap (the server keeps that
many past versions on the device); the paper has none.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import threading

import numpy as np

from fedstream.data.clock import Availability, DeviceProfile

_ARRIVE, _LOST, _WAKE = 0, 1, 2
_START_STREAM = 14  # the seed-sequence sub-stream of a refill's draw (the clock's streams are 10..13)
_TRIES = 32  # uniform draws over the population before a refill scans the free clients


@dataclasses.dataclass(frozen=True)
class ServerStep:
    """One server step of the schedule: the K updates it aggregates, in arrival order.

    Attributes:
      clients: the arriving clients (distinct), `[K]` int64.
      versions: the server version each started from, `[K]` int64;
        staleness = step index - version.
      time: simulated seconds at the step (the K-th accepted arrival).
      dropped_stale: arrivals since the previous step discarded as staler than `max_staleness`.
      dropped_offline: clients since the previous step that went offline before finishing.
    """

    clients: np.ndarray
    versions: np.ndarray
    time: float
    dropped_stale: int
    dropped_offline: int


class AsyncSchedule:
    """The server steps of a FedBuff run, generated on demand and cached (see the module docstring).

    Thread-safe (the cohort pipeline asks from its reader threads).

    Args:
      seed: the run's seed.
      work: examples each client of the train split processes in one job (the clock's `work`,
        `CohortPipeline.client_work`), `[N]`.
      concurrency: clients training at once (C).
      buffer_size: updates per server step (K).
      max_staleness: arrivals staler than this are dropped.
      profile, availability: the simulated clock (`fedstream.data.clock`).
      start_time: simulated time of the first starts.
    """

    slot_keys = ("slot_version",)

    def __init__(self, seed: int, work: np.ndarray, concurrency: int, buffer_size: int, max_staleness: int,
                 profile: DeviceProfile, availability: Availability, start_time: float = 0.0) -> None:
        self.work = np.array(work, np.float64)
        num_clients = int(self.work.size)
        if not 1 <= buffer_size <= num_clients:
            raise ValueError(f"FedBuff's buffer of K={buffer_size} updates per server step (clients_per_round) must "
                             f"be in 1..{num_clients} (the clients of the split)")
        if not 1 <= concurrency <= num_clients:
            raise ValueError(f"algorithm.options.concurrency={concurrency} must be in 1..{num_clients} (the clients "
                             "of the split)")
        if concurrency + buffer_size - 1 > num_clients:
            raise ValueError(f"algorithm.options.concurrency={concurrency} clients in flight plus up to "
                             f"{buffer_size - 1} updates waiting in the buffer (clients_per_round={buffer_size}) "
                             f"exceed the {num_clients} clients of the split: a refill could find no free client")
        if max_staleness < 0:
            raise ValueError(f"algorithm.options.max_staleness={max_staleness} must be >= 0")
        self.seed, self.num_clients = int(seed), num_clients
        self.concurrency, self.buffer_size, self.max_staleness = int(concurrency), int(buffer_size), int(max_staleness)
        self.profile, self.availability = profile, availability
        self._steps: list[ServerStep] = []
        self._events: list[tuple[float, int, int, int, int]] = []  # (time, start index, kind, client, version)
        self._busy = np.zeros(self.num_clients, bool)  # training, or its update waits in the buffer
        self._starts = 0
        self._dropped_stale = self._dropped_offline = 0
        self._buffer: list[tuple[int, int]] = []
        self._all = np.arange(self.num_clients)
        self._lock = threading.Lock()
        self.start_time = float(start_time)
        for _ in range(self.concurrency):
            self._start(self.start_time, 0)

    def step(self, t: int) -> ServerStep:
        """Server step `t` (0-based: it makes version t + 1 from updates of versions <= t)."""
        if t < 0:
            raise ValueError(f"server step {t} < 0")
        with self._lock:
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

    def _draw(self, index: int, now: float) -> int | None:
        """A client drawn uniformly from the free clients online at `now` (None if there is none).

        Rejection sampling: up to `_TRIES` uniform draws over the population,
        the first free and online one kept; only when all miss (few such
        clients) a vectorized pass over the free clients. Uniform either way,
        and O(1) per refill in the common case where it is not O(population)
        (a refill's availability pass over 342,477 clients costs milliseconds).
        """
        rng = np.random.default_rng([self.seed, index, _START_STREAM])
        for client in rng.integers(self.num_clients, size=_TRIES).tolist():
            if not self._busy[client] and self.availability.available(self.seed, now, np.array([client]))[0]:
                return int(client)
        free = np.flatnonzero(~self._busy)
        online = free[np.asarray(self.availability.available(self.seed, now, free), bool)]
        return int(online[rng.integers(online.size)]) if online.size else None

    def _start(self, now: float, version: int) -> None:
        """Starts one client at `now` from server `version`, or waits for the first free client to come online."""
        index = self._starts
        self._starts += 1
        client = self._draw(index, now)
        if client is None:
            free = np.flatnonzero(~self._busy)
            wake = float(self.availability.next_available(self.seed, now, free).min()) if free.size else math.inf
            if math.isfinite(wake):
                heapq.heappush(self._events, (max(wake, now), index, _WAKE, -1, -1))
            return  # never again: this slot stays idle
        one = np.array([client])
        seconds = float(self.profile.durations(self.seed, index, one, self.work[one])[0])
        offline = float(self.availability.available_until(self.seed, now, one)[0])
        self._busy[client] = True
        if now + seconds <= offline:
            heapq.heappush(self._events, (now + seconds, index, _ARRIVE, client, version))
        else:
            heapq.heappush(self._events, (offline, index, _LOST, client, version))

    def _next_step(self) -> ServerStep:
        version = len(self._steps)
        while True:
            if not self._events:
                raise RuntimeError(f"FedBuff server step {version}: no client is online at any later simulated "
                                   "time (config key clock.availability / the trace)")
            now, _, kind, client, started = heapq.heappop(self._events)
            if kind == _WAKE:
                self._start(now, version)
                continue
            if kind == _LOST or version - started > self.max_staleness:
                self._busy[client] = False
                if kind == _LOST:
                    self._dropped_offline += 1
                else:
                    self._dropped_stale += 1
                self._start(now, version)
                continue
            self._buffer.append((client, started))
            if len(self._buffer) < self.buffer_size:
                self._start(now, version)
                continue
            clients = np.array([c for c, _ in self._buffer], np.int64)
            step = ServerStep(clients, np.array([v for _, v in self._buffer], np.int64), now, self._dropped_stale,
                              self._dropped_offline)
            self._busy[clients] = False
            self._buffer, self._dropped_stale, self._dropped_offline = [], 0, 0
            self._start(now, version + 1)  # the replacement starts from the model this step makes
            return step

    def metrics(self, t: int) -> dict[str, float | int]:
        """Server step t's clock numbers for metrics.jsonl (the synchronous clock's keys where they mean the same)."""
        step = self.step(t)
        previous = self.step(t - 1).time if t > 0 else self.start_time
        staleness = t - step.versions
        return {"simulated_time": step.time, "simulated_round_seconds": step.time - previous,
                "staleness_mean": float(staleness.mean()), "staleness_max": int(staleness.max()),
                "clients_dropped": step.dropped_stale + step.dropped_offline,
                "clients_dropped_stale": step.dropped_stale, "clients_dropped_offline": step.dropped_offline}
