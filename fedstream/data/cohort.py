"""The Grain cohort pipeline: from (seed, round) to device-ready round batches.

Everything a round reads is a pure function of (seed, round, client index):
which clients are sampled, the order of each client's examples, and the RNG
keys the round derives from the same numbers. Nothing depends on the device
count, on prefetching, or on restarts.

A round's clients are *packed* onto devices: each device gets one stream of
SGD steps in which several clients follow one another (the round starts each
client from the server model and runs exactly its own steps). Clients are
assigned longest-first to the least-loaded device, and the stream length is
rounded up to one of a few bucket sizes (2^k or 1.5 * 2^k), so unequal client
sizes waste little compute and the number of compiled round shapes stays
small. Leaves are shaped `[devices, steps, batch, ...]` with a per-example
`mask`, plus per device one slot per cohort client (offset and number of its
steps in the stream, weight, client index).

Three samplings (`CohortPipeline.sampling`):

* ``uniform``: `cohort_size` distinct clients, uniformly without replacement.
* ``poisson``: every client independently with probability q
  (`sampling_rate`, or `cohort_size / N` when that is 0), so the cohort size
  is Binomial(N, q) with mean qN. Rounds keep a static number of slots (the
  cap `max_cohort_size`, by default the smallest k with
  P(Binomial(N, q) > k) <= 1e-9); unused slots are empty clients (no steps,
  weight 0). A round that draws more clients than the cap is refused, before
  the first round runs: dropping clients would change the sampling that a
  privacy accountant assumes.
* ``epochs``: each epoch a permutation of the N clients drawn from (seed,
  epoch), cut into floor(N / m) rounds of m = `cohort_size` clients, so each
  client trains at most once per epoch (`fedstream.data.sampling.epoch_cohort`;
  the participation pattern DP-FTRL's accounting assumes).

With a simulated clock (`CohortPipeline.clock`, `fedstream.data.clock`), a
round over-selects online clients and keeps the first `cohort_size` to
finish before its deadline (fewer if fewer make it): `cohort_size` slots, the
unused ones empty, as under Poisson sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import grain
import numpy as np

from fedstream.data.clock import ClockSettings, RoundClock
from fedstream.data.format import DatasetFormatError
from fedstream.data.packed import (INDEX_BYTES, RoundLayout, chunk_clients_for_budget, chunk_dims, chunk_members,
                                   empty_chunk_batch, example_bytes, idle_step_fraction, pack_chunk, plan_round)
from fedstream.data.packing import bucket_steps, pack_clients, padding_waste  # noqa: F401
from fedstream.data.sampling import (POISSON_CAP_TAIL, SAMPLINGS, ClientBatching, client_epoch_plan,  # noqa: F401
                                     client_example_order, poisson_cap, poisson_rate, sample_cohort)

_AUGMENT_STREAM = 2  # the seed-sequence sub-stream of augmentation (see fedstream.data.sampling)


class ClientDataSource(Protocol):
    """What the pipeline needs from a dataset (`FederatedDataset` has it)."""

    schema: Any

    def client_sizes(self, split: str) -> np.ndarray: ...

    def get_client(self, split: str, client: str | int) -> dict[str, Any]: ...


def auto_data_threads(requested: int = 0) -> int:
    """Reader threads: `requested` if > 0, else a quarter of the CPU cores (at least 1).

    The data pipeline shares the host's cores with XLA, so it takes few of
    them; on a 2-core machine one and two threads measured the same within
    noise (benchmarks/README.md).
    """
    return requested if requested > 0 else max(1, (os.cpu_count() or 2) // 4)


def check_labels(data: Mapping[str, np.ndarray], key: str, num_classes: int, source: Any, split: str,
                 client: int) -> None:
    """Refuses a client whose labels `data[key]` fall outside [0, num_classes), naming the client and the range.

    Such labels would otherwise index past the model's logits and show up
    only as a diverging loss.
    """
    labels = data[key]
    if labels.size == 0 or labels.dtype.kind not in "iu":
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        ids = source.client_ids(split) if hasattr(source, "client_ids") else None
        name = repr(str(ids[client])) if ids is not None else f"at position {client}"
        raise DatasetFormatError(
            f"split {split!r}, client {name}: labels (feature {key!r}) range over [{low}, {high}], outside the "
            f"model's {num_classes} classes [0, {num_classes - 1}]; set config key model.num_classes (or the "
            f"model's num_classes) to at least {high + 1}, or fix the labels")


def _fixed_features(schema: Any, features: Sequence[str]) -> None:
    for name in features:
        if name not in schema:
            raise ValueError(f"feature {name!r} is not in the dataset schema ({', '.join(schema)})")
        if any(d is None for d in schema[name].shape):
            raise ValueError(f"feature {name!r} has a variable-length shape {schema[name].shape}; "
                             "training batches need fixed shapes (pad it in the recipe)")


# Packed bytes of one round call by default (a chunk's kept examples plus its step index); a round over it runs
# as several calls. The process holds about three chunks at a time (one being read, one on the device, one queued).
DEFAULT_CHUNK_BYTES = 128 << 20


@dataclasses.dataclass(frozen=True)
class CohortPipeline:
    """Rounds of packed client data for training, streamed through Grain in chunks.

    The iterator yields chunks (see `fedstream.data.packed`): round r's
    clients in execution order, `chunk_clients` per chunk, each element
    marked with its `round`, `chunk` and `num_chunks`. A round whose clients
    fit the byte budget `chunk_bytes` (0 = no budget) is one chunk. Which
    clients train, on which examples, and where they run are functions of
    (seed, round) and the client sizes alone, so the same round gives the
    same chunks after a restart, and on every process.
    """

    source: ClientDataSource
    split: str
    features: tuple[str, ...]
    seed: int
    cohort_size: int
    batching: ClientBatching
    num_devices: int
    uniform_weights: bool = False
    data_threads: int = 2
    local_devices: tuple[int, ...] | None = None
    augment: Callable[[Mapping[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]] | None = None
    sampling: str = "uniform"  # 'uniform' / 'epochs' (cohort_size clients) or 'poisson' (each client with rate q)
    sampling_rate: float = 0.0  # Poisson q; 0 = cohort_size / N (so the expected cohort size is cohort_size)
    max_cohort_size: int = 0  # Poisson slots per round (the cap); 0 = poisson_cap(N, q)
    # (label feature, number of classes): every client's labels are checked to lie in [0, classes) as read.
    label_range: tuple[str, int] | None = None
    lanes: int = 1  # clients each device runs in lockstep
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # packed bytes per round call; 0 = the whole round in one call
    # A simulated clock: rounds keep the first cohort_size over-selected online clients to finish (None = off).
    clock: ClockSettings | None = None
    # Where each round's cohort comes from instead of sampling or the clock's rounds: an object with
    # `cohort(round) -> client indices`, `slot_keys` and `slot_features(round) -> {key: value per cohort position}`
    # (FedBuff's arrivals of a server step and the model versions they started from:
    # `fedstream.data.async_schedule.AsyncSchedule`).
    schedule: Any = None

    @property
    def extra_slot_keys(self) -> tuple[str, ...]:
        """Per-client slot features of the schedule (none without one)."""
        return tuple(self.schedule.slot_keys) if self.schedule is not None else ()

    def __post_init__(self) -> None:
        _fixed_features(self.source.schema, self.features)
        if self.clock is not None and self.sampling != "uniform":
            raise ValueError(f"the simulated clock samples among online clients; sampling {self.sampling!r} cannot "
                             "be combined with it (config keys sampling, clock.enabled)")
        if self.sampling == "poisson":
            if self.max_cohort_size < 0 or self.max_cohort_size > len(self.sizes):
                raise ValueError(f"max_clients_per_round={self.max_cohort_size} must be in 0..{len(self.sizes)} "
                                 "(0 = automatic)")
            sample_cohort(self.seed, 0, len(self.sizes), 0, "poisson", self.rate)  # validates the rate
        else:
            sample_cohort(self.seed, 0, len(self.sizes), self.cohort_size, self.sampling)  # validates the size
        _check_local_devices(self.local_devices, self.num_devices)
        if self.lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {self.lanes}")
        if self.chunk_bytes < 0:
            raise ValueError(f"chunk_bytes must be >= 0 (0 = no budget), got {self.chunk_bytes}")
        if self.schedule is not None and (self.sampling != "uniform" or self.clock is not None):
            raise ValueError("an asynchronous schedule chooses the clients itself on its own clock; it needs "
                             "sampling='uniform' and no synchronous clock")

    @functools.cached_property
    def rate(self) -> float:
        """Poisson q (0.0 for uniform sampling)."""
        if self.sampling != "poisson":
            return 0.0
        return poisson_rate(self.sampling_rate, self.cohort_size, len(self.sizes))

    @functools.cached_property
    def slots(self) -> int:
        """Client slots per round: `cohort_size` (uniform) or the Poisson cap."""
        if self.sampling != "poisson":
            return self.cohort_size
        return self.max_cohort_size or poisson_cap(len(self.sizes), self.rate)

    @functools.cached_property
    def expected_cohort_size(self) -> float:
        """E[clients sampled per round]: `cohort_size`, or qN under Poisson sampling."""
        return self.rate * len(self.sizes) if self.sampling == "poisson" else float(self.cohort_size)

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        return np.asarray(self.source.client_sizes(self.split), np.int64)

    @functools.cached_property
    def client_bytes(self) -> np.ndarray:
        """Packed bytes of each client of the split in a round: kept examples once, plus one index per step example."""
        b = self.batching.batch_size
        steps = np.array([self.batching.num_steps(int(n)) for n in self.sizes], np.int64)
        kept = np.minimum(np.array([self.batching.examples_used(int(n)) for n in self.sizes], np.int64), steps * b)
        return kept * example_bytes(self.source.schema, self.features) + steps * b * INDEX_BYTES

    @functools.cached_property
    def chunk_clients(self) -> int:
        """Clients per round call: all of a round's, or fewer when the largest clients would exceed `chunk_bytes`."""
        return chunk_clients_for_budget(self.client_bytes, self.chunk_bytes, self.slots)

    @functools.cached_property
    def examples_per_step(self) -> float:
        """A bound on a client's kept examples per step (batch / epochs), or 0 when `max_steps` caps steps.

        Without a step cap a client keeps `used <= steps * batch / epochs`
        examples, so a chunk's example count follows from its step count.
        """
        return 0.0 if self.batching.max_steps else self.batching.batch_size / self.batching.epochs

    @functools.cached_property
    def chunks_per_round(self) -> int:
        return -(-self.slots // self.chunk_clients)

    @functools.cached_property
    def client_work(self) -> np.ndarray:
        """Examples each client of the split processes in a round (its steps' unmasked examples), the clock's work."""
        b = self.batching
        steps = np.array([b.num_steps(int(n)) for n in self.sizes], np.int64)
        used = np.array([b.examples_used(int(n)) for n in self.sizes], np.int64)
        return np.minimum(used * b.epochs, steps * b.batch_size)

    @functools.cached_property
    def round_clock(self) -> RoundClock | None:
        """The rounds on the simulated clock (None without one), shared by every round of the pipeline."""
        if self.clock is None:
            return None
        return self.clock.round_clock(self.seed, self.client_work, self.cohort_size)

    def check_cohort_sizes(self, num_rounds: int) -> int:
        """The largest Poisson cohort of rounds 0..num_rounds-1; raises if one exceeds the cap."""
        largest = 0
        for r in range(num_rounds):
            largest = max(largest, len(self.cohort(r)))
        return largest

    def cohort(self, round_index: int) -> np.ndarray:
        """Client indices of round `round_index` (under Poisson sampling, at most `slots` of them, else an error).

        With the simulated clock: the clients the round keeps (at most `slots`); with an asynchronous
        `schedule`: the updates of server step `round_index`.
        """
        if self.schedule is not None:
            return self.schedule.cohort(round_index)
        if self.round_clock is not None:
            return self.round_clock.outcome(round_index).kept
        cohort = _cached_cohort(self.seed, round_index, len(self.sizes), self.cohort_size, self.sampling, self.rate)
        if len(cohort) > self.slots:
            raise RuntimeError(
                f"round {round_index}: Poisson sampling (q={self.rate:.6g}, N={len(self.sizes)}) drew {len(cohort)} "
                f"clients, more than the {self.slots} slots per round; raise config key max_clients_per_round "
                "(dropping clients would change the sampling the privacy accounting assumes)")
        return cohort

    def round_layout(self, round_index: int) -> RoundLayout:
        """Where round `round_index`'s clients run (`plan_round`), from sizes alone (the same on every process)."""
        return _cached_layout(self, round_index)

    def describe_position(self, flat: int) -> dict[str, Any]:
        """Where one client of one chunk runs and what it trains, from sizes alone (no data read).

        Positions past a round's clients (the last chunk's tail, or a Poisson
        cohort smaller than the cap) are padding: no steps, weight 0.
        """
        per_round = self.chunks_per_round * self.chunk_clients
        round_index, rest = divmod(flat, per_round)
        chunk = rest // self.chunk_clients
        cohort = self.cohort(round_index)
        layout = self.round_layout(round_index)
        element: dict[str, Any] = {"round": round_index, "chunk": chunk, "num_chunks": self.chunks_per_round,
                                   "client": -1, "num_examples": 0, "steps": 0, "weight": 0.0, "examples_used": 0,
                                   "kept": 0, "bin": -1, "data": None, "order": None, "padding": True}
        position = int(layout.order[rest]) if rest < layout.order.size else len(cohort)
        if self.schedule is not None:
            features = self.schedule.slot_features(round_index)
            element["slot_extra"] = {k: int(features[k][position]) if position < len(cohort) else 0
                                     for k in self.extra_slot_keys}
        if position >= len(cohort):
            return element
        client = int(cohort[position])
        num_examples = int(self.sizes[client])
        steps = self.batching.num_steps(num_examples)
        used = self.batching.examples_used(num_examples)
        element.update(client=client, num_examples=num_examples, padding=False, steps=steps, examples_used=used,
                       kept=min(used, steps * self.batching.batch_size), bin=int(layout.bin[position]),
                       weight=(1.0 if self.uniform_weights else float(used)) if num_examples else 0.0)
        return element

    def chunk_shapes(self, rounds: Iterable[int]) -> set[tuple[int, int, int]]:
        """The compiled shapes (steps, examples, slots per bin) the chunks of `rounds` will have, from sizes alone."""
        per_round = self.chunks_per_round * self.chunk_clients
        shapes = set()
        for r in rounds:
            for chunk in range(self.chunks_per_round):
                start = r * per_round + chunk * self.chunk_clients
                elements = [self.describe_position(i) for i in range(start, start + self.chunk_clients)]
                shapes.add(chunk_dims(chunk_members(elements, self.num_devices * self.lanes), self.examples_per_step))
        return shapes

    def empty_chunk(self, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
        """An all-padding chunk of `shape` (from `chunk_shapes`) for this process's devices: to compile ahead."""
        return empty_chunk_batch(self.source.schema, self.features, self.batching.batch_size,
                                 len(local_rows(self.local_devices, self.num_devices)), self.lanes, *shape,
                                 self.extra_slot_keys)

    def load_position(self, flat: int) -> dict[str, Any]:
        """One client of one chunk (`describe_position`) with its kept examples and step positions (Grain map)."""
        element = self.describe_position(flat)
        round_index, client, num_examples, steps = element["round"], element["client"], element["num_examples"], \
            element["steps"]
        device = element["bin"] // self.lanes
        if steps and (self.local_devices is None or device in self.local_devices):
            kept, order = client_epoch_plan(self.seed, round_index, client, num_examples, self.batching)
            data = self.source.get_client(self.split, client)
            data = {name: np.asarray(data[name]) for name in self.features}
            if self.label_range is not None:
                check_labels(data, *self.label_range, self.source, self.split, client)
            if self.augment is not None:
                data = self.augment(data, np.random.default_rng([self.seed, round_index, client, _AUGMENT_STREAM]))
            element.update(data={name: np.take(v, kept, axis=0) for name, v in data.items()}, order=order)
        return element

    def pack(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Packs one chunk's client elements into the arrays of one round call, with its host-side statistics."""
        rows = local_rows(self.local_devices, self.num_devices)
        packed = pack_chunk(elements, self.source.schema, self.features, self.batching.batch_size, self.num_devices,
                            self.lanes, rows, self.examples_per_step, self.extra_slot_keys)
        keys = {(int(e["round"]), int(e["chunk"])) for e in elements}
        if len(keys) != 1:
            raise RuntimeError(f"a packed chunk mixes (round, chunk) {sorted(keys)}; the cohort pipeline is misaligned")
        (round_index, chunk), = keys
        real = [e for e in elements if not e["padding"]]
        return {
            **packed,
            "round": round_index,
            "chunk": chunk,
            "num_chunks": self.chunks_per_round,
            "clients": np.array([e["client"] for e in real], np.int64),
            "cohort_size": len(real),
            "num_clients_trained": sum(1 for e in real if e["steps"] > 0),
            "num_clients_empty": sum(1 for e in real if e["num_examples"] == 0),
            "num_examples": int(sum(int(e["examples_used"]) for e in real)),
            "num_steps": int(sum(int(e["steps"]) for e in real)),
            "stream_length": int(packed["batch"]["index"].shape[2]),
            "padding_waste": idle_step_fraction(packed["executed_step_slots"], sum(int(e["steps"]) for e in real)),
        }

    def iterator(self, num_rounds: int, start_round: int = 0) -> Iterator[dict[str, Any]]:
        """Chunks of rounds start_round..num_rounds-1, in order.

        Clients are read and decoded in `data_threads` threads, and packed
        chunks are prepared one ahead in a background thread, so the next
        chunk's data is ready while the current one computes.
        """
        if self.sampling == "poisson":  # refuse an over-full round now rather than mid-run
            self.check_cohort_sizes(num_rounds)
        if self.round_clock is not None and max(num_rounds, start_round):  # every round's clock now, not mid-run
            self.round_clock.outcome(max(num_rounds, start_round) - 1)
        per_round = self.chunks_per_round * self.chunk_clients
        return client_chunks(range(start_round * per_round, max(num_rounds, start_round) * per_round),
                             self.load_position, self.pack, self.chunk_clients, self.data_threads,
                             prefetch_chunk=True)

    def rounds(self, num_rounds: int, start_round: int = 0) -> Iterator[list[dict[str, Any]]]:
        """Whole rounds as lists of their chunks (for tests and small runs: a round's chunks are all held at once)."""
        iterator = self.iterator(num_rounds, start_round)
        for _ in range(start_round, num_rounds):
            yield [next(iterator) for _ in range(self.chunks_per_round)]


# Clients read ahead by Grain's thread pool, at most. Grain's prefetch iterator
# scans its whole buffer on every element (grain 0.2.x `_measure_prefetch_depth`),
# so a buffer of thousands of clients made a 3,000-client round cost 10-40 s of
# pure bookkeeping; whole rounds are still prepared ahead by the round-level
# prefetch thread, so a small client buffer loses nothing.
MAX_CLIENT_READ_AHEAD = 64


def client_read_ahead(clients: int, threads: int) -> int:
    """Grain's client prefetch buffer: 2 per thread at least, `MAX_CLIENT_READ_AHEAD` at most, 0 without threads."""
    if threads <= 0:
        return 0
    return int(min(max(int(clients), 2 * threads), max(MAX_CLIENT_READ_AHEAD, 2 * threads)))


def client_chunks(positions: range, load: Callable[[int], dict[str, Any]],
                  pack: Callable[[Sequence[dict[str, Any]]], dict[str, Any]], chunk: int, data_threads: int,
                  prefetch_chunk: bool = False) -> Iterator[dict[str, Any]]:
    """The one Grain chain of every pipeline: `load` each position (a client) in threads, `pack` groups of `chunk`.

    Positions are read `data_threads` at a time with a bounded read-ahead
    (`client_read_ahead`); a last group smaller than `chunk` is packed too
    (training positions come in whole chunks). With `prefetch_chunk`, the
    next packed group is prepared in a background thread while the caller
    works on the current one.
    """
    threads = max(int(data_threads), 0)
    dataset = (
        grain.MapDataset.range(positions.start, positions.stop)
        .map(load)
        .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                           prefetch_buffer_size=client_read_ahead(chunk, threads)))
        .batch(chunk, batch_fn=pack)
    )
    if prefetch_chunk and threads:
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=1)
    return iter(dataset)


def _check_local_devices(local_devices: tuple[int, ...] | None, num_devices: int) -> None:
    if local_devices is not None and (not local_devices or sorted(set(local_devices)) != list(local_devices)
                                      or local_devices[0] < 0 or local_devices[-1] >= num_devices):
        raise ValueError(f"local_devices {local_devices} must be increasing mesh positions in 0..{num_devices - 1}")


def local_rows(local_devices: tuple[int, ...] | None, num_devices: int) -> tuple[int, ...]:
    """Mesh positions whose rows this process builds (all of them when `local_devices` is None)."""
    return tuple(range(num_devices)) if local_devices is None else tuple(local_devices)


@functools.lru_cache(maxsize=8)
def _cached_layout(pipeline: CohortPipeline, round_index: int) -> RoundLayout:
    cohort = pipeline.cohort(round_index)
    steps = [pipeline.batching.num_steps(int(pipeline.sizes[c])) for c in cohort]
    steps += [0] * (pipeline.slots - len(steps))  # Poisson padding positions
    return plan_round(steps, pipeline.num_devices, pipeline.lanes)


@functools.lru_cache(maxsize=16)
def _cached_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int, sampling: str = "uniform",
                   rate: float = 0.0) -> np.ndarray:
    cohort = sample_cohort(seed, round_index, num_clients, cohort_size, sampling, rate)
    cohort.setflags(write=False)
    return cohort


def _padded_steps(data: Mapping[str, Any], features: Sequence[str], num_examples: int, steps: int,
                  batch_size: int) -> dict[str, np.ndarray]:
    """A client's examples as `[steps, batch_size, ...]` per feature, zero-padded, plus `mask` (True: a real one)."""
    shape = (steps, batch_size)
    pad = steps * batch_size - num_examples
    out = {}
    for name in features:
        values = np.asarray(data[name])
        out[name] = np.concatenate([values, np.zeros((pad, *values.shape[1:]), values.dtype)]).reshape(
            shape + values.shape[1:])
    out["mask"] = (np.arange(steps * batch_size) < num_examples).reshape(shape)
    return out


@dataclasses.dataclass(frozen=True)
class EvalPipeline:
    """All clients of a split in chunks, packed onto devices for evaluation.

    Each chunk's batch has `[devices, steps, batch, ...]` leaves, a `mask`, and
    per-step `slot` (the client's position in the chunk), so the evaluation
    step can sum losses per client.
    """

    source: ClientDataSource
    split: str
    features: tuple[str, ...]
    batch_size: int
    num_devices: int
    chunk_clients: int = 256
    data_threads: int = 2
    local_devices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _fixed_features(self.source.schema, self.features)
        _check_local_devices(self.local_devices, self.num_devices)

    def chunk_plan(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`pack_clients` of one chunk of clients, from their sizes alone (same on every process)."""
        sizes = self.sizes[chunk * self.chunk_clients:(chunk + 1) * self.chunk_clients]
        return pack_clients([math.ceil(int(n) / self.batch_size) for n in sizes], self.num_devices)

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        return np.asarray(self.source.client_sizes(self.split), np.int64)

    def load_client(self, client: int) -> dict[str, Any]:
        """One client's examples as `[steps, batch, ...]` plus a mask (Grain map)."""
        n = int(self.sizes[client])
        steps = math.ceil(n / self.batch_size)
        element: dict[str, Any] = {"client": client, "num_examples": n, "steps": steps, "data": None}
        chunk, position = divmod(client, self.chunk_clients)
        if n and (self.local_devices is None or int(self.chunk_plan(chunk)[0][position]) in self.local_devices):
            element["data"] = _padded_steps(self.source.get_client(self.split, client), self.features, n, steps,
                                            self.batch_size)
        return element

    def pack(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Packs up to `chunk_clients` clients onto devices (Grain batch_fn)."""
        steps = [int(e["steps"]) for e in elements]
        device, offset, load = pack_clients(steps, self.num_devices)
        length = bucket_steps(int(load.max()) if load.size else 1)
        rows = local_rows(self.local_devices, self.num_devices)
        row_of = {d: i for i, d in enumerate(rows)}
        lead = (len(rows), length)
        batch: dict[str, np.ndarray] = {
            name: np.zeros(lead + (self.batch_size, *self.source.schema[name].shape),
                           np.dtype(self.source.schema[name].dtype))
            for name in self.features
        }
        batch["mask"] = np.zeros(lead + (self.batch_size,), bool)
        batch["slot"] = np.zeros(lead, np.int32)
        for slot, (e, device_position, o, s) in enumerate(zip(elements, device, offset, steps)):
            if s == 0 or int(device_position) not in row_of:
                continue
            d = row_of[int(device_position)]
            for name in (*self.features, "mask"):
                batch[name][d, o:o + s] = e["data"][name]
            batch["slot"][d, o:o + s] = slot
        return {
            "batch": batch,
            "clients": np.array([e["client"] for e in elements], np.int64),
            "num_examples": np.array([e["num_examples"] for e in elements], np.int64),
        }

    def chunks(self) -> Iterator[dict[str, Any]]:
        """Yields packed chunks of `chunk_clients` clients (the last one may be smaller)."""
        num_clients = len(self.sizes)
        return client_chunks(range(num_clients), self.load_client, self.pack, self.chunk_clients, self.data_threads)


@dataclasses.dataclass(frozen=True)
class PersonalizedEvalPipeline:
    """Test clients in chunks, each with fine-tuning steps on its own train data, packed onto devices.

    For personalized evaluation ("FedAvg + fine-tune", Ditto's personal
    models; see `fedstream.training.personalized_eval`). Test client c is
    matched to the train client with the same id (by position when the
    source has no `client_ids`). Each device gets two streams: fine-tuning
    steps (`train_<feature>`, `train_mask`: `[devices, Lt, batch_size, ...]`)
    and test steps (`<feature>`, `mask`: `[devices, Le, eval_batch_size, ...]`);
    client slot k of device d (`[devices, slots]` arrays) fine-tunes for
    `slot_train_steps` steps from `slot_train_offset`, then is scored on
    `slot_eval_steps` test steps from `slot_eval_offset`, its sums going to
    position `slot_position` of the chunk. Test clients without examples get
    no slot (they count in no average).

    Fine-tuning is exactly `finetune_steps` = k full batches of `batch_size`
    (for a client with train data), in the order
    `client_example_order(seed, round_index, train client, n, finetune_batching(n))`:
    fresh permutations of the (capped) examples, as many epochs as k batches
    need, concatenated. A client without train data (or k = 0) is scored
    without fine-tuning.
    """

    source: ClientDataSource
    train_split: str
    test_split: str
    features: tuple[str, ...]
    eval_batch_size: int
    batch_size: int  # fine-tuning batch size (the client config's)
    finetune_steps: int
    seed: int
    round_index: int
    num_devices: int
    chunk_clients: int = 256
    data_threads: int = 2
    local_devices: tuple[int, ...] | None = None
    max_examples: int = 0  # cap of train examples per client (the client config's); 0 = none
    augment: Callable[[Mapping[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]] | None = None

    def __post_init__(self) -> None:
        _fixed_features(self.source.schema, self.features)
        _check_local_devices(self.local_devices, self.num_devices)
        if self.finetune_steps < 0 or self.eval_batch_size < 1 or self.batch_size < 1 or self.chunk_clients < 1:
            raise ValueError("finetune_steps must be >= 0, batch sizes and chunk_clients >= 1")

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """Test examples per test client."""
        return np.asarray(self.source.client_sizes(self.test_split), np.int64)

    @functools.cached_property
    def train_index(self) -> np.ndarray:
        """Per test client, the position of the train client with the same id, or -1."""
        num_train = len(self.source.client_sizes(self.train_split))
        if not hasattr(self.source, "client_ids"):
            positions = np.arange(len(self.sizes))
            return np.where(positions < num_train, positions, -1)
        lookup = {c: i for i, c in enumerate(np.asarray(self.source.client_ids(self.train_split)).tolist())}
        return np.array([lookup.get(c, -1) for c in np.asarray(self.source.client_ids(self.test_split)).tolist()],
                        np.int64)

    def finetune_batching(self, num_train_examples: int) -> ClientBatching:
        """Batching giving exactly `finetune_steps` full batches of a client's (capped) train examples."""
        used = min(num_train_examples, self.max_examples) if self.max_examples else num_train_examples
        epochs = max(1, math.ceil(self.finetune_steps * self.batch_size / max(used, 1)))
        return ClientBatching(self.batch_size, epochs=epochs, max_examples=self.max_examples,
                              max_steps=self.finetune_steps)

    @functools.cached_property
    def has_train_data(self) -> np.ndarray:
        """Per test client, whether the train client of the same id exists and has examples."""
        train_sizes = np.asarray(self.source.client_sizes(self.train_split), np.int64)
        if not train_sizes.size:
            return np.zeros(len(self.sizes), bool)
        return (self.train_index >= 0) & (train_sizes[np.maximum(self.train_index, 0)] > 0)

    @functools.cached_property
    def train_steps(self) -> np.ndarray:
        """Fine-tuning steps per test client: k if it has test and train data, else 0."""
        return np.where(self.has_train_data & (self.sizes > 0), self.finetune_steps, 0).astype(np.int64)

    @functools.cached_property
    def eval_steps(self) -> np.ndarray:
        """Test steps per test client."""
        return -(-self.sizes // self.eval_batch_size)

    def chunk_plan(self, chunk: int) -> dict[str, np.ndarray | int]:
        """Where each client of a chunk runs, from sizes alone (the same on every process).

        Clients go longest-first (fine-tuning plus test steps) to the
        least-loaded device; returns per chunk client `device`, `slot`
        (-1: no test data, no slot), `train_offset`, `eval_offset`, and the
        bucketed `train_length`, `eval_length` and `slots` per device.
        """
        return _cached_personal_plan(self, chunk)

    def load_client(self, client: int) -> dict[str, Any]:
        """One test client: test steps `[steps, batch, ...]` + mask, and its fine-tuning steps (Grain map)."""
        n, train_client = int(self.sizes[client]), int(self.train_index[client])
        element: dict[str, Any] = {"client": client, "num_examples": n, "eval_steps": int(self.eval_steps[client]),
                                   "train_steps": int(self.train_steps[client]), "train_client": train_client,
                                   "data": None, "train": None}
        chunk, position = divmod(client, self.chunk_clients)
        plan = self.chunk_plan(chunk)
        if not n or int(plan["slot"][position]) < 0 or (
                self.local_devices is not None and int(plan["device"][position]) not in self.local_devices):
            return element
        element["data"] = _padded_steps(self.source.get_client(self.test_split, client), self.features, n,
                                        element["eval_steps"], self.eval_batch_size)
        k = element["train_steps"]
        if k:
            train = self.source.get_client(self.train_split, train_client)
            train = {name: np.asarray(train[name]) for name in self.features}
            num_train = len(train[self.features[0]])
            if self.augment is not None:
                train = self.augment(train, np.random.default_rng(
                    [self.seed, self.round_index, train_client, _AUGMENT_STREAM]))
            order = client_example_order(self.seed, self.round_index, train_client, num_train,
                                         self.finetune_batching(num_train))
            valid = order >= 0
            take = np.where(valid, order, 0)
            element["train"] = {name: np.take(train[name], take, axis=0).reshape(k, self.batch_size,
                                                                                 *train[name].shape[1:])
                                for name in self.features}
            element["train"]["mask"] = valid.reshape(k, self.batch_size)
        return element

    def pack(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Packs one chunk's clients into per-device fine-tuning and test streams (Grain batch_fn)."""
        chunk = int(elements[0]["client"]) // self.chunk_clients
        plan = self.chunk_plan(chunk)
        rows = local_rows(self.local_devices, self.num_devices)
        row_of = {d: i for i, d in enumerate(rows)}
        schema = self.source.schema
        batch: dict[str, np.ndarray] = {}
        for prefix, length, size in (("", plan["eval_length"], self.eval_batch_size),
                                     ("train_", plan["train_length"], self.batch_size)):
            lead = (len(rows), int(length), size)
            for name in self.features:
                batch[prefix + name] = np.zeros(lead + tuple(schema[name].shape), np.dtype(schema[name].dtype))
            batch[prefix + "mask"] = np.zeros(lead, bool)
        slots = (len(rows), int(plan["slots"]))
        for key in ("slot_position", "slot_train_offset", "slot_train_steps", "slot_eval_offset",
                    "slot_eval_steps", "slot_client"):
            batch[key] = np.zeros(slots, np.int32)
        slot_train_client = np.full(slots, -1, np.int64)
        slot_test_client = np.full(slots, -1, np.int64)
        for position, e in enumerate(elements):
            slot, device = int(plan["slot"][position]), int(plan["device"][position])
            if slot < 0 or device not in row_of:
                continue
            d = row_of[device]
            if e["data"] is None:
                raise RuntimeError(f"test client {e['client']} was not loaded for device {device}; the "
                                   "personalized eval pipeline and its plan disagree")
            o, s = int(plan["eval_offset"][position]), e["eval_steps"]
            for name in (*self.features, "mask"):
                batch[name][d, o:o + s] = e["data"][name]
            t, k = int(plan["train_offset"][position]), e["train_steps"]
            if k:
                for name in (*self.features, "mask"):
                    batch["train_" + name][d, t:t + k] = e["train"][name]
            batch["slot_position"][d, slot] = position
            batch["slot_train_offset"][d, slot] = t
            batch["slot_train_steps"][d, slot] = k
            batch["slot_eval_offset"][d, slot] = o
            batch["slot_eval_steps"][d, slot] = s
            batch["slot_client"][d, slot] = max(e["train_client"], 0)
            slot_train_client[d, slot] = e["train_client"]
            slot_test_client[d, slot] = e["client"]
        return {
            "batch": batch,
            "clients": np.array([e["client"] for e in elements], np.int64),
            "num_examples": np.array([e["num_examples"] for e in elements], np.int64),
            "slot_train_client": slot_train_client,
            "slot_test_client": slot_test_client,
        }

    def chunks(self) -> Iterator[dict[str, Any]]:
        """Yields packed chunks of `chunk_clients` test clients (the last one may be smaller)."""
        return client_chunks(range(len(self.sizes)), self.load_client, self.pack, self.chunk_clients,
                             self.data_threads)


@functools.lru_cache(maxsize=8)
def _cached_personal_plan(pipeline: PersonalizedEvalPipeline, chunk: int) -> dict[str, np.ndarray | int]:
    part = slice(chunk * pipeline.chunk_clients, (chunk + 1) * pipeline.chunk_clients)
    train, test = pipeline.train_steps[part], pipeline.eval_steps[part]
    cost = np.where(test > 0, train + test, 0)
    device, _, _ = pack_clients(cost, pipeline.num_devices)
    slot = np.full(cost.size, -1, np.int64)
    train_offset = np.zeros(cost.size, np.int64)
    eval_offset = np.zeros(cost.size, np.int64)
    train_load = np.zeros(pipeline.num_devices, np.int64)
    eval_load = np.zeros(pipeline.num_devices, np.int64)
    count = np.zeros(pipeline.num_devices, np.int64)
    for i in np.argsort(-cost, kind="stable"):  # pack_clients' order
        if cost[i] == 0:
            continue
        d = int(device[i])
        slot[i], train_offset[i], eval_offset[i] = count[d], train_load[d], eval_load[d]
        count[d] += 1
        train_load[d] += train[i]
        eval_load[d] += test[i]
    return {"device": device, "slot": slot, "train_offset": train_offset, "eval_offset": eval_offset,
            "train_length": bucket_steps(int(train_load.max(initial=0))),
            "eval_length": bucket_steps(int(eval_load.max(initial=0))),
            "slots": bucket_steps(int(count.max(initial=0)))}
