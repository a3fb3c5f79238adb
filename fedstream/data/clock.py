"""A simulated wall clock for cross-device federated learning: device speed, availability, deadlines.

Real cross-device rounds differ from the idealized simulation in two ways:
clients are slow by different (heavy-tailed) amounts, and a client can only
be reached while it is online (charging, on Wi-Fi, idle). This module puts a
simulated clock under the rounds. Everything is a pure function of
`(seed, task, client)` drawn from NumPy's seed sequences, so every process
and every resumed run computes the same clock.

The model (formulas in docs/simulated_clock.md):

* `DeviceProfile.durations(seed, task, clients, work)`: the simulated
  seconds client `c` needs for one task (a synchronous round, or one
  asynchronous job):

      duration = work[c] * seconds_per_example * slowness[c] + network_seconds * jitter[task, c]

  `work` is the number of examples the client processes (steps x batch,
  or examples x epochs). `slowness[c]` has median 1 and is drawn once per
  (seed, client): lognormal `exp(speed_sigma * z)`, or Pareto with shape
  `pareto_shape` scaled to median 1. `jitter[task, c] = exp(network_sigma * z)`
  is fresh per (seed, task, client).
* `Availability`: who is online at a simulated time: ``always``; ``diurnal``
  (client `c` online for `available_fraction` of each `day_seconds`, from
  its own seeded phase, a time zone); or ``trace`` (a JSON or CSV file of
  online intervals per client id, FedScale-style, optionally periodic).
  `available(seed, time, clients)`, `available_until(...)` (when the
  current online spell ends) and `next_available(...)` (when a client is
  next online) answer for arrays of clients.
* `sample_online(seed, task, time, num_clients, m, availability, exclude)`:
  up to `m` online clients (not in `exclude`) uniformly at random, waiting
  for the first to come online if nobody is; the sampling step of a round,
  and of an asynchronous server refilling its free slots.
* `sample_with_deadline(...)`: one synchronous round with over-selection.
  At `start_time` (the previous round's end), if nobody is online the
  server waits until someone is; it samples `ceil(k * over_selection)`
  online clients uniformly; each runs `durations(...)` and completes only if
  it finishes before the `deadline` (0 = none) and before it goes offline;
  the first `k` to complete are kept, the others are dropped. The round
  ends when the k-th kept client reports, or (fewer complete) when the
  last sampled client's fate is known (it completed, went offline, or hit
  the deadline). Returns a `RoundOutcome`.
* `RoundClock`: the chain of rounds (round r starts at round r-1's end), as
  a cached, thread-safe function of the round index, for the cohort
  pipeline. Recomputing it from round 0 on resume is cheap NumPy.

Random draws use `np.random.default_rng([seed, ..., stream])` with stream ids
of their own (`_SAMPLE_STREAM` .. `_PHASE_STREAM`), distinct from the
cohort/shuffle/augmentation streams of `fedstream.data.sampling`.
Per-client quantities are entries of one long draw per (seed[, task],
stream), so a client's value does not depend on which other clients are
asked about (NumPy fills arrays sequentially; tests check the prefix
property). A task's draw reaches the largest client index asked about, so
asking for one client of a large population costs a population-sized draw
(5 ms for 342,477 clients): ask for a task's clients together.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import threading
from typing import Any

import numpy as np

# Seed-sequence sub-streams of the clock (fedstream.data.sampling uses 0..2 for cohort, shuffle, augmentation).
_SAMPLE_STREAM = 10   # (seed, round): which online clients a round over-selects
_SPEED_STREAM = 11    # (seed): each client's slowness factor
_NETWORK_STREAM = 12  # (seed, task): each client's network-time jitter in that task
_PHASE_STREAM = 13    # (seed): each client's diurnal phase (time zone)

SPEED_DISTRIBUTIONS = ("lognormal", "pareto")
AVAILABILITY_KINDS = ("always", "diurnal", "trace")
TRACE_ASSIGNMENTS = ("index", "cycle")


class TraceError(ValueError):
    """An availability trace file is malformed; the message names the file and the line or client."""


# --- per-client draws: prefixes of one sequential draw, so pure in (seed[, task], client) ---------------------------

def _draw_length(clients: np.ndarray) -> int:
    """A draw long enough for every index in `clients`, rounded up to a power of two (so caches hit)."""
    need = int(clients.max()) + 1 if clients.size else 1
    if clients.size and int(clients.min()) < 0:
        raise ValueError(f"client indices must be >= 0, got {int(clients.min())}")
    return 1 << max(need - 1, 1).bit_length()


@functools.lru_cache(maxsize=16)
def _per_client(seed: int, stream: int, kind: str, length: int) -> np.ndarray:
    rng = np.random.default_rng([seed, stream])
    out = rng.standard_normal(length) if kind == "normal" else rng.random(length)
    out.setflags(write=False)
    return out


def client_normals(seed: int, stream: int, clients: np.ndarray) -> np.ndarray:
    """Standard normals of `clients`: entry c of `default_rng([seed, stream]).standard_normal(n)`, any n > c."""
    clients = np.asarray(clients, np.int64)
    return _per_client(int(seed), int(stream), "normal", _draw_length(clients))[clients]


def client_uniforms(seed: int, stream: int, clients: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) of `clients`: entry c of `default_rng([seed, stream]).random(n)`, any n > c."""
    clients = np.asarray(clients, np.int64)
    return _per_client(int(seed), int(stream), "uniform", _draw_length(clients))[clients]


def task_normals(seed: int, task: int, stream: int, clients: np.ndarray) -> np.ndarray:
    """Standard normals of `clients` in one task: entry c of `default_rng([seed, task, stream]).standard_normal(n)`.

    One generator and one vector draw per call, up to the largest client
    index asked about: about 20 us for a population of 100, 5 ms for 342,477
    (one generator per client would cost 15-20 us per client and round).
    """
    clients = np.asarray(clients, np.int64)
    if not clients.size:
        return np.zeros(clients.shape)
    if int(clients.min()) < 0:
        raise ValueError(f"client indices must be >= 0, got {int(clients.min())}")
    draw = np.random.default_rng([int(seed), int(task), int(stream)]).standard_normal(int(clients.max()) + 1)
    return draw[clients]


# --- device profile ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Heavy-tailed per-client compute speed plus a network time.

    Attributes:
      seconds_per_example: median compute seconds per example processed.
      speed_distribution: 'lognormal' or 'pareto': the law of a client's
        slowness factor (median 1), drawn once per (seed, client).
      speed_sigma: lognormal spread of the slowness (sigma of its log).
      pareto_shape: Pareto shape alpha of the slowness (smaller: heavier tail).
      network_seconds: median upload + download seconds of one task.
      network_sigma: lognormal spread of the network time, fresh per (seed, task, client).
    """

    seconds_per_example: float = 0.01
    speed_distribution: str = "lognormal"
    speed_sigma: float = 0.75
    pareto_shape: float = 2.0
    network_seconds: float = 5.0
    network_sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.speed_distribution not in SPEED_DISTRIBUTIONS:
            raise ValueError(f"unknown speed distribution {self.speed_distribution!r} (config key "
                             f"clock.speed_distribution); known: {', '.join(SPEED_DISTRIBUTIONS)}")
        for name in ("seconds_per_example", "speed_sigma", "network_seconds", "network_sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"config key clock.{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.pareto_shape) and self.pareto_shape > 0):
            raise ValueError(f"config key clock.pareto_shape must be finite and > 0, got {self.pareto_shape}")

    def slowness(self, seed: int, clients: np.ndarray) -> np.ndarray:
        """Each client's compute slowness factor (median 1), a function of (seed, client)."""
        if self.speed_distribution == "pareto":
            u = client_uniforms(seed, _SPEED_STREAM, clients)
            return (1.0 - u) ** (-1.0 / self.pareto_shape) / 2.0 ** (1.0 / self.pareto_shape)
        return np.exp(self.speed_sigma * client_normals(seed, _SPEED_STREAM, clients))

    def durations(self, seed: int, task: int, clients: np.ndarray, work: np.ndarray) -> np.ndarray:
        """Simulated seconds each client needs for one task (a round, or one asynchronous job).

        `work[i]` is the number of examples `clients[i]` processes. Pure in
        (seed, task, client): the same client in the same task always takes
        the same time, whoever else is asked about.
        """
        clients = np.asarray(clients, np.int64)
        work = np.asarray(work, np.float64)
        if work.shape != clients.shape:
            raise ValueError(f"work has shape {work.shape}, clients {clients.shape}")
        compute = work * self.seconds_per_example * self.slowness(seed, clients)
        network = self.network_seconds * np.exp(self.network_sigma * task_normals(seed, task, _NETWORK_STREAM,
                                                                                   clients))
        return compute + network


# --- availability --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Trace:
    """Online intervals per trace row, flattened: row j's intervals are starts/ends[offsets[j]:offsets[j+1]]."""

    ids: np.ndarray      # [rows] client ids of the file, increasing
    offsets: np.ndarray  # [rows + 1]
    starts: np.ndarray   # [intervals], increasing within a row
    ends: np.ndarray     # [intervals], start < end <= next start
    period: float        # the trace repeats every `period` seconds; 0 = it does not


@dataclasses.dataclass(frozen=True)
class Availability:
    """Who is online at a simulated time.

    Attributes:
      kind: 'always' (everyone, always), 'diurnal' or 'trace'.
      day_seconds: length of the diurnal cycle.
      available_fraction: (diurnal) the fraction of each cycle a client is
        online: client c is online while `(time + phase[c]) mod day_seconds
        < available_fraction * day_seconds`.
      time_zones: (diurnal) 0: phase[c] uniform in [0, day_seconds); n > 0:
        phase[c] is one of n equally spaced time zones. Drawn per (seed, client).
      trace: (trace) a JSON or CSV file of online intervals per client id
        (format in docs/simulated_clock.md).
      trace_period: (trace) the trace repeats every this many seconds; 0 =
        the file's own `period` (JSON), else it does not repeat.
      trace_assign: (trace) 'index': client c follows the trace of id c
        (clients the file lacks are never online); 'cycle': client c follows
        the file's (c mod rows)-th client, in increasing id order.
    """

    kind: str = "always"
    day_seconds: float = 86400.0
    available_fraction: float = 0.5
    time_zones: int = 0
    trace: str = ""
    trace_period: float = 0.0
    trace_assign: str = "index"

    def __post_init__(self) -> None:
        if self.kind not in AVAILABILITY_KINDS:
            raise ValueError(f"unknown availability {self.kind!r} (config key clock.availability); known: "
                             f"{', '.join(AVAILABILITY_KINDS)}")
        if not (math.isfinite(self.day_seconds) and self.day_seconds > 0):
            raise ValueError(f"config key clock.day_seconds must be finite and > 0, got {self.day_seconds}")
        if not 0.0 < self.available_fraction <= 1.0:
            raise ValueError(f"config key clock.available_fraction must be in (0, 1], got {self.available_fraction}")
        if self.time_zones < 0:
            raise ValueError(f"config key clock.time_zones must be >= 0 (0 = continuous), got {self.time_zones}")
        if not (math.isfinite(self.trace_period) and self.trace_period >= 0):
            raise ValueError(f"config key clock.trace_period must be finite and >= 0, got {self.trace_period}")
        if self.trace_assign not in TRACE_ASSIGNMENTS:
            raise ValueError(f"unknown trace assignment {self.trace_assign!r} (config key clock.trace_assign); "
                             f"known: {', '.join(TRACE_ASSIGNMENTS)}")
        if self.kind == "trace":
            if not self.trace:
                raise ValueError("availability 'trace' needs a file (config key clock.trace)")
            self._trace()  # parse (and validate) now, not in the middle of a run

    def _trace(self) -> _Trace:
        trace = load_trace(self.trace)
        if self.trace_period:
            if trace.ends.size and trace.ends.max() > self.trace_period:
                raise TraceError(f"{self.trace}: an interval ends at {trace.ends.max():g}, after the period "
                                 f"{self.trace_period:g} (config key clock.trace_period)")
            trace = dataclasses.replace(trace, period=float(self.trace_period))
        return trace

    def phases(self, seed: int, clients: np.ndarray) -> np.ndarray:
        """(diurnal) Each client's phase in [0, day_seconds), a function of (seed, client)."""
        u = client_uniforms(seed, _PHASE_STREAM, clients)
        if self.time_zones:
            u = np.floor(u * self.time_zones) / self.time_zones
        return u * self.day_seconds

    def available(self, seed: int, time: float, clients: np.ndarray) -> np.ndarray:
        """Whether each client is online at `time` (bool array)."""
        if self.kind == "always" or (self.kind == "diurnal" and self.available_fraction >= 1.0):
            return np.ones(np.shape(clients), bool)
        if self.kind == "diurnal":  # the common case, without the spells' ends
            return self._position(seed, float(time), np.asarray(clients, np.int64)) < (
                self.available_fraction * self.day_seconds)
        return self._spell(seed, time, clients)[0]

    def _position(self, seed: int, time: float, clients: np.ndarray) -> np.ndarray:
        """(diurnal) Where each client is in its cycle at `time`, in [-tolerance, day_seconds - tolerance)."""
        day = self.day_seconds
        position = np.mod(time + self.phases(seed, clients), day)
        return np.where(position > day - _tolerance(time, day), position - day, position)  # round-off

    def available_until(self, seed: int, time: float, clients: np.ndarray) -> np.ndarray:
        """When each client's current online spell ends (inf: never; `time` where it is offline now)."""
        online, until, _ = self._spell(seed, time, clients)
        return np.where(online, until, float(time))

    def next_available(self, seed: int, time: float, clients: np.ndarray) -> np.ndarray:
        """The earliest time >= `time` at which each client is online (inf: never again)."""
        online, _, following = self._spell(seed, time, clients)
        return np.where(online, float(time), following)

    def _spell(self, seed: int, time: float, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(online now, end of the current spell, start of the next spell) of each client at `time`."""
        clients = np.asarray(clients, np.int64)
        time = float(time)
        if self.kind == "always" or (self.kind == "diurnal" and self.available_fraction >= 1.0):
            n = clients.shape
            return np.ones(n, bool), np.full(n, np.inf), np.full(n, time)
        if self.kind == "diurnal":
            day = self.day_seconds
            position = self._position(seed, time, clients)
            online_length = self.available_fraction * day
            online = position < online_length
            return online, time + online_length - position, time + day - position
        return _trace_spell(self._trace(), self.trace_assign, time, clients)


def _tolerance(time: float, scale: float) -> float:
    """A few float64 ulps of the times involved: a spell starting at `t` (as computed) counts as started at `t`."""
    return 16.0 * float(np.spacing(max(abs(time), scale, 1.0)))


def _trace_spell(trace: _Trace, assign: str, time: float,
                 clients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`Availability._spell` for a trace: a vectorized binary search of each client's intervals."""
    rows = len(trace.ids)
    if assign == "cycle":
        row = clients % rows
    else:
        row = np.searchsorted(trace.ids, clients)
        row = np.where((row < rows) & (trace.ids[np.minimum(row, rows - 1)] == clients), row, -1)
    has = row >= 0
    safe_row = np.where(has, row, 0)
    first = np.where(has, trace.offsets[safe_row], 0)
    stop = np.where(has, trace.offsets[safe_row + 1], 0)  # rows without intervals: first == stop
    period = trace.period
    base = math.floor(time / period) * period if period else 0.0
    local = time - base
    tol = _tolerance(time, period)
    # p = the last interval of the client's row starting at or before `local` (first - 1 if none).
    lo, hi = first.copy(), stop.copy()
    starts, ends = trace.starts, trace.ends
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        go = starts[np.where(active, mid, 0)] <= local + tol if starts.size else np.zeros(mid.shape, bool)
        lo = np.where(active & go, mid + 1, lo)
        hi = np.where(active & ~go, mid, hi)
    p = lo - 1
    nonempty = stop > first
    inside = nonempty & (p >= first)
    p_safe = np.where(inside, p, 0)
    online = inside & (local < (ends[p_safe] if ends.size else 0.0))
    until = np.full(clients.shape, np.inf)
    following = np.full(clients.shape, np.inf)
    if ends.size:
        first_safe = np.where(nonempty, first, 0)
        until = base + ends[p_safe]
        nxt = np.where(inside, p + 1, first)  # the next interval starting after `local`
        more = nonempty & (nxt < stop)
        following = np.where(more, base + starts[np.minimum(nxt, starts.size - 1)], np.inf)
        if period:
            wraps = nonempty & (ends[np.maximum(stop - 1, 0)] >= period) & (starts[first_safe] <= 0.0)
            whole = wraps & (stop - first == 1)  # one interval covering the whole period: always online
            until = np.where(online & wraps & (p == stop - 1), base + period + ends[first_safe], until)
            until = np.where(online & whole, np.inf, until)
            following = np.where(nonempty & ~more, base + period + starts[first_safe], following)
    return online, np.where(online, until, np.inf), np.where(online, time, following)


# --- trace files ---------------------------------------------------------------------------------------------------

def load_trace(path: str | os.PathLike) -> _Trace:
    """Parses and checks an availability trace (JSON or CSV, by extension); cached per (path, size, mtime)."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError as e:
        raise TraceError(f"{path}: cannot read the availability trace ({e.strerror}; config key clock.trace)") from None
    return _load_trace(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_trace(path: str, size: int, mtime_ns: int) -> _Trace:
    del size, mtime_ns  # cache keys: a rewritten file is read again
    if path.endswith(".json"):
        intervals, period = _read_json_trace(path)
    elif path.endswith(".csv"):
        intervals, period = _read_csv_trace(path), 0.0
    else:
        raise TraceError(f"{path}: an availability trace must be a .json or .csv file")
    ids = np.array(sorted(intervals), np.int64)
    offsets, starts, ends = [0], [], []
    for client in ids:
        spans = sorted(intervals[int(client)], key=lambda se: se[0])
        for (_, e0, where0), (s1, _, where1) in itertools.pairwise(spans):
            if s1 < e0:
                raise TraceError(f"{path}: {where1}: client {client}'s interval starting at {s1:g} overlaps the one "
                                 f"of {where0} ending at {e0:g}")
        starts += [s for s, _, _ in spans]
        ends += [e for _, e, _ in spans]
        offsets.append(len(starts))
    trace = _Trace(ids, np.array(offsets, np.int64), np.array(starts, np.float64), np.array(ends, np.float64),
                   float(period))
    if period and trace.ends.size and trace.ends.max() > period:
        raise TraceError(f"{path}: an interval ends at {trace.ends.max():g}, after the trace's period {period:g}")
    return trace


def _interval(path: str, where: str, client: Any, start: Any, end: Any) -> tuple[float, float, str]:
    try:
        s, e = float(start), float(end)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: {where}: client {client}: interval ({start!r}, {end!r}) is not two numbers") from None
    if not (math.isfinite(s) and math.isfinite(e) and 0 <= s < e):
        raise TraceError(f"{path}: {where}: client {client}: interval ({s:g}, {e:g}) needs 0 <= start < end, finite")
    return s, e, where


def _client_id(path: str, where: str, text: Any) -> int:
    try:
        client = int(str(text).strip())
    except ValueError:
        raise TraceError(f"{path}: {where}: client id {text!r} is not an integer") from None
    if client < 0:
        raise TraceError(f"{path}: {where}: client id {client} is negative")
    return client


def _read_csv_trace(path: str) -> dict[int, list[tuple[float, float, str]]]:
    """Rows `client,start,end` (an optional header line naming those columns; # comments)."""
    intervals: dict[int, list[tuple[float, float, str]]] = {}
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            where = f"line {line_no}"
            if line_no == 1 and [c.strip().lower() for c in row] == ["client", "start", "end"]:
                continue
            if len(row) != 3:
                raise TraceError(f"{path}: {where}: expected 3 fields client,start,end, got {len(row)}")
            client = _client_id(path, where, row[0])
            intervals.setdefault(client, []).append(_interval(path, where, client, row[1], row[2]))
    if not intervals:
        raise TraceError(f"{path}: no intervals")
    return intervals


def _read_json_trace(path: str) -> tuple[dict[int, list[tuple[float, float, str]]], float]:
    """`{"period": P, "clients": {"<id>": [[start, end], ...] | {"active": [...], "inactive": [...]}}}`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("clients"), dict):
        raise TraceError(f'{path}: expected an object with a "clients" object mapping client ids to intervals')
    unknown = set(data) - {"period", "clients"}
    if unknown:
        raise TraceError(f"{path}: unknown top-level keys {sorted(unknown)} (known: period, clients)")
    period = data.get("period", 0)
    if isinstance(period, bool) or not isinstance(period, (int, float)) or not (math.isfinite(period) and period >= 0):
        raise TraceError(f'{path}: "period" must be a number >= 0 (0 = no repetition), got {period!r}')
    intervals: dict[int, list[tuple[float, float, str]]] = {}
    for key, spans in data["clients"].items():
        where = f"client {key!r}"
        client = _client_id(path, where, key)
        if isinstance(spans, dict):  # FedScale's form: online at active[i], offline at inactive[i]
            active, inactive = spans.get("active"), spans.get("inactive")
            if not isinstance(active, list) or not isinstance(inactive, list) or len(active) != len(inactive):
                raise TraceError(f'{path}: {where}: "active" and "inactive" must be lists of equal length')
            spans = list(zip(active, inactive))
        if not isinstance(spans, list):
            raise TraceError(f"{path}: {where}: expected a list of [start, end] pairs")
        parsed = []
        for i, span in enumerate(spans):
            if not isinstance(span, (list, tuple)) or len(span) != 2:
                raise TraceError(f"{path}: {where}: interval {i} is {span!r}, not a [start, end] pair")
            parsed.append(_interval(path, f"{where} interval {i}", client, *span))
        if client in intervals:
            raise TraceError(f"{path}: {where}: client {client} appears twice")
        intervals[client] = parsed
    if not intervals:
        raise TraceError(f"{path}: no clients")
    return intervals, float(period)


# --- synchronous rounds with over-selection and a deadline -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """One synchronous round on the simulated clock.

    Attributes:
      round_index: the round.
      start_time: when the round began (the previous round's end).
      sample_time: when the server sampled (later than `start_time` if it
        had to wait for a client to come online).
      end_time: when the round ended (the server aggregates then).
      num_available: clients online at `sample_time`.
      sampled: the over-selected clients, in sampling order.
      finish_times: absolute time each sampled client would finish its work.
      completed: whether each sampled client finished in time and online.
      kept: the first k completed clients, in order of finishing (ties: by
        client index); the round trains these.
      dropped_offline: sampled clients that went offline before finishing.
      dropped_late: sampled clients still online but not kept (they missed
        the deadline or finished after the k-th kept client).
    """

    round_index: int
    start_time: float
    sample_time: float
    end_time: float
    num_available: int
    sampled: np.ndarray
    finish_times: np.ndarray
    completed: np.ndarray
    kept: np.ndarray
    dropped_offline: int
    dropped_late: int

    @property
    def duration(self) -> float:
        """Simulated seconds from the round's start to its end (waiting for clients included)."""
        return self.end_time - self.start_time

    @property
    def dropped(self) -> int:
        """Sampled clients whose work the round does not use."""
        return self.dropped_offline + self.dropped_late


def over_selected(k: int, over_selection: float) -> int:
    """Clients a round samples: ceil(k * over_selection) (a tiny tolerance so that 10 * 1.3 is 13, not 14)."""
    if not (math.isfinite(over_selection) and over_selection >= 1.0):
        raise ValueError(f"config key clock.over_selection must be >= 1, got {over_selection}")
    return max(int(k), math.ceil(k * over_selection - 1e-9))


@functools.lru_cache(maxsize=4)
def _population(num_clients: int) -> np.ndarray:
    population = np.arange(num_clients)
    population.setflags(write=False)
    return population


def sample_online(seed: int, task: int, time: float, num_clients: int, m: int, availability: Availability,
                  exclude: np.ndarray | None = None) -> tuple[float, np.ndarray, int]:
    """Up to `m` clients online at `time` (or, if none is, when the first comes online), uniformly at random.

    Returns `(sample_time, clients, num_online)`: `clients` are drawn without
    replacement from the online clients not in `exclude` (e.g. those already
    busy), by `default_rng([seed, task, 10]).choice` over them in increasing
    order. Raises RuntimeError if no client is ever online again.
    """
    population = _population(int(num_clients))
    eligible = np.ones(num_clients, bool)
    if exclude is not None:
        eligible[np.asarray(exclude, np.int64)] = False
    sample_time = float(time)
    online = availability.available(seed, sample_time, population)
    if exclude is not None:
        online &= eligible
    if not online.any():
        following = availability.next_available(seed, sample_time, population)
        sample_time = float(following[eligible].min()) if eligible.any() else math.inf
        if not math.isfinite(sample_time):
            raise RuntimeError(f"task {task}: no client is online at simulated time {time:g} s or ever after "
                               "(config key clock.availability / the trace)")
        online = availability.available(seed, sample_time, population) & eligible
    candidates = np.flatnonzero(online)
    if not candidates.size:
        raise RuntimeError(f"task {task}: no client online at simulated time {sample_time!r}, when one was due")
    rng = np.random.default_rng([seed, task, _SAMPLE_STREAM])
    return sample_time, candidates[rng.choice(candidates.size, size=min(m, candidates.size), replace=False)], \
        int(candidates.size)


def sample_with_deadline(seed: int, round_index: int, start_time: float, num_clients: int, k: int,
                         over_selection: float, deadline: float, profile: DeviceProfile,
                         availability: Availability, work: np.ndarray) -> RoundOutcome:
    """One synchronous round: over-select online clients, keep the first `k` to finish before the deadline.

    `work[c]` (for every client of the population) is the number of examples
    client c processes in a round; `deadline` is in simulated seconds from
    the sampling time (0 = no deadline). Pure in (seed, round_index,
    start_time) and the arguments.
    """
    if k < 1 or k > num_clients:
        raise ValueError(f"clients_per_round={k} must be in 1..{num_clients}")
    if not (math.isfinite(deadline) and deadline >= 0):
        raise ValueError(f"config key clock.deadline must be finite and >= 0 (0 = none), got {deadline}")
    work = np.asarray(work)
    if work.shape != (num_clients,):
        raise ValueError(f"work has shape {work.shape}, expected ({num_clients},)")
    m = over_selected(k, over_selection)
    start_time = float(start_time)
    sample_time, sampled, num_available = sample_online(seed, round_index, start_time, num_clients, m, availability)
    finish = sample_time + profile.durations(seed, round_index, sampled, work[sampled])
    offline_at = availability.available_until(seed, sample_time, sampled)
    cutoff = sample_time + deadline if deadline else np.inf
    completed = (finish <= offline_at) & (finish <= cutoff)
    done = np.flatnonzero(completed)
    done = done[np.lexsort((sampled[done], finish[done]))]
    kept_positions = done[:k]
    if kept_positions.size == k:
        end_time = float(finish[kept_positions[-1]])
    else:  # fewer than k complete: the round ends when every sampled client's fate is known
        resolved = np.minimum(np.minimum(finish, offline_at), cutoff)
        end_time = float(resolved.max()) if resolved.size else sample_time
    # Offline: it went offline before finishing and before the deadline, and (when k clients completed) before the
    # k-th did: a client the round's end aborts first counts as late. At equal times a finish comes first, then
    # the deadline, then going offline.
    went_offline = (offline_at < finish) & (offline_at < cutoff)
    if kept_positions.size == k:
        went_offline &= offline_at < end_time
    kept = sampled[kept_positions]
    return RoundOutcome(
        round_index=int(round_index), start_time=start_time, sample_time=sample_time, end_time=end_time,
        num_available=num_available, sampled=sampled, finish_times=finish, completed=completed, kept=kept,
        dropped_offline=int(went_offline.sum()), dropped_late=int(sampled.size - kept.size - went_offline.sum()))


@dataclasses.dataclass(frozen=True)
class ClockSettings:
    """A synchronous run's clock: the device profile, availability, over-selection, deadline and start time.

    The config keys `clock.*` of a training config (`from_config`); a
    `Simulation(..., clock=ClockSettings(...))` runs its rounds on this clock.
    """

    profile: DeviceProfile = DeviceProfile()
    availability: Availability = Availability()
    over_selection: float = 1.0
    deadline: float = 0.0
    start_time: float = 0.0

    def __post_init__(self) -> None:
        over_selected(1, self.over_selection)
        if not (math.isfinite(self.deadline) and self.deadline >= 0):
            raise ValueError(f"config key clock.deadline must be finite and >= 0 (0 = none), got {self.deadline}")
        if not math.isfinite(self.start_time):
            raise ValueError(f"config key clock.start_time must be finite, got {self.start_time}")

    @classmethod
    def from_config(cls, clock: Any) -> ClockSettings:
        """From a training config's `clock` section (a mapping with the keys of `to_config`; `enabled` ignored)."""
        get = clock.get
        profile = DeviceProfile(**{f.name: type(f.default)(get(f.name, f.default))
                                   for f in dataclasses.fields(DeviceProfile)})
        availability = Availability(
            kind=str(get("availability", "always")),
            **{f.name: type(f.default)(get(f.name, f.default)) for f in dataclasses.fields(Availability)
               if f.name != "kind"})
        return cls(profile, availability, float(get("over_selection", 1.0)), float(get("deadline", 0.0)),
                   float(get("start_time", 0.0)))

    def to_config(self) -> dict[str, Any]:
        """The flat `clock.*` keys of a training config that give these settings (with `enabled: True`)."""
        availability = dataclasses.asdict(self.availability)
        return {"enabled": True, "over_selection": self.over_selection, "deadline": self.deadline,
                "start_time": self.start_time, **dataclasses.asdict(self.profile),
                "availability": availability.pop("kind"), **availability}

    def round_clock(self, seed: int, work: np.ndarray, k: int) -> RoundClock:
        """The chain of rounds of a run with `seed`, per-client `work` and `k` clients kept per round."""
        return RoundClock(seed, work, k, self.over_selection, self.deadline, self.profile, self.availability,
                          self.start_time)


class RoundClock:
    """The synchronous rounds' clock: round r starts at round r-1's end, round 0 at `start_time`.

    `outcome(r)` computes rounds 0..r once (cheap NumPy) and caches them,
    so the cohort of round r is a pure function of the config and r, the
    same after a resume. Thread-safe (the cohort pipeline asks from threads).
    """

    def __init__(self, seed: int, work: np.ndarray, k: int, over_selection: float, deadline: float,
                 profile: DeviceProfile, availability: Availability, start_time: float = 0.0) -> None:
        self.seed = int(seed)
        self.work = np.array(work, np.float64)
        self.work.setflags(write=False)
        self.k = int(k)
        self.over_selection = float(over_selection)
        self.deadline = float(deadline)
        self.profile = profile
        self.availability = availability
        self.start_time = float(start_time)
        self._outcomes: list[RoundOutcome] = []
        self._lock = threading.Lock()
        over_selected(self.k, self.over_selection)  # validates

    @property
    def num_clients(self) -> int:
        return int(self.work.size)

    @property
    def slots(self) -> int:
        """Most clients a round keeps (k)."""
        return self.k

    def outcome(self, round_index: int) -> RoundOutcome:
        """Round `round_index` on the clock (computing the rounds before it if not yet done)."""
        if round_index < 0:
            raise ValueError(f"round {round_index} < 0")
        with self._lock:
            while len(self._outcomes) <= round_index:
                r = len(self._outcomes)
                start = self._outcomes[-1].end_time if self._outcomes else self.start_time
                self._outcomes.append(sample_with_deadline(
                    self.seed, r, start, self.num_clients, self.k, self.over_selection, self.deadline,
                    self.profile, self.availability, self.work))
            return self._outcomes[round_index]

    def metrics(self, round_index: int) -> dict[str, float | int]:
        """The round's clock numbers for metrics.jsonl."""
        o = self.outcome(round_index)
        return {"simulated_time": o.end_time, "simulated_round_seconds": o.duration,
                "clients_sampled": int(o.sampled.size), "clients_available": o.num_available,
                "clients_dropped": o.dropped, "clients_dropped_offline": o.dropped_offline,
                "clients_dropped_late": o.dropped_late}
