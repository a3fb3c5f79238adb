"""Per-client persistent state on disk, read and written for the cohort only.

Algorithms such as SCAFFOLD (control variates), Ditto (personal models) and
top-k with error feedback (residuals) keep state per client. With 10^5
clients it cannot live in RAM or inside every checkpoint, so it lives in a
log-structured store under `<workdir>/client_state/`:

- Round r writes the new states of the clients it trained into one file,
  `round-<r>.states`: fixed-size records (one per client: the state's leaves
  as raw little-endian bytes, no header), written under a temporary name and
  renamed into place before round r's checkpoint is saved. Fixed-size
  records need no framing, so a client is read by offset through a memory
  map (ArrayRecord's framing and per-record calls cost ~4x in writes here).
- An index `round[c], position[c]` (two int32 arrays over the population,
  -1 = never trained: state is zeros) says where each client's latest state
  is. The index is saved *inside* each Orbax checkpoint, so a checkpoint and
  the client states it refers to always agree.
- Each file's sha256 is computed as it is written (`file_digests`); a
  checkpoint records those of the files its index refers to, and restoring
  from it checks them (`RunCheckpointer.restore_client_index`).
- Resuming from checkpoint r restores its index and deletes files of rounds
  after r (written by the killed run, never committed).
- A file is deleted once no committed checkpoint's index refers to it.
  Clients still living in mostly-dead files (less than `compact_below` of
  their records live) are carried into the current round's file, so the
  disk holds at most about twice the live states.

Reading a cohort costs one seek and one record read per client; writing
costs one sequential file per round. Multi-process runs are not supported
with per-client state (a clear error in the train loop).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from fedstream.io_safety import create_exclusive

_FILE = re.compile(r"^round-(\d{8})\.states$")


class ClientStateStore:
    """Per-client states shaped like `template` (a pytree of arrays), for clients 0..num_clients-1."""

    def __init__(self, directory: str | os.PathLike, template: Any, num_clients: int,
                 compact_below: float = 0.5) -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        leaves, self._treedef = jax.tree.flatten(template)
        self._shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        self._dtypes = [np.dtype(np.asarray(leaf).dtype).newbyteorder("<") for leaf in leaves]
        self._record = np.dtype([(f"f{i}", dt, shape) for i, (dt, shape) in enumerate(zip(self._dtypes, self._shapes))])
        self.num_clients = int(num_clients)
        self.round = np.full(self.num_clients, -1, np.int32)
        self.position = np.zeros(self.num_clients, np.int32)
        self.compact_below = float(compact_below)
        self._maps: dict[int, np.memmap] = {}
        self._file_records: dict[int, int] = {}  # round -> records in its file
        self._committed_refs: dict[int, np.ndarray] = {}  # checkpoint step -> rounds its index refers to
        self._digests: dict[int, str] = {}  # round -> sha256 of its file (as written, or as a checkpoint recorded)

    @property
    def record_bytes(self) -> int:
        """Bytes of one client's state."""
        return self._record.itemsize

    def _path(self, round_index: int) -> pathlib.Path:
        return self.directory / f"round-{round_index:08d}.states"

    def _map(self, round_index: int) -> np.memmap:
        if round_index not in self._maps:
            path = self._path(round_index)
            if not path.exists():
                raise FileNotFoundError(f"{path}: client-state file missing (the store and the checkpoint disagree)")
            size = path.stat().st_size
            if size % self._record.itemsize:
                raise ValueError(f"{path}: {size} bytes is not a whole number of {self._record.itemsize}-byte "
                                 "client states (corrupted, or written for another model)")
            if len(self._maps) >= 64:
                self._maps.pop(next(iter(self._maps)))
            self._maps[round_index] = np.memmap(path, self._record, mode="r")
        return self._maps[round_index]

    def read(self, clients: np.ndarray) -> Any:
        """States of `clients` (any int array shape S; -1 = no client) as a pytree with leaves `[*S, ...]`."""
        clients = np.asarray(clients)
        flat = clients.reshape(-1)
        table = np.zeros(flat.size, self._record)
        rounds = np.where(flat >= 0, self.round[np.maximum(flat, 0)], -1)
        for r in np.unique(rounds[rounds >= 0]):
            where = np.nonzero(rounds == r)[0]
            states = self._map(int(r))
            positions = self.position[flat[where]]
            if positions.max() >= len(states):
                raise ValueError(f"{self._path(int(r))}: holds {len(states)} client states, the index needs "
                                 f"position {int(positions.max())} (truncated?)")
            table[where] = states[positions]
        leaves = [table[f"f{i}"].reshape(*clients.shape, *shape).astype(dt.newbyteorder("="))
                  for i, (dt, shape) in enumerate(zip(self._dtypes, self._shapes))]
        return jax.tree.unflatten(self._treedef, leaves)

    def write(self, round_index: int, clients: np.ndarray, trained: np.ndarray, states: Any) -> None:
        """Stores the new states of the `trained` entries of `clients` (same shapes; leaves `[*S, ...]`).

        Live states of mostly-dead older files are carried into this file too.
        """
        clients = np.asarray(clients).reshape(-1)
        trained = np.asarray(trained, bool).reshape(-1)
        chosen = np.nonzero(trained & (clients >= 0))[0]
        table = np.zeros(chosen.size, self._record)
        for i, leaf in enumerate(jax.tree.leaves(states)):
            table[f"f{i}"] = np.asarray(leaf).reshape(clients.size, *self._shapes[i])[chosen]
        written = clients[chosen]
        carried = self._clients_to_compact(exclude=written)
        if carried.size:
            carried_table = np.zeros(carried.size, self._record)
            for r in np.unique(self.round[carried]):
                where = np.nonzero(self.round[carried] == r)[0]
                carried_table[where] = self._map(int(r))[self.position[carried[where]]]
            table = np.concatenate([table, carried_table])
            written = np.concatenate([written, carried])
        path = self._path(round_index)
        tmp = path.with_name(path.name + ".tmp")
        data = table.tobytes()
        with create_exclusive(tmp, "wb") as f:  # never through a planted symbolic link
            f.write(data)
        os.replace(tmp, path)
        self._digests[round_index] = hashlib.sha256(data).hexdigest()
        self._maps.pop(round_index, None)
        self._file_records[round_index] = int(written.size)
        self.round[written] = round_index
        self.position[written] = np.arange(written.size, dtype=np.int32)

    def _clients_to_compact(self, exclude: np.ndarray) -> np.ndarray:
        """Live clients of files whose live fraction fell below `compact_below` (not in `exclude`)."""
        live = self.round[self.round >= 0]
        if not live.size or self.compact_below <= 0:
            return np.zeros(0, np.int64)
        rounds, counts = np.unique(live, return_counts=True)
        sparse = [int(r) for r, n in zip(rounds, counts)
                  if n < self.compact_below * self._records_in(int(r))]
        if not sparse:
            return np.zeros(0, np.int64)
        candidates = np.nonzero(np.isin(self.round, sparse))[0]
        return np.setdiff1d(candidates, exclude)

    def _records_in(self, round_index: int) -> int:
        if round_index not in self._file_records:
            self._file_records[round_index] = self._path(round_index).stat().st_size // self._record.itemsize
        return self._file_records[round_index]

    def index(self) -> dict[str, np.ndarray]:
        """The index to save inside a checkpoint."""
        return {"round": self.round.copy(), "position": self.position.copy()}

    def file_name(self, round_index: int) -> str:
        """The name of round `round_index`'s file in the store's directory."""
        return self._path(round_index).name

    def file_digests(self, index: Mapping[str, np.ndarray] | None = None) -> dict[str, str]:
        """sha256 of each file `index` (default: the current one) refers to, by file name.

        Known from writing the file or from the checkpoint the store was
        restored from; a file of neither (a checkpoint of an older version
        recorded none) is hashed from disk once.
        """
        rounds = np.asarray((index or self.index())["round"])
        out = {}
        for r in np.unique(rounds[rounds >= 0]).tolist():
            if r not in self._digests:
                h = hashlib.sha256()
                with open(self._path(r), "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                self._digests[r] = h.hexdigest()
            out[self.file_name(r)] = self._digests[r]
        return out

    def restore(self, index: Mapping[str, np.ndarray], checkpoint_round: int,
                digests: Mapping[str, str] | None = None) -> None:
        """Adopts a checkpoint's index (and the file digests it recorded) and deletes files written after it."""
        by_name = {self.file_name(r): r for r in self._rounds_on_disk()}
        self._digests = {by_name[name]: str(d) for name, d in (digests or {}).items() if name in by_name}
        self.round = np.asarray(index["round"], np.int32).copy()
        self.position = np.asarray(index["position"], np.int32).copy()
        if self.round.shape != (self.num_clients,):
            raise ValueError(f"{self.directory}: checkpoint index covers {self.round.size} clients, "
                             f"the dataset has {self.num_clients}")
        for r in self._rounds_on_disk():
            if r > checkpoint_round:
                self._delete(r)
        for path in self.directory.glob("*.tmp"):
            path.unlink()

    def note_committed(self, step: int, index: Mapping[str, np.ndarray]) -> None:
        """Records which files a committed checkpoint's index refers to."""
        rounds = np.asarray(index["round"])
        self._committed_refs[int(step)] = np.unique(rounds[rounds >= 0])

    def collect_garbage(self, committed_steps: Iterable[int]) -> int:
        """Deletes files that neither a committed checkpoint nor the current index refers to; returns how many."""
        steps = set(int(s) for s in committed_steps)
        self._committed_refs = {s: v for s, v in self._committed_refs.items() if s in steps}
        live = set(np.unique(self.round[self.round >= 0]).tolist())
        for refs in self._committed_refs.values():
            live.update(refs.tolist())
        newest = max(steps | {int(self.round.max(initial=-1))}, default=-1)
        deleted = 0
        for r in self._rounds_on_disk():
            if r not in live and r <= newest:
                self._delete(r)
                deleted += 1
        return deleted

    def _rounds_on_disk(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _FILE.match(p.name)))

    def _delete(self, round_index: int) -> None:
        self._maps.pop(round_index, None)
        self._digests.pop(round_index, None)
        self._file_records.pop(round_index, None)
        self._path(round_index).unlink(missing_ok=True)

    def disk_bytes(self) -> int:
        """Bytes of the state files on disk."""
        return sum(self._path(r).stat().st_size for r in self._rounds_on_disk())

    def close(self) -> None:
        """Drops the memory maps."""
        self._maps.clear()
