"""Readers for TensorFlow Federated's dataset files, without TensorFlow.

TFF stores its simulation datasets (`tff.simulation.datasets`) in two layouts:

- **current**: `<name>.sqlite.lzma`, an LZMA-compressed SQLite database with
  the tables `examples(split_name, client_id, serialized_example_proto)`,
  one row per example (a serialized `tf.train.Example`), and
  `client_metadata(client_id, split_name, num_examples)`;
- **legacy** (until 2021): `<name>.tar.bz2` of HDF5 files, one per split,
  each with a group `examples/<client_id>/` holding one dataset per feature
  (all with the client's example count as leading dimension). Reading these
  needs h5py, an optional dependency: `pip install 'fedstream[tff-h5]'`.

Public API (small on purpose; recipes build on it):

    iter_sqlite_clients(path, split, features=None)   -> Iterator[(client_id, {feature: values})]
    open_sqlite(path) -> TFFSqlite   (a context manager: .split_counts(), .clients(split, features))
    extract_h5_archive(archive)      (a context manager: {member file name: extracted path})
    iter_h5_clients(path, features=None, name=None)  -> Iterator[(client_id, {feature: values})]
    serialize_example(features) -> bytes, parse_example(data) -> {feature: values}
    Example                          the tf.train.Example message class (protobuf, built at runtime)
    TFFFormatError                   bad input; one line naming the file, split, client (and example)

`features` maps each feature to read to its per-example shape, as TFF's
`FixedLenFeature` does: `{"pixels": (28, 28), "label": ()}`; `None` as a
shape means variable length. Values come back per client as:

- float_list -> float32 array `[n, *shape]`, int64_list -> int64 array `[n, *shape]`
  (a variable-length feature: a list of n 1-D arrays);
- bytes_list -> a list of n `bytes` for shape `()`, else a list of n lists of bytes.

With `features=None`, every feature of the first example of the split is
read, with shape `()` if it holds one value and `(k,)` if it holds k.
Clients come in `client_id` order (SQLite's byte order = Python's `sorted`,
as TFF lists them), each client's examples in row order, one client in
memory at a time. A `.sqlite.lzma` is decompressed (streaming) into a
temporary file in `tmp_dir` (default: the download cache directory, see
`fedstream.data.download.cache_dir`), deleted when the reader closes.
"""

from __future__ import annotations

import contextlib
import lzma
import math
import os
import pathlib
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from fedstream.data.download import cache_dir

Features = Mapping[str, "tuple[int, ...] | None"]
ClientData = dict[str, Any]
Progress = Callable[[str], None]

H5_EXTRA = "pip install 'fedstream[tff-h5]'"
_FETCH_ROWS = 1024
_COPY_BYTES = 1 << 20
_PROGRESS_EVERY_S = 5.0


class TFFFormatError(ValueError):
    """A TFF dataset file does not have the expected layout; the message names the file, split and client."""


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency is not installed; the message says how to install it."""


# --------------------------------------------------------------------------------- tf.train.Example


def _example_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """tensorflow/core/example/{feature,example}.proto as a descriptor (proto3, packed numeric lists)."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="fedstream/tf_example.proto", package="tensorflow",
                                             syntax="proto3")
    for name, value_type in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT), ("Int64List", F.TYPE_INT64)):
        m = fdp.message_type.add(name=name)
        field = m.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=value_type)
        if value_type != F.TYPE_BYTES:
            field.options.packed = True
    m = fdp.message_type.add(name="Feature")
    m.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                                ("int64_list", "Int64List")), start=1):
        m.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=f".tensorflow.{type_name}", oneof_index=0)
    m = fdp.message_type.add(name="Features")
    entry = m.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".tensorflow.Feature")
    m.field.add(name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                type_name=".tensorflow.Features.FeatureEntry")
    m = fdp.message_type.add(name="Example")
    m.field.add(name="features", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                type_name=".tensorflow.Features")
    return fdp


# A private pool, so that this never clashes with TensorFlow's own classes if both are imported.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_example_file_descriptor())
_EXAMPLE_DESCRIPTOR = _POOL.FindMessageTypeByName("tensorflow.Example")
if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
    Example: type[message.Message] = message_factory.GetMessageClass(_EXAMPLE_DESCRIPTOR)
else:  # pragma: no cover - older protobuf
    Example = message_factory.MessageFactory(_POOL).GetPrototype(_EXAMPLE_DESCRIPTOR)

_NUMERIC = {"float_list": np.dtype(np.float32), "int64_list": np.dtype(np.int64)}
_FLOAT = np.dtype(np.float32)


def serialize_example(features: Mapping[str, Any]) -> bytes:
    """A serialized tf.train.Example, mapped as TFF's writer does.

    str/bytes (or arrays and lists of them) -> bytes_list; floats -> float_list
    (flattened, float32); ints and bools -> int64_list (flattened).
    """
    example = Example()
    feature_map = example.features.feature
    for name, value in features.items():
        feature = feature_map[name]
        if isinstance(value, (str, bytes)):
            feature.bytes_list.value.append(value.encode() if isinstance(value, str) else value)
            continue
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, bytes)):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in value)
            continue
        array = np.asarray(value)
        if array.dtype.kind in "SUO":
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1))
        elif array.dtype.kind == "f":
            feature.float_list.value.extend(array.astype(np.float32, copy=False).reshape(-1).tolist())  # 5x faster
        elif array.dtype.kind in "biu":
            feature.int64_list.value.extend(array.astype(np.int64, copy=False).reshape(-1).tolist())
        else:
            raise ValueError(f"feature {name!r}: cannot store dtype {array.dtype} in a tf.train.Example")
    return example.SerializeToString()


def parse_example(data: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """Every feature of one serialized tf.train.Example as a flat float32/int64 array or a list of bytes."""
    out: dict[str, np.ndarray | list[bytes]] = {}
    for name, feature in Example.FromString(data).features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[name] = list(feature.bytes_list.value)
        elif kind is None:
            out[name] = np.zeros(0, np.float32)
        else:
            out[name] = np.array(getattr(feature, kind).value, dtype=_NUMERIC[kind])
    return out


# ------------------------------------------------------------------------------------- temporary files


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_path(directory: pathlib.Path, stem: str, suffix: str = "", *, is_dir: bool = False) -> pathlib.Path:
    """A new hidden temporary file (or directory) `.<stem>.tmp-<pid>-<random><suffix>` in `directory`.

    Leftovers of the same stem from processes that are gone (e.g. killed) are deleted first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"\.{re.escape(stem)}\.tmp-(\d+)-")
    for entry in directory.iterdir():
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    prefix = f".{stem}.tmp-{os.getpid()}-"
    if is_dir:
        return pathlib.Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=directory))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(fd)
    return pathlib.Path(name)


def _copy_with_progress(src: Any, dst: Any, label: str, progress: Progress | None) -> int:
    total, last = 0, time.perf_counter()
    start = last
    while True:
        block = src.read(_COPY_BYTES)
        if not block:
            break
        dst.write(block)
        total += len(block)
        now = time.perf_counter()
        if progress is not None and now - last >= _PROGRESS_EVERY_S:
            last = now
            progress(f"  {label}: {total / 1e6:,.0f} MB written, {total / 1e6 / (now - start):.0f} MB/s")
    return total


# ---------------------------------------------------------------------------------------------- SQLite


def decompress_lzma(source: str | os.PathLike, dest: str | os.PathLike, progress: Progress | None = None) -> int:
    """Streams the LZMA (.lzma or .xz) file `source` into `dest`; returns the bytes written.

    A truncated or corrupt file is a TFFFormatError naming `source` (`dest` is then incomplete).
    """
    source = pathlib.Path(source)
    started = time.perf_counter()
    try:
        with lzma.open(source, "rb") as src, open(dest, "wb") as dst:
            total = _copy_with_progress(src, dst, f"decompressing {source.name}", progress)
    except EOFError as e:
        raise TFFFormatError(f"{source}: truncated LZMA file ({e})") from None
    except lzma.LZMAError as e:
        raise TFFFormatError(f"{source}: not a valid LZMA file ({e})") from None
    if progress is not None:
        progress(f"  decompressed {source.name}: {total / 1e6:,.0f} MB in {time.perf_counter() - started:.1f} s")
    return total


def _shape_size(shape: tuple[int, ...] | None) -> int | None:
    return None if shape is None else math.prod(shape)


class TFFSqlite:
    """An open TFF SQLite database (`.sqlite`, or `.sqlite.lzma` decompressed to a temporary file).

    Use as a context manager (or call `close()`): the temporary file is deleted on close.
    Errors name `source`, the file given, not the temporary copy.
    """

    def __init__(self, path: str | os.PathLike, *, tmp_dir: str | os.PathLike | None = None,
                 progress: Progress | None = None) -> None:
        self.source = pathlib.Path(path)
        self._temp: pathlib.Path | None = None
        self._conn: sqlite3.Connection | None = None
        if not self.source.is_file():
            raise FileNotFoundError(f"{self.source}: no such file")
        try:
            if self.source.suffix in (".lzma", ".xz"):
                directory = pathlib.Path(tmp_dir) if tmp_dir else cache_dir()
                self._temp = _temp_path(directory, self.source.name, ".sqlite")
                if progress is not None:
                    progress(f"decompressing {self.source} into {directory}")
                decompress_lzma(self.source, self._temp, progress)
                self.path = self._temp
                uri = f"{self._temp.resolve().as_uri()}?mode=ro&immutable=1"
            else:
                self.path = self.source
                uri = f"{self.source.resolve().as_uri()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True)
            self._check_tables()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> TFFSqlite:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the database and deletes the temporary decompressed copy, if any."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None

    def _execute(self, query: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        if self._conn is None:
            raise RuntimeError(f"{self.source}: the database is closed")
        try:
            return self._conn.execute(query, args)
        except sqlite3.DatabaseError as e:
            raise TFFFormatError(f"{self.source}: SQLite error ({e})") from None

    def _check_tables(self) -> None:
        tables = {row[0] for row in self._execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "examples" not in tables and "federated_data" in tables:
            raise TFFFormatError(f"{self.source}: no table 'examples' but FedJAX's 'federated_data': a FedJAX "
                                 "SQLite file, not TFF's (read it with `fedstream preprocess fedjax-sqlite`, or "
                                 "shakespeare / stackoverflow with FedJAX's file names)")
        if "examples" not in tables:
            raise TFFFormatError(f"{self.source}: no table 'examples' (tables: {', '.join(sorted(tables)) or 'none'}); "
                                 "not a TFF SQLite dataset")
        columns = {row[1] for row in self._execute("PRAGMA table_info(examples)")}
        missing = {"split_name", "client_id", "serialized_example_proto"} - columns
        if missing:
            raise TFFFormatError(f"{self.source}: table 'examples' lacks the columns {sorted(missing)}")
        self._has_metadata = "client_metadata" in tables

    def split_counts(self) -> dict[str, tuple[int, int]]:
        """`{split: (clients, examples)}` from the `client_metadata` table (empty if there is none)."""
        if not self._has_metadata:
            return {}
        rows = self._execute("SELECT split_name, COUNT(*), SUM(num_examples) FROM client_metadata "
                             "GROUP BY split_name ORDER BY split_name")
        return {split: (int(clients), int(examples or 0)) for split, clients, examples in rows}

    def _metadata(self, split: str) -> dict[str, int] | None:
        """client id -> num_examples of `split` from client_metadata; a client listed twice is an error."""
        if not self._has_metadata:
            return None
        out: dict[str, int] = {}
        for client_id, num in self._execute("SELECT client_id, num_examples FROM client_metadata "
                                            "WHERE split_name = ?", (split,)):
            client_id = self._client_id(split, client_id)
            if client_id in out:
                raise TFFFormatError(f"{self.source}: split {split!r}: client {client_id!r} is listed twice "
                                     "in client_metadata (duplicate client id)")
            out[client_id] = int(num)
        return out

    def _client_id(self, split: str, value: Any) -> str:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise TFFFormatError(f"{self.source}: split {split!r}: client id {value!r} is not UTF-8") from None
        if not isinstance(value, str) or not value:
            raise TFFFormatError(f"{self.source}: split {split!r}: invalid client id {value!r}")
        return value

    def clients(self, split: str, features: Features | None = None) -> Iterator[tuple[str, ClientData]]:
        """Yields `(client_id, {feature: values})` for every client of `split`, in client id order.

        See the module docstring for `features` and the value types. Checks
        that every example has every feature with the declared number of
        values and the same kind throughout the split, and that the examples
        agree with client_metadata (same clients, counts, no duplicates).
        """
        expected = self._metadata(split)
        specs: dict[str, tuple[int, ...] | None] | None = (
            None if features is None else {k: (None if v is None else tuple(v)) for k, v in features.items()})
        kinds: dict[str, str | None] = {}
        seen: set[str] = set()
        cursor = self._execute("SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ? "
                               "ORDER BY client_id, rowid", (split,))
        current: str | None = None
        blobs: list[bytes] = []
        while True:
            try:
                rows = cursor.fetchmany(_FETCH_ROWS)
            except sqlite3.DatabaseError as e:
                raise TFFFormatError(f"{self.source}: SQLite error while reading split {split!r} ({e})") from None
            for raw_id, blob in rows:
                client_id = raw_id if isinstance(raw_id, str) and raw_id else self._client_id(split, raw_id)
                if client_id != current:
                    if current is not None:
                        if specs is None:
                            specs = self._infer(split, current, blobs[0])
                        yield current, self._client(split, current, blobs, specs, kinds, expected)
                    if client_id in seen:  # only possible if the rows do not come grouped
                        raise TFFFormatError(f"{self.source}: split {split!r}: duplicate client id {client_id!r}")
                    seen.add(client_id)
                    current, blobs = client_id, []
                blobs.append(blob)
            if not rows:
                break
        if current is not None:
            if specs is None:
                specs = self._infer(split, current, blobs[0])
            yield current, self._client(split, current, blobs, specs, kinds, expected)
        if not seen:
            known = sorted(self.split_counts())
            raise TFFFormatError(f"{self.source}: no examples in split {split!r}"
                                 + (f" (splits: {', '.join(known)})" if known else ""))
        if expected is not None and set(expected) - seen:
            missing = sorted(set(expected) - seen)
            raise TFFFormatError(f"{self.source}: split {split!r}: client {missing[0]!r} is in client_metadata but "
                                 f"has no examples ({len(missing)} such clients)")

    def _parse(self, split: str, client_id: str, i: int, blob: Any) -> Any:
        if not isinstance(blob, bytes):
            raise TFFFormatError(f"{self.source}: split {split!r}, client {client_id!r}, example {i}: "
                                 f"serialized_example_proto is {type(blob).__name__}, not a BLOB")
        try:
            return Example.FromString(blob)
        except message.DecodeError:
            raise TFFFormatError(f"{self.source}: split {split!r}, client {client_id!r}, example {i}: "
                                 "not a serialized tf.train.Example") from None

    def _infer(self, split: str, client_id: str, blob: bytes) -> dict[str, tuple[int, ...] | None]:
        example = self._parse(split, client_id, 0, blob)
        specs: dict[str, tuple[int, ...] | None] = {}
        for name in sorted(example.features.feature):
            feature = example.features.feature[name]
            kind = feature.WhichOneof("kind")
            n = len(getattr(feature, kind).value) if kind else 0
            specs[name] = () if n == 1 else (n,)
        return specs

    def _client(self, split: str, client_id: str, blobs: list[bytes], specs: Mapping[str, tuple[int, ...] | None],
                kinds: dict[str, str | None], expected: Mapping[str, int] | None) -> ClientData:
        """Parses one client's serialized examples into per-feature arrays or lists."""
        n = len(blobs)
        if expected is not None:
            if client_id not in expected:
                raise TFFFormatError(f"{self.source}: split {split!r}: client {client_id!r} has examples but is not "
                                     "in client_metadata")
            if expected[client_id] != n:
                raise TFFFormatError(f"{self.source}: split {split!r}, client {client_id!r}: {n} examples, but "
                                     f"client_metadata says {expected[client_id]}")
        where = f"{self.source}: split {split!r}, client {client_id!r}"
        sizes = {name: _shape_size(shape) for name, shape in specs.items()}
        columns: dict[str, np.ndarray | list] = {}
        # Example-major: each example is parsed once and copied out while its buffer is hot.
        for i, blob in enumerate(blobs):
            feature_map = self._parse(split, client_id, i, blob).features.feature
            for name, size in sizes.items():
                if name not in feature_map:
                    raise TFFFormatError(f"{where}, example {i}: no feature {name!r} "
                                         f"(has: {', '.join(sorted(feature_map)) or 'none'})")
                feature = feature_map[name]
                this_kind = feature.WhichOneof("kind")
                kind = kinds.setdefault(name, this_kind)
                if this_kind != kind and (this_kind is not None or size != 0):
                    raise TFFFormatError(f"{where}, example {i}: feature {name!r} is a {this_kind}, earlier "
                                         f"examples have a {kind}")
                values = getattr(feature, this_kind).value if this_kind else ()
                if size is not None and len(values) != size:
                    raise TFFFormatError(f"{where}, example {i}: feature {name!r} has {len(values)} values, "
                                         f"expected {size} (shape {specs[name]})")
                column = columns.get(name)
                if column is None:
                    column = columns[name] = (np.empty((len(blobs), size), _NUMERIC.get(kind or "", _FLOAT))
                                              if size is not None and kind != "bytes_list" else [])
                if isinstance(column, np.ndarray):
                    column[i] = values
                elif kind == "bytes_list":
                    column.append(values[0] if specs[name] == () else list(values))
                else:
                    column.append(np.array(values, dtype=_NUMERIC.get(kind or "", _FLOAT)))
        out: ClientData = {}
        for name, shape in specs.items():
            column = columns.get(name)
            if column is None:  # a client without examples
                kind = kinds.get(name)
                column = [] if kind == "bytes_list" or shape is None else np.empty((0, *shape),
                                                                                    _NUMERIC.get(kind or "", _FLOAT))
            elif isinstance(column, np.ndarray):
                column = column.reshape((len(blobs), *shape))
            out[name] = column
        return out


def open_sqlite(path: str | os.PathLike, *, tmp_dir: str | os.PathLike | None = None,
                progress: Progress | None = None) -> TFFSqlite:
    """Opens a TFF `.sqlite` or `.sqlite.lzma` file (the latter decompressed into `tmp_dir`)."""
    return TFFSqlite(path, tmp_dir=tmp_dir, progress=progress)


def iter_sqlite_clients(path: str | os.PathLike, split: str, features: Features | None = None, *,
                        tmp_dir: str | os.PathLike | None = None,
                        progress: Progress | None = None) -> Iterator[tuple[str, ClientData]]:
    """Yields `(client_id, {feature: values})` for every client of `split` in a TFF SQLite file.

    A `.lzma` file is decompressed first (once per call; to read several
    splits, use `open_sqlite(path)` and its `clients(split, features)`).
    """
    with open_sqlite(path, tmp_dir=tmp_dir, progress=progress) as db:
        yield from db.clients(split, features)


# ------------------------------------------------------------------------------------------------ HDF5


def require_h5py() -> ModuleType:
    """The h5py module, or a MissingDependencyError saying how to install it."""
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError(f"reading TFF's legacy HDF5 files needs h5py: {H5_EXTRA}") from None
    return h5py


@contextlib.contextmanager
def extract_h5_archive(archive: str | os.PathLike, *, tmp_dir: str | os.PathLike | None = None,
                       progress: Progress | None = None) -> Iterator[dict[str, pathlib.Path]]:
    """Extracts the `.h5` members of a TFF `.tar.bz2` into a temporary directory (deleted on exit).

    Yields `{member file name (no directories): extracted path}`. The archive
    is read as one stream (bz2 is not seekable), members are written by
    their base name only, and anything but regular `.h5` files is skipped.
    """
    archive = pathlib.Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such file")
    directory = _temp_path(pathlib.Path(tmp_dir) if tmp_dir else cache_dir(), archive.name, is_dir=True)
    try:
        members: dict[str, pathlib.Path] = {}
        if progress is not None:
            progress(f"extracting {archive} into {directory.parent}")
        try:
            with tarfile.open(archive, "r|*") as tar:
                for member in tar:
                    base = pathlib.PurePosixPath(member.name).name
                    if not member.isfile() or not base.endswith(".h5") or base.startswith("."):
                        continue
                    if base in members:
                        raise TFFFormatError(f"{archive}: two members named {base}")
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    target = directory / base
                    with src, open(target, "wb") as dst:
                        _copy_with_progress(src, dst, f"{archive.name}:{base}", progress)
                    members[base] = target
        except (tarfile.TarError, EOFError, OSError) as e:
            raise TFFFormatError(f"{archive}: truncated or unreadable archive ({e})") from None
        if not members:
            raise TFFFormatError(f"{archive}: no .h5 files in the archive")
        yield members
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _to_bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


@contextlib.contextmanager
def _h5_examples(path: str | os.PathLike, label: str) -> Iterator[Any]:
    """The `examples` group of a TFF HDF5 file, open for the `with` block (one line naming `label` if not)."""
    h5py = require_h5py()
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise TFFFormatError(f"{label}: not a readable HDF5 file ({e})") from None
    with f:
        group = f.get("examples")
        if not isinstance(group, h5py.Group):
            raise TFFFormatError(f"{label}: no group 'examples'; not a TFF HDF5 dataset")
        yield group


def h5_counts(path: str | os.PathLike, feature: str, *, name: str | None = None) -> tuple[int, int]:
    """(clients, examples) of a TFF HDF5 file from its groups and dataset shapes (no data read).

    A client's examples are the leading dimension of `feature` (or, lacking
    it, of its first dataset; the reader reports such a client itself).
    """
    h5py = require_h5py()
    label = name or str(path)
    with _h5_examples(path, label) as group:
        clients = examples = 0
        for client_id in group.keys():
            client = group[client_id]
            clients += 1
            if not isinstance(client, h5py.Group):
                continue
            datasets = [client[feature]] if isinstance(client.get(feature), h5py.Dataset) else \
                [d for d in client.values() if isinstance(d, h5py.Dataset)]
            if datasets and datasets[0].shape:
                examples += int(datasets[0].shape[0])
    return clients, examples


def iter_h5_clients(path: str | os.PathLike, features: Features | None = None, *,
                    name: str | None = None) -> Iterator[tuple[str, ClientData]]:
    """Yields `(client_id, {feature: values})` from a TFF HDF5 file, clients in sorted order.

    The file has a group `examples` with one subgroup per client and one
    dataset per feature. `features` (see the module docstring) selects and
    checks features; `None` reads all of each client's datasets. Numeric
    datasets come back as arrays as stored (dtype unchanged), string datasets
    as lists of bytes. `name` is how errors refer to the file (default: the path).
    """
    h5py = require_h5py()
    label = name or str(path)
    with _h5_examples(path, label) as group:
        for client_id in sorted(group.keys()):
            where = f"{label}: client {client_id!r}"
            client = group[client_id]
            if not isinstance(client, h5py.Group):
                raise TFFFormatError(f"{where}: examples/{client_id} is not a group")
            names = list(features) if features is not None else sorted(client.keys())
            out: ClientData = {}
            counts: dict[str, int] = {}
            for feature in names:
                ds = client.get(feature)
                if not isinstance(ds, h5py.Dataset):
                    raise TFFFormatError(f"{where}: no feature {feature!r} (has: {', '.join(sorted(client.keys()))})")
                try:
                    array = ds[()]
                except (OSError, ValueError) as e:
                    raise TFFFormatError(f"{where}: feature {feature!r} is unreadable ({e})") from None
                array = np.asarray(array)
                if array.ndim == 0:
                    raise TFFFormatError(f"{where}: feature {feature!r} is a scalar, expected [examples, ...]")
                shape = None if features is None else features[feature]
                if shape is not None and array.shape[1:] != tuple(shape):
                    raise TFFFormatError(f"{where}: feature {feature!r} has shape {array.shape}, expected "
                                         f"[n, {', '.join(map(str, shape))}]" if shape else
                                         f"{where}: feature {feature!r} has shape {array.shape}, expected [n]")
                counts[feature] = array.shape[0]
                if array.dtype.kind in "SUO":  # strings: bytes per example, or a list of bytes per example
                    rows = [[_to_bytes(v) for v in row] for row in array.reshape(array.shape[0], -1)]
                    out[feature] = [row[0] for row in rows] if array.ndim == 1 else rows
                else:
                    out[feature] = array
            if len(set(counts.values())) > 1:
                raise TFFFormatError(f"{where}: features have different example counts {counts}")
            yield client_id, out
