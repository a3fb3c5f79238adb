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
import struct
import threading
import tokenize
import warnings
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from fedstream.data.format import (FORMAT_VERSION, INDEX_FILE, METADATA_FILE, SUCCESS_FILE, DatasetFormatError,
                                   Schema, check_success_marker, decode_examples, file_sha256, fixed_record_size,
                                   record_layout, schema_from_json, schema_to_json)
from fedstream.data.writer import ASSETS_DIR, is_safe_split_name, recover_interrupted_swap

# Random-access reader options: no readahead fill per seek (see docs/notes.md, 'ArrayRecord random access').
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_SHARD_NAME = re.compile(r"^shard-[0-9]{5}\.array_record$")
_MAX_MARKER_BYTES = 4096  # `_SUCCESS` holds one line
_VERIFY_BATCH = 4096  # records read at once by `verify()` and `iter_client_records()`
DIGEST_VERSION = "fedstream-content-digest-v1"


def _count_ok(value: Any) -> bool:
    """A count or size from the metadata: a JSON integer (not a bool) that fits int64 arithmetic."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


_INDEX_ARRAYS = ("client_ids", "shard", "start", "count")
# Errors NumPy's zip and .npy readers raise on damaged bytes (a flipped bit can make a member look
# encrypted, compressed with an unknown method, or give it an npy header that does not tokenize).
_ZIP_ERRORS = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError,
               tokenize.TokenError, SyntaxError, zlib.error, OverflowError, TypeError, struct.error,
               RecursionError, MemoryError, UnicodeDecodeError, IndexError)


def read_index_arrays(index_path: pathlib.Path, num_clients: int) -> dict[str, np.ndarray]:
    """The four arrays of a split's `index.npz`, with every size checked before anything is allocated.

    The writer stores the arrays uncompressed (`np.savez`), so each member's declared size must be
    at most the file's size; its npy header must declare a one-dimensional array of `num_clients`
    entries (from metadata.json) whose bytes fill the member exactly. Only then are the bytes read
    (at most the file's size in all). Damage anywhere, including errors from inside NumPy's zip
    reader, is one DatasetFormatError naming the file.
    """
    def bad(why: str) -> DatasetFormatError:
        return DatasetFormatError(f"{index_path}: unreadable client index ({why})")

    arrays: dict[str, np.ndarray] = {}
    try:
        file_size = index_path.stat().st_size
        with zipfile.ZipFile(index_path) as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NumPy's "Python 2 header" warning on damaged headers
            members = {m.filename: m for m in zf.infolist()}
            for key in _INDEX_ARRAYS:
                member = members.get(f"{key}.npy")
                if member is None:
                    raise bad(f"no array {key!r}")
                where = f"array {key!r}"
                if member.compress_type != zipfile.ZIP_STORED:
                    raise bad(f"{where} is compressed; the format stores the index uncompressed (np.savez)")
                if member.file_size > file_size or member.compress_size != member.file_size:
                    raise bad(f"{where} declares {member.file_size:,} bytes in a {file_size:,}-byte file")
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise bad(f"{where}: unsupported npy version {version}")
                    if dtype.hasobject or dtype.kind not in ("U" if key == "client_ids" else "iu"):
                        raise bad(f"{where} has dtype {dtype}; client_ids must be unicode and "
                                  "shard/start/count integers")
                    if len(shape) != 1:
                        raise bad(f"{where} has shape {shape}; the arrays must be one-dimensional")
                    if shape[0] != num_clients:
                        raise bad(f"{where} has {shape[0]:,} entries, {METADATA_FILE} says {num_clients:,} clients")
                    nbytes = shape[0] * dtype.itemsize  # Python ints: no overflow
                    if f.tell() + nbytes != member.file_size:
                        raise bad(f"{where}: its header declares {nbytes:,} bytes of data, the member holds "
                                  f"{member.file_size - f.tell():,}")
                    data = f.read(nbytes)  # at most the file's size; reaching the end checks the CRC
                    if len(data) != nbytes or f.read(1):
                        raise bad(f"{where} is truncated")
                arrays[key] = np.frombuffer(data, dtype) if nbytes else np.zeros(0, dtype)
    except DatasetFormatError:
        raise
    except _ZIP_ERRORS as e:
        raise bad(f"{type(e).__name__}: {str(e)[:200]}") from None
    return {k: np.array(v) for k, v in arrays.items()}  # writable copies (the checks below cast them)


def _refuse_link(path: pathlib.Path) -> None:
    """Refuses a symbolic link inside a dataset directory, with one line naming it.

    The dataset directory itself may be a link; files and split directories inside it may not:
    every check of the reader (sizes, sha256, confinement of shard paths) is about the directory's
    own files, and a link would let another file stand in for them.
    """
    if path.is_symlink():
        raise DatasetFormatError(f"{path}: a symbolic link inside the dataset directory; fedstream refuses "
                                 "links in a dataset (copy the file in, or preprocess again)")


class FederatedDataset:
    """A preprocessed federated dataset: schema, splits, clients and their examples."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        recover_interrupted_swap(self.path)
        if not self.path.is_dir():
            raise DatasetFormatError(f"{self.path}: no such dataset directory")
        success_path = self.path / SUCCESS_FILE
        meta_path = self.path / METADATA_FILE
        for inner in (success_path, meta_path):
            _refuse_link(inner)
        if not success_path.exists():
            raise DatasetFormatError(f"{self.path}: not a complete fedstream dataset (no {SUCCESS_FILE})")
        try:
            with open(success_path, "rb") as f:
                marker = f.read(_MAX_MARKER_BYTES + 1)
            meta_bytes = meta_path.read_bytes()
            self.metadata: dict[str, Any] = json.loads(meta_bytes.decode("utf-8"))
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
        check_success_marker(marker, meta_bytes, self.path)
        self._index: dict[str, dict[str, np.ndarray]] = {}
        self._shards: dict[str, list[dict[str, Any]]] = {}
        for split, info in self._check_splits(meta_path).items():
            self._shards[split] = info["shards"]
            _refuse_link(self.path / split)
            for shard in info["shards"]:
                shard_path = self.path / shard["file"]
                _refuse_link(shard_path)
                if not shard_path.is_file():
                    raise DatasetFormatError(f"{shard_path}: shard listed in {meta_path} is missing")
                if shard_path.stat().st_size != shard["bytes"]:
                    raise DatasetFormatError(f"{shard_path}: {shard_path.stat().st_size} bytes, metadata says "
                                             f"{shard['bytes']} (truncated or modified)")
            self._index[split] = self._load_index(split, info)
        self._local = threading.local()
        for split, shards in self._shards.items():  # one record per split: does the schema fit the records?
            first = next((k for k, sh in enumerate(shards) if sh["num_records"]), None)
            if first is not None:
                self._check_records(split, first, 0, 1)

    def _check_records(self, split: str, shard: int, begin: int, end: int) -> None:
        """Checks that records begin..end-1 of a shard have the size the schema gives (dtype x shape per
        feature; variable-length features must decode exactly). One line names the shard, the record,
        both sizes and every feature's share."""
        shard_path = self.path / self._shards[split][shard]["file"]
        try:
            reader = self._reader(split, shard)
            records = reader.read(begin, end)
        except (RuntimeError, OSError, IndexError) as e:
            which = f"record {begin}" if end == begin + 1 else f"records {begin}..{end - 1}"
            raise DatasetFormatError(f"{shard_path}: cannot read {which} ({e})") from None
        size = fixed_record_size(self.schema)
        if size is not None:
            lengths = set(map(len, records))
            if lengths <= {size}:
                return
            i, length = next((i, len(r)) for i, r in enumerate(records) if len(r) != size)
            raise DatasetFormatError(f"{shard_path}: record {begin + i} has {length} bytes, the schema in "
                                     f"{METADATA_FILE} gives {size} ({record_layout(self.schema)})")
        try:
            decode_examples(self.schema, records, source=str(shard_path))
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{e}; the schema in {METADATA_FILE} ({record_layout(self.schema)}) does not "
                                     f"match the records (record numbers from {begin})") from None

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
        _refuse_link(index_path)
        index = read_index_arrays(index_path, info["num_clients"])

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

    def iter_client_records(self, split: str, positions: np.ndarray | None = None) -> Iterator[tuple[int, list[bytes]]]:
        """Every client's raw records (the encoded examples, see docs/format.md), as `(position, records)`.

        Clients come in storage order (shard, then first record), not index order, so each shard is
        read front to back in batches of up to 4096 records: one pass over the split, without a seek
        per client. `positions` (index positions) restricts the walk to those clients, each then read
        on its own. Memory is one batch plus one client.
        """
        index = self._split_index(split)
        chosen = np.arange(len(index["count"])) if positions is None else np.asarray(positions, np.int64)
        order = chosen[np.lexsort((index["start"][chosen], index["shard"][chosen]))]
        batch_shard, batch_begin, batch = -1, 0, []
        for pos in order.tolist():
            shard, start, count = int(index["shard"][pos]), int(index["start"][pos]), int(index["count"][pos])
            records: list[bytes] = []
            at, end = start, start + count
            while at < end:
                if shard != batch_shard or not batch_begin <= at < batch_begin + len(batch):
                    # Every client: read ahead a whole batch (the next clients follow). Some clients: read
                    # only this one's records (the next chosen one may lie far ahead).
                    ahead = _VERIFY_BATCH if positions is None else min(end - at, _VERIFY_BATCH)
                    last = min(at + ahead, self._shards[split][shard]["num_records"])
                    try:
                        batch = self._reader(split, shard).read(at, last)
                    except (RuntimeError, OSError, IndexError) as e:
                        raise DatasetFormatError(f"{self.path / self._shards[split][shard]['file']}: cannot read "
                                                 f"records {at}..{last - 1} ({e})") from None
                    batch_shard, batch_begin = shard, at
                take = batch[at - batch_begin:min(end, batch_begin + len(batch)) - batch_begin]
                records += take
                at += len(take)
            yield pos, records

    def content_digest(self, split: str) -> str:
        """A sha256 (hex) of a split's content that does not depend on how it is stored.

        Shard sizes, chunking (group_size), compression, the order clients were written in and
        the provenance metadata do not enter it; the schema, the client ids and every client's
        examples in order do. Definition (version `fedstream-content-digest-v1`):

            client_hash(c) = sha256(record_0 || record_1 || ...)       # c's encoded examples, in order
            digest = sha256("fedstream-content-digest-v1\\n"
                            || json(schema) || "\\n"                  # compact, keys sorted, feature order kept
                            || for each client c in sorted(ids):      # Python str order (code points)
                                 u32le(len(utf8(c))) || utf8(c) || u64le(count(c)) || client_hash(c))

        A record is one example's features in schema order, little-endian C-order bytes (a
        variable-length feature preceded by its u32le length), exactly as docs/format.md defines
        it, so two datasets with the same digest decode to the same arrays. Reads the whole split
        once (`iter_client_records`).
        """
        index = self._split_index(split)
        client_hashes: list[bytes] = [b""] * len(index["count"])
        for pos, records in self.iter_client_records(split):
            client_hashes[pos] = hashlib.sha256(b"".join(records)).digest()
        ids = index["client_ids"].tolist()
        digest = hashlib.sha256(DIGEST_VERSION.encode("ascii") + b"\n")
        schema = json.dumps(schema_to_json(self.schema), separators=(",", ":"), sort_keys=True)
        digest.update(schema.encode("utf-8") + b"\n")
        for pos in sorted(range(len(ids)), key=ids.__getitem__):
            name = ids[pos].encode("utf-8")
            digest.update(struct.pack("<I", len(name)) + name + struct.pack("<Q", int(index["count"][pos]))
                          + client_hashes[pos])
        return digest.hexdigest()

    def asset(self, name: str) -> bytes:
        """A file stored with the dataset (e.g. `vocab.json`), checked against its size and sha256."""
        info = self.metadata.get("assets", {}).get(name) if isinstance(self.metadata.get("assets"), dict) else None
        if not isinstance(info, dict):
            known = ", ".join(sorted(self.metadata.get("assets", {}) or {})) or "none"
            raise DatasetFormatError(f"{self.path}: no asset {name!r} (assets: {known})")
        path = self.path / ASSETS_DIR / name
        _refuse_link(path.parent)
        _refuse_link(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DatasetFormatError(f"{path}: unreadable asset ({e})") from None
        if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise DatasetFormatError(f"{path}: size or sha256 does not match {METADATA_FILE} (corrupted)")
        return data

    def verify(self) -> None:
        """Checks every shard's sha256 and record count against the metadata, and every record's size
        against the schema (reads all data)."""
        for split, shards in self._shards.items():
            for k, shard in enumerate(shards):
                shard_path = self.path / shard["file"]
                if file_sha256(shard_path) != shard["sha256"]:
                    raise DatasetFormatError(f"{shard_path}: sha256 does not match {METADATA_FILE} (corrupted)")
                try:
                    self._reader(split, k)
                except RuntimeError as e:
                    raise DatasetFormatError(f"{shard_path}: not a readable ArrayRecord file ({e})") from None
                for begin in range(0, shard["num_records"], _VERIFY_BATCH):
                    self._check_records(split, k, begin, min(begin + _VERIFY_BATCH, shard["num_records"]))
