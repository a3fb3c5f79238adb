"""Reader of a federated dataset directory (format version 1).

Opening checks the success marker, the format version, the schema, the
shards' sizes and the client index, and fails with a `DatasetFormatError`
that names the file. A client is read with one seek and sequential reads
from its shard. The object is picklable (readers are opened lazily, one per
thread), so it can be handed to Grain workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import threading
import zipfile
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from fedstream.data.format import (FORMAT_VERSION, INDEX_FILE, METADATA_FILE, SUCCESS_FILE, DatasetFormatError,
                                   Schema, decode_examples, file_sha256, schema_from_json)
from fedstream.data.writer import ASSETS_DIR, is_safe_split_name

# Random-access reader options: no readahead fill per seek (see docs/notes.md, 'ArrayRecord random access').
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_SHARD_NAME = re.compile(r"^shard-[0-9]{5}\.array_record$")


def _count_ok(value: Any) -> bool:
    """A count or size from the metadata: a JSON integer (not a bool) that fits int64 arithmetic."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


class FederatedDataset:
    """A preprocessed federated dataset: schema, splits, clients and their examples."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise DatasetFormatError(f"{self.path}: no such dataset directory")
        if not (self.path / SUCCESS_FILE).exists():
            raise DatasetFormatError(f"{self.path}: not a complete fedstream dataset (no {SUCCESS_FILE})")
        meta_path = self.path / METADATA_FILE
        try:
            self.metadata: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
            raise DatasetFormatError(f"{meta_path}: unreadable metadata ({type(e).__name__}: {e})") from None
        if not isinstance(self.metadata, dict):
            raise DatasetFormatError(f"{meta_path}: unreadable metadata (not a JSON object)")
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetFormatError(f"{meta_path}: format_version {version!r}, this fedstream reads "
                                     f"version {FORMAT_VERSION}")
        try:
            self.schema: Schema = schema_from_json(self.metadata["schema"])
            if not self.schema:
                raise ValueError("no features")
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetFormatError(f"{meta_path}: invalid schema ({type(e).__name__}: {e})") from None
        self._index: dict[str, dict[str, np.ndarray]] = {}
        self._shards: dict[str, list[dict[str, Any]]] = {}
        for split, info in self._check_splits(meta_path).items():
            self._shards[split] = info["shards"]
            for shard in info["shards"]:
                shard_path = self.path / shard["file"]
                if not shard_path.is_file():
                    raise DatasetFormatError(f"{shard_path}: shard listed in {meta_path} is missing")
                if shard_path.stat().st_size != shard["bytes"]:
                    raise DatasetFormatError(f"{shard_path}: {shard_path.stat().st_size} bytes, metadata says "
                                             f"{shard['bytes']} (truncated or modified)")
            self._index[split] = self._load_index(split, info)
        self._local = threading.local()

    def _check_splits(self, meta_path: pathlib.Path) -> dict[str, Any]:
        """The `splits` entry of the metadata, with every field the reader relies on type-checked
        and every shard path confined to `<split>/shard-NNNNN.array_record`."""
        splits = self.metadata.get("splits")
        if not isinstance(splits, dict):
            raise DatasetFormatError(f"{meta_path}: 'splits' is missing or not an object")
        for split, info in splits.items():
            where = f"{meta_path}: split {split!r}"
            if not is_safe_split_name(split):
                raise DatasetFormatError(f"{where}: invalid split name")
            try:
                counts_ok = all(_count_ok(info[k]) for k in ("num_clients", "num_examples"))
                shards = info["shards"]
                shards_ok = isinstance(shards, list) and all(
                    isinstance(sh["file"], str) and _count_ok(sh["num_records"]) and _count_ok(sh["bytes"])
                    and isinstance(sh["sha256"], str) for sh in shards)
            except (KeyError, TypeError) as e:
                raise DatasetFormatError(f"{where}: missing or malformed field ({type(e).__name__}: {e})") from None
            if not counts_ok or not shards_ok:
                raise DatasetFormatError(f"{where}: malformed num_clients, num_examples or shards")
            for sh in shards:
                parts = sh["file"].split("/")
                if len(parts) != 2 or parts[0] != split or not _SHARD_NAME.match(parts[1]):
                    raise DatasetFormatError(f"{where}: shard file {sh['file']!r} is not {split}/shard-NNNNN.array_record")
        return splits

    def _load_index(self, split: str, info: dict[str, Any]) -> dict[str, np.ndarray]:
        index_path = self.path / split / INDEX_FILE
        try:
            with np.load(index_path, allow_pickle=False) as f:
                index = {k: f[k] for k in ("client_ids", "shard", "start", "count")}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetFormatError(f"{index_path}: unreadable client index ({type(e).__name__}: {e})") from None

        def bad(why: str) -> DatasetFormatError:
            return DatasetFormatError(f"{index_path}: client index inconsistent with {METADATA_FILE}: {why}")

        if index["client_ids"].dtype.kind != "U" or any(index[k].dtype.kind not in "iu"
                                                         for k in ("shard", "start", "count")):
            raise bad("client_ids must be unicode and shard/start/count integers")
        if any(v.ndim != 1 for v in index.values()):
            raise bad("arrays must be one-dimensional")
        n = len(index["client_ids"])
        if any(len(v) != n for v in index.values()):
            raise bad(f"array lengths {[len(v) for v in index.values()]} differ")
        if n != info["num_clients"]:
            raise bad(f"{n} clients, metadata says {info['num_clients']}")
        if len(np.unique(index["client_ids"])) != n or (n and not index["client_ids"].all()):
            raise bad("client ids are not unique and non-empty")
        index["shard"] = index["shard"].astype(np.int64)  # int32 on disk; int64 avoids overflow below
        index["start"] = index["start"].astype(np.int64)
        index["count"] = index["count"].astype(np.int64)
        if int(index["count"].sum()) != info["num_examples"]:
            raise bad(f"counts sum to {int(index['count'].sum())}, metadata says {info['num_examples']} examples")
        records = np.array([s["num_records"] for s in info["shards"]], np.int64)
        if n and (index["shard"].min() < 0 or index["shard"].max() >= len(records)):
            raise bad(f"shard numbers outside 0..{len(records) - 1}")
        # start > records - count, not start + count > records: the sum of two large int64s wraps around.
        if n and ((index["start"] < 0).any() or (index["count"] < 0).any()
                  or (index["start"] > records[index["shard"]] - index["count"]).any()):
            raise bad("a client's record range lies outside its shard")
        for v in index.values():
            v.flags.writeable = False  # client_ids()/client_sizes() hand these out
        return index

    # Pickling drops the per-thread readers.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def splits(self) -> list[str]:
        """Split names, in metadata order (sorted by name)."""
        return list(self._index)

    def _split_index(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._index:
            raise DatasetFormatError(f"{self.path}: no split {split!r} (splits: {', '.join(self._index)})")
        return self._index[split]

    def client_ids(self, split: str) -> np.ndarray:
        """Client ids of a split, in index order."""
        return self._split_index(split)["client_ids"]

    def client_sizes(self, split: str) -> np.ndarray:
        """Example counts per client, in index order."""
        return self._split_index(split)["count"]

    def num_clients(self, split: str) -> int:
        """Number of clients (including empty ones) in a split."""
        return len(self.client_ids(split))

    def client_index(self, split: str, client_id: str) -> int:
        """Position of `client_id` in the split's index."""
        lookup = self.__dict__.setdefault("_positions", {})
        if split not in lookup:
            lookup[split] = {c: i for i, c in enumerate(self.client_ids(split).tolist())}
        try:
            return lookup[split][client_id]
        except KeyError:
            raise DatasetFormatError(f"{self.path}: no client {client_id!r} in split {split!r}") from None

    def _reader(self, split: str, shard: int) -> ArrayRecordReader:
        """This thread's reader of one shard, opened on first use (random-access options)."""
        readers = self._local.__dict__.setdefault("readers", {})
        key = (split, shard)
        if key not in readers:
            info = self._shards[split][shard]
            reader = ArrayRecordReader(str(self.path / info["file"]), READER_OPTIONS)
            if reader.num_records() != info["num_records"]:
                found = reader.num_records()
                reader.close()
                raise DatasetFormatError(f"{self.path / info['file']}: {found} records, {METADATA_FILE} "
                                         f"says {info['num_records']}")
            readers[key] = reader
        return readers[key]

    def get_client(self, split: str, client: str | int) -> dict[str, Any]:
        """All examples of one client, by id or by position, as NumPy arrays."""
        index = self._split_index(split)
        i = self.client_index(split, client) if isinstance(client, str) else int(client)
        if not 0 <= i < len(index["count"]):
            raise DatasetFormatError(f"{self.path}: client position {i} out of range for split {split!r}")
        count, start, shard = int(index["count"][i]), int(index["start"][i]), int(index["shard"][i])
        file = self._shards[split][shard]["file"]
        client_id = str(index["client_ids"][i])
        records = []
        if count:
            try:
                reader = self._reader(split, shard)
                reader.seek(start)
                read = reader.read
                records = [read() for _ in range(count)]
            except (RuntimeError, OSError, IndexError) as e:
                raise DatasetFormatError(f"{self.path / file}: cannot read client {client_id!r} of split "
                                         f"{split!r} ({e})") from None
        # The source string is built with plain formatting: pathlib's `/` costs ~10 µs, paid per client.
        return decode_examples(self.schema, records,
                               source=f"{os.path.join(self.path, file)} (split {split!r}, client {client_id!r})")

    def asset(self, name: str) -> bytes:
        """A file stored with the dataset (e.g. `vocab.json`), checked against its size and sha256."""
        info = self.metadata.get("assets", {}).get(name) if isinstance(self.metadata.get("assets"), dict) else None
        if not isinstance(info, dict):
            known = ", ".join(sorted(self.metadata.get("assets", {}) or {})) or "none"
            raise DatasetFormatError(f"{self.path}: no asset {name!r} (assets: {known})")
        path = self.path / ASSETS_DIR / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DatasetFormatError(f"{path}: unreadable asset ({e})") from None
        if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise DatasetFormatError(f"{path}: size or sha256 does not match {METADATA_FILE} (corrupted)")
        return data

    def verify(self) -> None:
        """Checks every shard's sha256 and record count against the metadata (reads all data)."""
        for split, shards in self._shards.items():
            for k, shard in enumerate(shards):
                shard_path = self.path / shard["file"]
                if file_sha256(shard_path) != shard["sha256"]:
                    raise DatasetFormatError(f"{shard_path}: sha256 does not match {METADATA_FILE} (corrupted)")
                try:
                    self._reader(split, k)
                except RuntimeError as e:
                    raise DatasetFormatError(f"{shard_path}: not a readable ArrayRecord file ({e})") from None
