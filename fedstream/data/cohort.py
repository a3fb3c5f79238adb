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

Two samplings (`CohortPipeline.sampling`):

* ``uniform``: `cohort_size` distinct clients, uniformly without replacement.
* ``poisson``: every client independently with probability q
  (`sampling_rate`, or `cohort_size / N` when that is 0), so the cohort size
  is Binomial(N, q) with mean qN. Rounds keep a static number of slots (the
  cap `max_cohort_size`, by default the smallest k with
  P(Binomial(N, q) > k) <= 1e-9); unused slots are empty clients (no steps,
  weight 0). A round that draws more clients than the cap is refused, before
  the first round runs: dropping clients would change the sampling that a
  privacy accountant assumes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import grain
import numpy as np

from fedstream.data.format import DatasetFormatError
from fedstream.data.packing import bucket_steps, pack_clients, padding_waste

# Sub-streams of numpy's seed sequence, so that sampling and shuffling never
# share random numbers.
_COHORT_STREAM = 0
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2


class ClientDataSource(Protocol):
    """What the pipeline needs from a dataset (`FederatedDataset` has it)."""

    schema: Any

    def client_sizes(self, split: str) -> np.ndarray: ...

    def get_client(self, split: str, client: str | int) -> dict[str, Any]: ...


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


def auto_data_threads(requested: int = 0) -> int:
    """Reader threads: `requested` if > 0, else a quarter of the CPU cores (at least 1).

    The data pipeline shares the host's cores with XLA, so it takes few of
    them; on a 2-core machine one and two threads measured the same within
    noise (benchmarks/README.md).
    """
    return requested if requested > 0 else max(1, (os.cpu_count() or 2) // 4)


SAMPLINGS = ("uniform", "poisson")
# Default cap of a Poisson cohort: P(cohort size > cap) <= this, per round.
POISSON_CAP_TAIL = 1e-9


def sample_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int, sampling: str = "uniform",
                  rate: float = 0.0) -> np.ndarray:
    """Client indices of a round, a function of (seed, round).

    ``uniform``: `cohort_size` clients without replacement. ``poisson``: each
    client independently with probability `rate` (`cohort_size` unused),
    in increasing order; the size is Binomial(num_clients, rate).
    """
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


@dataclasses.dataclass(frozen=True)
class CohortPipeline:
    """Rounds of packed client batches for training, streamed through Grain.

    Element `r` of the iterator is round `r`'s batch (see `pack_round`). The
    iterator's state is one integer (the next client slot), checkpointed with
    the server state so a restart continues from the same round.
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
    sampling: str = "uniform"  # 'uniform' (cohort_size clients) or 'poisson' (each client with rate q)
    sampling_rate: float = 0.0  # Poisson q; 0 = cohort_size / N (so the expected cohort size is cohort_size)
    max_cohort_size: int = 0  # Poisson slots per round (the cap); 0 = poisson_cap(N, q)
    # (label feature, number of classes): every client's labels are checked to lie in [0, classes) as read.
    label_range: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        _fixed_features(self.source.schema, self.features)
        if self.sampling == "poisson":
            if self.max_cohort_size < 0 or self.max_cohort_size > len(self.sizes):
                raise ValueError(f"max_clients_per_round={self.max_cohort_size} must be in 0..{len(self.sizes)} "
                                 "(0 = automatic)")
            sample_cohort(self.seed, 0, len(self.sizes), 0, "poisson", self.rate)  # validates the rate
        else:
            sample_cohort(self.seed, 0, len(self.sizes), self.cohort_size, self.sampling)  # validates the size
        _check_local_devices(self.local_devices, self.num_devices)

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

    def check_cohort_sizes(self, num_rounds: int) -> int:
        """The largest Poisson cohort of rounds 0..num_rounds-1; raises if one exceeds the cap."""
        largest = 0
        for r in range(num_rounds):
            largest = max(largest, len(self.cohort(r)))
        return largest

    def round_plan(self, round_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`pack_clients` of a round's cohort: (device, offset, load), from client sizes alone.

        Every process computes the same plan without reading any data, and
        then reads only the clients of its own devices.
        """
        return _cached_plan(self, round_index)

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        return np.asarray(self.source.client_sizes(self.split), np.int64)

    def cohort(self, round_index: int) -> np.ndarray:
        """Client indices of round `round_index` (under Poisson sampling, at most `slots` of them, else an error)."""
        cohort = _cached_cohort(self.seed, round_index, len(self.sizes), self.cohort_size, self.sampling, self.rate)
        if len(cohort) > self.slots:
            raise RuntimeError(
                f"round {round_index}: Poisson sampling (q={self.rate:.6g}, N={len(self.sizes)}) drew {len(cohort)} "
                f"clients, more than the {self.slots} slots per round; raise config key max_clients_per_round "
                "(dropping clients would change the sampling the privacy accounting assumes)")
        return cohort

    def load_slot(self, slot: int) -> dict[str, Any]:
        """One client of one round: its decoded examples and their step order (Grain map, in threads).

        A slot past a Poisson cohort's size is padding: an empty client with weight 0 (`padding` True).
        """
        round_index, position = divmod(slot, self.slots)
        cohort = self.cohort(round_index)
        if position >= len(cohort):
            return {"round": round_index, "client": -1, "num_examples": 0, "steps": 0, "weight": 0.0,
                    "examples_used": 0, "data": None, "order": None, "padding": True}
        client = int(cohort[position])
        num_examples = int(self.sizes[client])
        element: dict[str, Any] = {"round": round_index, "client": client, "num_examples": num_examples}
        if num_examples == 0:
            element.update(steps=0, weight=0.0, examples_used=0, data=None, order=None)
            return element
        used = self.batching.examples_used(num_examples)
        element.update(steps=self.batching.num_steps(num_examples), examples_used=used,
                       weight=1.0 if self.uniform_weights else float(used), data=None, order=None)
        if self.local_devices is None or int(self.round_plan(round_index)[0][position]) in self.local_devices:
            order = client_example_order(self.seed, round_index, client, num_examples, self.batching)
            data = self.source.get_client(self.split, client)
            data = {name: np.asarray(data[name]) for name in self.features}
            if self.label_range is not None:
                check_labels(data, *self.label_range, self.source, self.split, client)
            if self.augment is not None:
                data = self.augment(data, np.random.default_rng([self.seed, round_index, client, _AUGMENT_STREAM]))
            element.update(data=data, order=order)
        return element

    def pack(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Packs one round's client elements into per-device step streams (Grain batch_fn)."""
        return pack_round(elements, self.source.schema, self.features, self.batching.batch_size, self.num_devices,
                          self.local_devices)

    def iterator(self, num_rounds: int) -> grain.DatasetIterator:
        """Iterator over rounds 0..num_rounds-1.

        Clients are read and decoded in `data_threads` threads, and whole
        packed rounds are prepared one round ahead in a background thread, so
        round r+1's data is ready while round r computes.
        """
        threads = max(int(self.data_threads), 0)
        slots = self.slots
        if self.sampling == "poisson":  # refuse an over-full round now rather than mid-run
            self.check_cohort_sizes(num_rounds)
        dataset = (
            grain.MapDataset.range(num_rounds * slots)
            .map(self.load_slot)
            .to_iter_dataset(grain.ReadOptions(
                num_threads=threads, prefetch_buffer_size=client_read_ahead(slots, threads)))
            .batch(slots, drop_remainder=True, batch_fn=self.pack)
        )
        if threads:
            dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=1)
        return iter(dataset)


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


def _check_local_devices(local_devices: tuple[int, ...] | None, num_devices: int) -> None:
    if local_devices is not None and (not local_devices or sorted(set(local_devices)) != list(local_devices)
                                      or local_devices[0] < 0 or local_devices[-1] >= num_devices):
        raise ValueError(f"local_devices {local_devices} must be increasing mesh positions in 0..{num_devices - 1}")


def local_rows(local_devices: tuple[int, ...] | None, num_devices: int) -> tuple[int, ...]:
    """Mesh positions whose rows this process builds (all of them when `local_devices` is None)."""
    return tuple(range(num_devices)) if local_devices is None else tuple(local_devices)


@functools.lru_cache(maxsize=8)
def _cached_plan(pipeline: CohortPipeline, round_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cohort = pipeline.cohort(round_index)
    steps = [pipeline.batching.num_steps(int(pipeline.sizes[c])) for c in cohort]
    steps += [0] * (pipeline.slots - len(steps))  # Poisson padding slots, as `pack_round` sees them
    return pack_clients(steps, pipeline.num_devices)


@functools.lru_cache(maxsize=16)
def _cached_cohort(seed: int, round_index: int, num_clients: int, cohort_size: int, sampling: str = "uniform",
                   rate: float = 0.0) -> np.ndarray:
    cohort = sample_cohort(seed, round_index, num_clients, cohort_size, sampling, rate)
    cohort.setflags(write=False)
    return cohort


def empty_round_batch(schema: Any, features: Sequence[str], batch_size: int, num_devices: int, length: int,
                      slots: int) -> dict[str, np.ndarray]:
    """An all-padding round batch: step streams `[devices, length, batch, ...]` and `slots` client slots per device.

    `num_devices` is the number of rows built here: all devices, or this
    process's devices in a multi-process run.

    Client slot k of device d trains `slot_steps[d, k]` steps starting at step
    `slot_offset[d, k]` of that device's stream; its update is weighted by
    `slot_weight[d, k]` (0 for unused slots), its RNG keys derive from
    `slot_client[d, k]`, and its first `slot_examples[d, k]` example
    positions are its first epoch (each used example once).
    """
    lead = (num_devices, length)
    batch = {name: np.zeros(lead + (batch_size, *schema[name].shape), np.dtype(schema[name].dtype))
             for name in features}
    batch["mask"] = np.zeros(lead + (batch_size,), bool)
    batch["slot_offset"] = np.zeros((num_devices, slots), np.int32)
    batch["slot_steps"] = np.zeros((num_devices, slots), np.int32)
    batch["slot_weight"] = np.zeros((num_devices, slots), np.float32)
    batch["slot_client"] = np.zeros((num_devices, slots), np.int32)
    batch["slot_examples"] = np.zeros((num_devices, slots), np.int32)
    return batch


def pack_round(
    elements: Sequence[dict[str, Any]],
    schema: Any,
    features: Sequence[str],
    batch_size: int,
    num_devices: int,
    local_devices: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Packs client elements (from `CohortPipeline.load_slot`) onto devices.

    Returns a dict with `batch` (see `empty_round_batch`; one slot per
    cohort position, Poisson padding included) and host-side round
    statistics (`cohort_size`: clients sampled, padding excluded). With `local_devices`
    (mesh positions), only those devices' rows are built, in that order; the
    plan and the statistics are the same on every process.
    """
    steps = [int(e["steps"]) for e in elements]
    device, offset, load = pack_clients(steps, num_devices)
    length = bucket_steps(int(load.max()) if load.size else 1)
    rows = local_rows(local_devices, num_devices)
    row_of = {d: i for i, d in enumerate(rows)}
    batch = empty_round_batch(schema, features, batch_size, len(rows), length, len(elements))
    used = np.zeros(len(rows), np.int64)
    for e, device_position, o, s in zip(elements, device, offset, steps):
        if s == 0 or int(device_position) not in row_of:
            continue
        d = row_of[int(device_position)]
        order = e["order"]
        if order is None or order.size != s * batch_size:
            raise RuntimeError(f"client {e['client']} of round {e['round']} was not loaded for device "
                               f"{int(device_position)}; the cohort pipeline and the packing disagree")
        valid = order >= 0
        batch["mask"][d, o:o + s] = valid.reshape(s, batch_size)
        take = np.where(valid, order, 0)
        for name in features:  # gather straight into the packed batch (no intermediate copy)
            out = batch[name][d, o:o + s].reshape(s * batch_size, *batch[name].shape[3:])
            np.take(e["data"][name], take, axis=0, out=out)
        k = used[d]
        used[d] += 1
        batch["slot_offset"][d, k] = o
        batch["slot_steps"][d, k] = s
        batch["slot_weight"][d, k] = e["weight"]
        batch["slot_client"][d, k] = e["client"]
        batch["slot_examples"][d, k] = e["examples_used"]
    rounds = {int(e["round"]) for e in elements}
    if len(rounds) != 1:
        raise RuntimeError(f"a packed round mixes rounds {sorted(rounds)}; the cohort pipeline is misaligned")
    return {
        "batch": batch,
        "round": rounds.pop(),
        "clients": np.array([e["client"] for e in elements if not e.get("padding")], np.int64),
        "cohort_size": sum(1 for e in elements if not e.get("padding")),
        "num_clients_trained": sum(1 for s in steps if s > 0),
        "num_clients_empty": sum(1 for e in elements if e["num_examples"] == 0 and not e.get("padding")),
        "num_examples": int(sum(int(e["examples_used"]) for e in elements)),
        "num_steps": int(sum(steps)),
        "stream_length": length,
        "padding_waste": padding_waste(load),
    }


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
        threads = max(int(self.data_threads), 0)
        dataset = (
            grain.MapDataset.range(num_clients)
            .map(self.load_client)
            .to_iter_dataset(grain.ReadOptions(
                num_threads=threads, prefetch_buffer_size=client_read_ahead(self.chunk_clients, threads)))
            .batch(self.chunk_clients, batch_fn=self.pack)
        )
        return iter(dataset)


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
        threads = max(int(self.data_threads), 0)
        dataset = (
            grain.MapDataset.range(len(self.sizes))
            .map(self.load_client)
            .to_iter_dataset(grain.ReadOptions(
                num_threads=threads, prefetch_buffer_size=client_read_ahead(self.chunk_clients, threads)))
            .batch(self.chunk_clients, batch_fn=self.pack)
        )
        return iter(dataset)


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
