"""Reader of a federated dataset directory (format version 1).

Opening checks the success marker, the format version, the schema, the
shards' sizes and the client index, and fails with a `DatasetFormatError`
that names the file. A client is read with one seek and sequential reads
from its shard. The object is picklable (readers are opened lazily, one per
thread), so it can be handed to Grain workers.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from fedstream.data.format import (FORMAT_VERSION, INDEX_FILE, METADATA_FILE, SUCCESS_FILE, DatasetFormatError,
                                   Schema, decode_examples, schema_from_json)
from fedstream.data.writer import _sha256

# Random-access reader options: no readahead fill per seek (STACK_NOTES §1).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


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
            self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetFormatError(f"{meta_path}: unreadable metadata ({e})") from None
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetFormatError(f"{meta_path}: format_version {version!r}, this fedstream reads "
                                     f"version {FORMAT_VERSION}")
        try:
            self.schema: Schema = schema_from_json(self.metadata["schema"])
            splits = self.metadata["splits"]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetFormatError(f"{meta_path}: invalid schema or splits ({e})") from None
        self._index: dict[str, dict[str, np.ndarray]] = {}
        self._shards: dict[str, list[dict[str, Any]]] = {}
        for split, info in splits.items():
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

    def _load_index(self, split: str, info: dict[str, Any]) -> dict[str, np.ndarray]:
        index_path = self.path / split / INDEX_FILE
        try:
            with np.load(index_path, allow_pickle=False) as f:
                index = {k: f[k] for k in ("client_ids", "shard", "start", "count")}
        except (OSError, KeyError, ValueError) as e:
            raise DatasetFormatError(f"{index_path}: unreadable client index ({e})") from None
        n = len(index["client_ids"])
        records = np.array([s["num_records"] for s in info["shards"]], np.int64)
        if (any(len(v) != n for v in index.values()) or n != info["num_clients"]
                or int(index["count"].sum()) != info["num_examples"]
                or (n and (index["shard"].min() < 0 or index["shard"].max() >= len(records)))
                or (n and (index["start"] + index["count"] > records[index["shard"]]).any())):
            raise DatasetFormatError(f"{index_path}: client index inconsistent with {METADATA_FILE}")
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

    def _reader(self, file: str) -> ArrayRecordReader:
        readers = self._local.__dict__.setdefault("readers", {})
        if file not in readers:
            readers[file] = ArrayRecordReader(str(self.path / file), READER_OPTIONS)
        return readers[file]

    def get_client(self, split: str, client: str | int) -> dict[str, Any]:
        """All examples of one client, by id or by position, as NumPy arrays."""
        index = self._split_index(split)
        i = self.client_index(split, client) if isinstance(client, str) else int(client)
        if not 0 <= i < len(index["count"]):
            raise DatasetFormatError(f"{self.path}: client position {i} out of range for split {split!r}")
        count, start = int(index["count"][i]), int(index["start"][i])
        file = self._shards[split][int(index["shard"][i])]["file"]
        records = []
        if count:
            try:
                reader = self._reader(file)
                reader.seek(start)
                records = [reader.read() for _ in range(count)]
            except (RuntimeError, OSError) as e:
                raise DatasetFormatError(f"{self.path / file}: cannot read client "
                                         f"{index['client_ids'][i]!r} ({e})") from None
        return decode_examples(self.schema, records, source=f"{self.path / file} (client {index['client_ids'][i]!r})")

    def verify(self) -> None:
        """Checks every shard's sha256 against the metadata (reads all data)."""
        for split, shards in self._shards.items():
            for shard in shards:
                shard_path = self.path / shard["file"]
                if _sha256(shard_path) != shard["sha256"]:
                    raise DatasetFormatError(f"{shard_path}: sha256 does not match {METADATA_FILE} (corrupted)")
