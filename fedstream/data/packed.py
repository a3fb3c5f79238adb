"""A round's clients packed onto devices x lanes, in chunks of bounded size (pure NumPy, no I/O).

A round's plan comes from client step counts alone, so every process
computes the same one without reading data:

* **Bins.** Each device runs `lanes` clients in lockstep; a bin is one
  (device, lane). Clients go longest-first to the least-loaded bin
  (`pack_clients`), and each bin runs its clients one after another, by
  rank (the order in which they were assigned).
* **Chunks.** The round executes rank-major (all bins' first clients, then
  their second ones, ...), cut into chunks of `chunk_clients` consecutive
  clients. A chunk is one call of the compiled round, which carries every
  bin's running sums to the next call; since each bin meets its clients in
  the same order whatever the chunk size, a chunked round computes exactly
  what the whole round in one call does.
* **Examples stored once.** Per bin, a chunk holds its clients' examples
  (`[devices, lanes, E, ...]`, each kept example once) and an `index`
  (`[devices, lanes, S, batch]`) of positions into them, -1 for padding:
  local epochs are orders of positions (`client_epoch_plan`), gathered on the
  device, so a chunk's bytes do not grow with the number of epochs.
  Client slot k of a bin (`slot_*`, `[devices, lanes, K]`) trains
  `slot_steps` steps from step `slot_offset` of the bin's index.

Stream lengths, example counts and slot counts are bucketed (`bucket_steps`)
so few program shapes are compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from fedstream.data.packing import bucket_steps, pack_clients

SLOT_KEYS = ("slot_offset", "slot_steps", "slot_weight", "slot_client", "slot_examples")
INDEX_BYTES = 4  # one int32 position per example a step reads


@dataclasses.dataclass(frozen=True)
class RoundLayout:
    """Where a round's clients run (see the module docstring).

    Attributes:
      num_devices, lanes: the bins are `num_devices * lanes` (device-major).
      bin: per cohort position, its bin (`device * lanes + lane`), -1 for a
        client without steps (it takes no slot).
      order: cohort positions in execution order: rank-major, then by bin;
        clients without steps last (in cohort order).
      load: steps per bin over the whole round.
    """

    num_devices: int
    lanes: int
    bin: np.ndarray
    order: np.ndarray
    load: np.ndarray


def plan_round(step_counts: Sequence[int], num_devices: int, lanes: int = 1) -> RoundLayout:
    """The layout of a round whose cohort positions take `step_counts` steps (deterministic)."""
    counts = np.asarray(step_counts, np.int64)
    bins, offset, load = pack_clients(counts, num_devices * lanes)
    trained = np.flatnonzero(counts > 0)
    by_bin = trained[np.lexsort((offset[trained], bins[trained]))]  # each bin's clients in stream order
    rank = np.zeros(counts.size, np.int64)
    if by_bin.size:
        starts = np.r_[0, np.flatnonzero(np.diff(bins[by_bin])) + 1]
        first = np.repeat(starts, np.diff(np.r_[starts, by_bin.size]))
        rank[by_bin] = np.arange(by_bin.size) - first
    executed = trained[np.lexsort((bins[trained], rank[trained]))]
    order = np.concatenate([executed, np.flatnonzero(counts == 0)]).astype(np.int64)
    bin_of = np.where(counts > 0, bins, -1).astype(np.int64)
    return RoundLayout(num_devices, lanes, bin_of, order, np.asarray(load, np.int64))


def example_bytes(schema: Any, features: Sequence[str]) -> int:
    """Bytes of one example's training features."""
    return int(sum(np.dtype(schema[name].dtype).itemsize * int(np.prod(schema[name].shape, dtype=np.int64))
                   for name in features))


def chunk_clients_for_budget(client_bytes: np.ndarray, budget: int, slots: int) -> int:
    """Clients per chunk: the most whose largest members (of the split) still fit `budget` bytes.

    `client_bytes` holds each client's packed bytes (its kept examples plus
    its step index). The bound holds for any cohort, so a chunk's real data
    never exceeds the budget; 0 means no budget (one chunk per round).
    """
    if budget <= 0 or slots <= 1:
        return max(int(slots), 1)
    largest = np.cumsum(np.sort(np.asarray(client_bytes, np.int64))[::-1][:slots])
    return int(np.clip(np.searchsorted(largest, budget, side="right"), 1, slots))


def empty_chunk_batch(schema: Any, features: Sequence[str], batch_size: int, rows: int, lanes: int, steps: int,
                      examples: int, slots: int, extra_slot_keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """An all-padding chunk: `[rows, lanes, examples, ...]` features, a -1 `index` `[rows, lanes, steps, batch]`
    and `[rows, lanes, slots]` slot arrays (weight 0: unused), plus int32 `extra_slot_keys` (an algorithm's
    own per-client slot features, e.g. FedBuff's `slot_version`)."""
    batch = {name: np.zeros((rows, lanes, examples, *schema[name].shape), np.dtype(schema[name].dtype))
             for name in features}
    batch["index"] = np.full((rows, lanes, steps, batch_size), -1, np.int32)
    for key in (*SLOT_KEYS, *extra_slot_keys):
        batch[key] = np.zeros((rows, lanes, slots), np.float32 if key == "slot_weight" else np.int32)
    return batch


def chunk_members(elements: Sequence[Mapping[str, Any]], bins: int) -> list[list[Mapping[str, Any]]]:
    """Each bin's clients with steps, in the chunk's (execution) order."""
    members: list[list[Mapping[str, Any]]] = [[] for _ in range(bins)]
    for e in elements:
        if int(e["steps"]) > 0:
            members[int(e["bin"])].append(e)
    return members


def chunk_dims(members: Sequence[Sequence[Mapping[str, Any]]], examples_per_step: float = 0.0) -> tuple[int, int, int]:
    """A chunk's bucketed (steps, kept examples, client slots) per bin: its compiled shape, from sizes alone.

    With `examples_per_step` > 0 (a bound on kept examples per step that
    holds for every client: batch / epochs when steps are not capped), the
    example count follows from the step count, so it adds no shapes to compile.
    """
    steps = bucket_steps(max((sum(int(e["steps"]) for e in m) for m in members), default=1))
    if examples_per_step > 0:
        kept = max(1, math.ceil(steps * examples_per_step))
    else:
        kept = bucket_steps(max((sum(int(e["kept"]) for e in m) for m in members), default=1))
    return steps, kept, bucket_steps(max(map(len, members), default=1))


def pack_chunk(elements: Sequence[Mapping[str, Any]], schema: Any, features: Sequence[str], batch_size: int,
               num_devices: int, lanes: int, rows: Sequence[int], examples_per_step: float = 0.0,
               extra_slot_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Packs one chunk's client elements (in execution order) into the arrays of one round call.

    Each element has `bin`, `steps`, `weight`, `client`, `examples_used`,
    and, for clients of the devices in `rows` (mesh positions built here),
    `data` (its kept examples per feature) and `order` (`client_epoch_plan`'s
    positions); with `extra_slot_keys`, `slot_extra` maps each key to the
    client's value. Returns `batch` and the chunk's `executed_step_slots`: bins x
    the busiest device's lockstep steps (lanes wait for their slowest lane).
    """
    row_of = {d: i for i, d in enumerate(rows)}
    members = chunk_members(elements, num_devices * lanes)
    batch = empty_chunk_batch(schema, features, batch_size, len(rows), lanes, *chunk_dims(members, examples_per_step),
                              extra_slot_keys)
    for b, m in enumerate(members):
        device, lane = divmod(b, lanes)
        if device not in row_of:
            continue
        r = row_of[device]
        t = x = 0
        for k, e in enumerate(m):
            if e.get("order") is None:
                raise RuntimeError(f"client {e['client']} of round {e['round']} was not loaded for device {device}; "
                                   "the cohort pipeline and the packing disagree")
            s, n = int(e["steps"]), int(e["kept"])
            for name in features:
                batch[name][r, lane, x:x + n] = e["data"][name]
            order = np.asarray(e["order"])
            batch["index"][r, lane, t:t + s] = np.where(order >= 0, order + x, -1).reshape(s, batch_size)
            batch["slot_offset"][r, lane, k] = t
            batch["slot_steps"][r, lane, k] = s
            batch["slot_weight"][r, lane, k] = e["weight"]
            batch["slot_client"][r, lane, k] = e["client"]
            batch["slot_examples"][r, lane, k] = e["examples_used"]
            for key in extra_slot_keys:
                batch[key][r, lane, k] = e["slot_extra"][key]
            t += s
            x += n
    lockstep = np.zeros(num_devices, np.int64)
    for device in range(num_devices):
        ranks = [[int(e["steps"]) for e in members[device * lanes + lane]] for lane in range(lanes)]
        depth = max(map(len, ranks), default=0)
        lockstep[device] = sum(max(r[k] if k < len(r) else 0 for r in ranks) for k in range(depth))
    return {"batch": batch, "executed_step_slots": int(num_devices * lanes * lockstep.max(initial=0))}


def idle_step_fraction(executed_step_slots: int, steps: int) -> float:
    """Idle (device, lane)-steps / step slots executed: the round's padding waste (0 when nothing ran)."""
    return 1.0 - steps / executed_step_slots if executed_step_slots else 0.0


def unpack_clients(batch: Mapping[str, np.ndarray], features: Sequence[str]) -> dict[int, dict[str, Any]]:
    """{client: its `[steps, batch, ...]` feature batches (zeros where masked), `mask` and `weight`} (for checks)."""
    out: dict[int, dict[str, Any]] = {}
    rows, lanes, slots = batch["slot_steps"].shape
    for r in range(rows):
        for lane in range(lanes):
            for k in range(slots):
                s = int(batch["slot_steps"][r, lane, k])
                if s == 0:
                    continue
                t = int(batch["slot_offset"][r, lane, k])
                index = batch["index"][r, lane, t:t + s]
                mask = index >= 0
                safe = np.where(mask, index, 0)
                client = {name: batch[name][r, lane][safe] for name in features}
                for values in client.values():
                    values[~mask] = 0  # padding reads position 0; show it as zeros, as the mask says
                client.update(mask=mask, weight=float(batch["slot_weight"][r, lane, k]),
                              examples_used=int(batch["slot_examples"][r, lane, k]))
                out[int(batch["slot_client"][r, lane, k])] = client
    return out
