"""Streaming writer of a federated dataset directory (format version 1).

Clients are added one at a time, so memory is bounded by one client. Every
file goes into a temporary sibling directory that is renamed into place only
by `close()`, after `metadata.json` and then `_SUCCESS`; an exception or a
crash never leaves a directory that the reader accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
import sys
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from fedstream.data.format import (FORMAT_VERSION, INDEX_FILE, METADATA_FILE, SUCCESS_FILE, FeatureSpec, Schema,
                                   encode_examples, file_sha256, schema_to_json, success_marker)

# Uncompressed shards read ~3.5x faster than zstd:3 (4.9 vs 18 us per 3 KB
# example, docs/performance.md): on a CPU host the data pipeline competes with
# training for cores, so the default spends disk rather than CPU.
COMPRESSIONS = ("uncompressed", "snappy", "zstd:1", "zstd:3", "zstd:6", "brotli:6")
DEFAULT_COMPRESSION = "uncompressed"
# Records per ArrayRecord chunk. A client is read with one seek and sequential
# reads, so a chunk of several small records costs one chunk read instead of one
# per record: ~0.7 us instead of ~3.3 us per 240-byte record (uncompressed,
# docs/performance.md). Chunks of about GROUP_BYTES keep the seek to a client's
# first record cheap; group_size 1 (one record per chunk) for large records.
GROUP_BYTES = 32 * 1024
MAX_GROUP_SIZE = 64
_VARIABLE_LENGTH_GUESS = 16  # elements assumed for a variable-length feature when sizing chunks
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Keys of metadata.json that the writer owns; caller metadata may not use them.
RESERVED_METADATA_KEYS = ("format_version", "schema", "splits", "shard_options", "created_by", "assets")
ASSETS_DIR = "assets"


def is_safe_split_name(split: Any) -> bool:
    """Whether `split` can be a split directory name (also checked by the reader)."""
    return isinstance(split, str) and bool(_SAFE_NAME.match(split)) and split != METADATA_FILE


@dataclasses.dataclass
class _SplitState:
    directory: pathlib.Path
    client_ids: list[str] = dataclasses.field(default_factory=list)
    shard: list[int] = dataclasses.field(default_factory=list)
    start: list[int] = dataclasses.field(default_factory=list)
    count: list[int] = dataclasses.field(default_factory=list)
    shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)
    writer: Any = None
    records_in_shard: int = 0

    def shard_path(self, i: int) -> pathlib.Path:
        return self.directory / f"shard-{i:05d}.array_record"


def _check_array(split: str, client_id: str, name: str, spec: FeatureSpec, value: Any) -> np.ndarray | list:
    """Validates and casts one feature column; names split, client and feature on error."""
    where = f"split {split!r}, client {client_id!r}, feature {name!r}"
    target = np.dtype(spec.dtype)
    if spec.variable:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or (
                isinstance(value, np.ndarray) and value.ndim == 0):
            raise ValueError(f"{where}: expected a list of n arrays (or an array [n, ...]), got {type(value).__name__}")
        items = [_as_array(v, where) for v in value]
        for v in items:
            if v.shape[1:] != spec.shape[1:] or v.ndim != len(spec.shape):
                raise ValueError(f"{where}: example shape {v.shape} does not match the schema {spec.shape}")
        return [_cast(v, target, where) for v in items]
    value = _as_array(value, where)
    if value.ndim != 1 + len(spec.shape) or value.shape[1:] != spec.shape:
        raise ValueError(f"{where}: got an array of shape {value.shape}, expected [n, *{spec.shape}]")
    return _cast(value, target, where)


def _as_array(value: Any, where: str) -> np.ndarray:
    """`np.asarray(value)`, with NumPy's complaints (ragged nested lists, ...) reported with `where`."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{where}: not an array ({type(e).__name__}: {e})") from None


def _cast(value: np.ndarray, target: np.dtype, where: str) -> np.ndarray:
    """Casts to the schema dtype: integers must fit exactly; numbers may be stored as floats of any width
    (float64 -> float32 rounds, as recipes intend when they declare float32)."""
    if value.dtype == target:
        return value
    if value.size == 0:  # e.g. `[]` (float64) for an empty client: nothing to lose
        return np.zeros(value.shape, target)
    if value.dtype.kind in "iub" and target.kind in "iu":
        info = np.iinfo(target)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise ValueError(f"{where}: values {value.min()}..{value.max()} do not fit {target.name}")
        return value.astype(target)
    if value.dtype.kind == "b" and target.kind == "b":
        return value
    if value.dtype.kind in "iubf" and target.kind == "f":
        return value.astype(target)
    raise ValueError(f"{where}: dtype {value.dtype.name} cannot be stored as {target.name}")


def _remove_stale_tmp_dirs(output_dir: pathlib.Path) -> None:
    """Deletes temporary directories of earlier writers of `output_dir` whose process is gone."""
    for tmp in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def _writer_alive(pid: int | None) -> bool:
    """Whether the process `pid` (a writer named in a hidden directory) still runs; None: unknown, taken as gone."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _old_copy_pid(name: str, prefix: str) -> int | None:
    """The writer's pid in `.NAME.old-<pid>-<random>` (None for the older `.NAME.old-<random>` form)."""
    head, sep, _ = name[len(prefix):].partition("-")
    return int(head) if sep and head.isdigit() else None


def recover_interrupted_swap(output_dir: str | os.PathLike, log: Callable[[str], None] | None = None) -> None:
    """Finishes or rolls back a replacement of `output_dir` that a kill interrupted.

    `close()` replaces an existing dataset in two renames: NAME -> `.NAME.old-<pid>-<random>`, then
    the new directory -> NAME, then deletes the old copy. A kill between the renames leaves no NAME
    and a complete old copy: it is renamed back (rolled back; the new dataset's temporary directory
    is removed with the other stale ones by the next writer). A kill after the second rename leaves
    both: the old copy is deleted. Old copies of a writer that is still running are left alone.
    Called by `DatasetWriter` and on every `FederatedDataset` open; errors (a read-only parent) are
    ignored. `log` gets one line per action (default: stderr).
    """
    output_dir = pathlib.Path(output_dir)
    prefix = f".{output_dir.name}.old-"
    emit = log or (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        olds = sorted(p for p in output_dir.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return
    for old in olds:
        if _writer_alive(_old_copy_pid(old.name, prefix)) or old.is_symlink() or not old.is_dir():
            continue
        try:
            if output_dir.exists() or output_dir.is_symlink():
                shutil.rmtree(old)
                emit(f"fedstream: removed {old}, the previous copy of {output_dir} left by an interrupted "
                     "replacement")
            elif (old / SUCCESS_FILE).is_file() and (old / METADATA_FILE).is_file():
                os.rename(old, output_dir)
                emit(f"fedstream: {output_dir} was missing after an interrupted replacement (preprocess --force "
                     f"killed between its two renames); restored the previous dataset from {old.name}")
        except OSError:
            continue


class DatasetWriteError(RuntimeError):
    """Writing a dataset failed (disk full, file too large, ...); nothing was left at the output path."""


def _io_reason(e: BaseException) -> str:
    """A failed write's reason in a few words (ArrayRecord's messages carry paths and byte offsets)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} (errno {e.errno})"
    return str(e).split(";")[0].strip()[:200] or type(e).__name__


def default_group_size(schema: Schema) -> int:
    """Records per chunk for `schema`: the largest power of two <= 64 whose chunk stays near GROUP_BYTES."""
    record_bytes = 0
    for spec in schema.values():
        elements = int(np.prod([d for d in spec.shape if d is not None], dtype=np.int64))
        if spec.variable:
            elements *= _VARIABLE_LENGTH_GUESS
        record_bytes += elements * np.dtype(spec.stored_dtype).itemsize
    group = 1
    while group < MAX_GROUP_SIZE and 2 * group * max(record_bytes, 1) <= GROUP_BYTES:
        group *= 2
    return group


def shard_options(group_size: int, compression: str) -> str:
    """The ArrayRecord writer options of every shard (stored in metadata `shard_options`)."""
    return f"group_size:{int(group_size)},{compression}"


def shard_compression(options: str) -> str:
    """The compression part of a `shard_options` string (everything after group_size)."""
    return ",".join(part for part in str(options).split(",") if not part.startswith("group_size:"))


class DatasetWriter:
    """Writes a dataset directory client by client.

    Usage:
        with DatasetWriter(out_dir, schema, metadata={"recipe": ...}) as w:
            w.add_client("train", "client_00000", {"x": x, "y": y})

    `compression` and `group_size` (records per ArrayRecord chunk; default
    `default_group_size(schema)`) are the shards' writer options.
    """

    def __init__(self, output_dir: str | os.PathLike, schema: Schema, *, metadata: Mapping[str, Any] | None = None,
                 records_per_shard: int = 4096, compression: str = DEFAULT_COMPRESSION,
                 group_size: int | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        if not schema:
            raise ValueError("a dataset needs at least one feature")
        self.output_dir = pathlib.Path(output_dir).absolute()
        self.schema = dict(schema)
        self.metadata = dict(metadata or {})
        self.records_per_shard = int(records_per_shard)
        if self.records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        clash = sorted(set(self.metadata) & set(RESERVED_METADATA_KEYS))
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved for the dataset format")
        self.compression = compression
        self.group_size = default_group_size(self.schema) if group_size is None else int(group_size)
        if not 1 <= self.group_size <= 1 << 16:
            raise ValueError(f"group_size must be in 1..65536, got {group_size}")
        self._options = shard_options(self.group_size, compression)
        recover_interrupted_swap(self.output_dir)
        if self.output_dir.exists() and not (self.output_dir / METADATA_FILE).exists() and (
                not self.output_dir.is_dir() or any(self.output_dir.iterdir())):
            raise ValueError(f"{self.output_dir} exists and is not a fedstream dataset; refusing to replace it")
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp_dirs(self.output_dir)
        self.tmp_dir = self.output_dir.with_name(f".{self.output_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        self.tmp_dir.mkdir()
        self._splits: dict[str, _SplitState] = {}
        self._assets: dict[str, dict[str, Any]] = {}
        self._closed = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _split(self, split: str) -> _SplitState:
        if split not in self._splits:
            directory = self.tmp_dir / split
            directory.mkdir()
            self._splits[split] = _SplitState(directory)
        return self._splits[split]

    def add_client(self, split: str, client_id: str, examples: Mapping[str, Any]) -> None:
        """Appends one client's examples (feature -> array with leading dim n; n may be 0)."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        if not is_safe_split_name(split):
            raise ValueError(f"invalid split name {split!r}: use letters, digits, '_', '-', '.' "
                             "(not starting with '_', '-' or '.')")
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"split {split!r}: client id must be a non-empty string, got {client_id!r}")
        # The index stores ids as NumPy unicode, which drops trailing NULs ('a\0' would read back as 'a'),
        # and ids must survive UTF-8 (printing, JSON, other tools): no NUL, no lone surrogates.
        if "\x00" in client_id:
            raise ValueError(f"split {split!r}: client id {client_id!r} contains a NUL character")
        try:
            client_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"split {split!r}: client id {client_id!r} is not valid Unicode text "
                             "(lone surrogate)") from None
        if split in self._splits and client_id in self._splits[split].seen:
            raise ValueError(f"split {split!r}: client {client_id!r} was already added")
        if set(examples) != set(self.schema):
            raise ValueError(f"split {split!r}, client {client_id!r}: features {sorted(examples)} "
                             f"do not match the schema {list(self.schema)}")
        columns = {name: _check_array(split, client_id, name, spec, examples[name])
                   for name, spec in self.schema.items()}
        lengths = {name: len(v) for name, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"split {split!r}, client {client_id!r}: features have different example counts {lengths}")
        n = next(iter(lengths.values()))
        records = encode_examples(self.schema, columns, n)

        state = self._split(split)  # only after validation: a rejected client leaves no trace
        with self._write_errors():
            if state.writer is None or (state.records_in_shard >= self.records_per_shard and n):
                self._finish_shard(state)
                state.writer = ArrayRecordWriter(str(state.shard_path(len(state.shards))), self._options)
                state.shards.append({"file": f"{split}/{state.shard_path(len(state.shards)).name}"})
                state.records_in_shard = 0
            for record in records:
                state.writer.write(record)
        state.client_ids.append(client_id)
        state.seen.add(client_id)
        state.shard.append(len(state.shards) - 1)
        state.start.append(state.records_in_shard)
        state.count.append(n)
        state.records_in_shard += n

    @property
    def options(self) -> str:
        """The ArrayRecord writer options every shard must be written with (`shard_options`)."""
        return self._options

    def add_shard(self, split: str, path: str | os.PathLike, clients: list[tuple[str, int]]) -> None:
        """Moves a shard written elsewhere (e.g. by a Beam worker) into `split` as its next shard.

        `path` must be an ArrayRecord file on the same filesystem as the output, written with
        `self.options`, holding the records of `clients` (`(client_id, count)` pairs) contiguously
        in that order. It is renamed into the temporary directory; its size and sha256 are
        recorded as for a shard written by `add_client`. Client ids are checked as in `add_client`.
        """
        if self._closed:
            raise RuntimeError("the writer is closed")
        if not is_safe_split_name(split):
            raise ValueError(f"invalid split name {split!r}")
        state = self._split(split)
        for client_id, _ in clients:
            if not isinstance(client_id, str) or not client_id or "\x00" in client_id:
                raise ValueError(f"split {split!r}: invalid client id {client_id!r}")
            if client_id in state.seen:
                raise ValueError(f"split {split!r}: client {client_id!r} was already added")
        with self._write_errors():
            self._finish_shard(state)
            index = len(state.shards)
            target = state.shard_path(index)
            os.replace(path, target)
            total = 0
            for client_id, count in clients:
                state.client_ids.append(client_id)
                state.seen.add(client_id)
                state.shard.append(index)
                state.start.append(total)
                state.count.append(int(count))
                total += int(count)
            state.shards.append({"file": f"{split}/{target.name}", "num_records": total,
                                 "bytes": target.stat().st_size, "sha256": file_sha256(target)})
            state.records_in_shard = total

    def add_asset(self, name: str, data: bytes) -> None:
        """Stores a file that belongs to the dataset (e.g. `vocab.json`) under `assets/<name>`.

        Its size and sha256 go into the metadata; the reader checks them.
        """
        if self._closed:
            raise RuntimeError("the writer is closed")
        if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in self._assets:
            raise ValueError(f"invalid or duplicate asset name {name!r}")
        directory = self.tmp_dir / ASSETS_DIR
        directory.mkdir(exist_ok=True)
        with self._write_errors():
            (directory / name).write_bytes(bytes(data))
        self._assets[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """A failed write (RuntimeError from ArrayRecord, OSError) drops the partial dataset and raises one line."""
        try:
            yield
        except (RuntimeError, OSError) as e:
            self.abort()
            raise DatasetWriteError(f"could not write the dataset {self.output_dir}: {_io_reason(e)}; the partial "
                                    "files were removed and a dataset already at that path is left as it was") from None

    def _finish_shard(self, state: _SplitState) -> None:
        if state.writer is None:
            return
        state.writer.close()
        state.writer = None
        path = state.shard_path(len(state.shards) - 1)
        state.shards[-1].update(num_records=state.records_in_shard, bytes=path.stat().st_size, sha256=file_sha256(path))

    def close(self) -> pathlib.Path:
        """Finishes every shard, writes index, metadata and `_SUCCESS`, and renames into place."""
        if self._closed:
            return self.output_dir
        with self._write_errors():
            return self._close()

    def _close(self) -> pathlib.Path:
        try:
            splits_meta = {}
            for split, state in self._splits.items():
                self._finish_shard(state)
                ids = np.array(state.client_ids, dtype=str) if state.client_ids else np.zeros(0, "<U1")
                np.savez(state.directory / INDEX_FILE, client_ids=ids, shard=np.array(state.shard, np.int32),
                         start=np.array(state.start, np.int64), count=np.array(state.count, np.int64))
                splits_meta[split] = {"num_clients": len(state.client_ids), "num_examples": int(sum(state.count)),
                                      "shards": state.shards}
            from fedstream import __version__

            metadata = {**self.metadata, "format_version": FORMAT_VERSION, "schema": schema_to_json(self.schema),
                        "shard_options": self._options,
                        "splits": splits_meta, "created_by": f"fedstream {__version__}"}
            if self._assets:
                metadata["assets"] = self._assets
            metadata_bytes = json.dumps(metadata, indent=1, sort_keys=True, default=str).encode("utf-8")
            (self.tmp_dir / METADATA_FILE).write_bytes(metadata_bytes)
            (self.tmp_dir / SUCCESS_FILE).write_bytes(success_marker(metadata_bytes))
            old = None
            if self.output_dir.exists():
                old = self.output_dir.with_name(
                    f".{self.output_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                os.replace(self.output_dir, old)
            try:
                os.replace(self.tmp_dir, self.output_dir)
            except BaseException:
                if old is not None:  # put the previous dataset back
                    os.replace(old, self.output_dir)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.output_dir

    def abort(self) -> None:
        """Drops everything written so far."""
        try:
            for state in self._splits.values():
                if state.writer is not None:
                    writer, state.writer = state.writer, None
                    try:
                        writer.close()
                    except Exception:  # noqa: BLE001 - the files are deleted anyway
                        pass
        finally:
            self._closed = True
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
