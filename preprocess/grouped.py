"""Recipe `grouped`: a flat corpus grouped by a key field, one client per group (as Dataset Grouper).

Dataset Grouper (Charles et al., NeurIPS 2023 Datasets and Benchmarks) builds federated datasets
from flat corpora by a group key, e.g. C4 by web domain. Here the input is one or more files
(`inputs`: comma-separated paths or globs, each glob expanded in sorted order) of one format:
JSON Lines (one object per line), CSV (a header row, no line breaks inside quoted fields) or
Parquet. Every record has the group field `group_key` (a string or an integer), and:

- `text_key`: a text field, stored with `text_encoding`
  - `bytes` (default): feature `text` uint8 [n] (variable length), the text's UTF-8 bytes;
  - `chars`: next-character sequences as the `shakespeare` recipe makes them (fedstream/data/text.py:
    TFF's 86-character vocabulary per UTF-8 byte, PAD 0, OOV 87, BOS 88, EOS 89; each record one
    snippet, a group's snippets joined and cut into windows): `x`, `y` int32 [sequence_length],
    vocabulary stored as the asset `vocab.json`; trainable with the Shakespeare pipelines;
- `feature_keys`: comma-separated numeric fields, stored as `x` float32 [k];
- `label_key`: an integer field, stored as `y` int32.

Clients are the groups, ids the key's text; a group with fewer than `min_examples` records is
dropped, the others keep their first `max_examples` records (0: all). Everything goes to split
`train`. A client's examples are its records in input order (files in `inputs` order, then line
or row order).

Input larger than memory: records are streamed once and appended to `B` spill files on disk
(JSON lines in `spill_dir`, by default the system temporary directory), bucket `crc32(key) mod B`,
with `B = ceil(total input bytes / bucket_bytes)` (at most 1024); then one bucket at a time is read
back, grouped in memory and written, its groups in key order. So memory holds about one bucket
(a few times `bucket_bytes`) plus the largest group, and the disk needs about the input's size
again. Client order is therefore (bucket, key); it is deterministic for a given input and config,
and the content digest does not depend on it (nor on B). The Beam route (`--runner`,
docs/beam.md) reads byte ranges / row groups in parallel and groups with GroupByKey; the content
digest equals this route's.

A bad record is an error naming the file and line (the byte offset on the Beam route): a line
that is not JSON or CSV, a record without the group field, text or feature, a wrong type.

    fedstream preprocess grouped --output data/c4-by-domain --config.inputs='c4/*.jsonl' \\
        --config.group_key=domain --config.text_key=text --config.min_examples=10
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import math
import os
import pathlib
import tempfile
import zlib
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

from fedstream.data import text
from fedstream.data.format import FeatureSpec, Schema

SOURCE = "user-provided flat files grouped by a key field (provenance and license are the user's)"
FORMATS = ("jsonl", "csv", "parquet")
ENCODINGS = ("bytes", "chars")
MAX_BUCKETS = 1024
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}

# One record after parsing: [text or None, [feature floats], label or None] (JSON-serializable, for the spill).
Value = list


def get_config() -> ml_collections.ConfigDict:
    """Knobs; `inputs` and `group_key` are required."""
    c = ml_collections.ConfigDict()
    c.inputs = ""  # comma-separated files or globs (required)
    c.format = ""  # jsonl | csv | parquet; '' = from the first file's extension
    c.group_key = ""  # the field naming each record's group = client (required)
    c.text_key = "text"  # a text field ('' = none)
    c.text_encoding = "bytes"  # bytes: `text` uint8 [n]; chars: next-character `x`, `y` int32 [sequence_length]
    c.sequence_length = text.SHAKESPEARE_SEQUENCE_LENGTH
    c.feature_keys = ""  # comma-separated numeric fields stored as `x` float32 [k]
    c.label_key = ""  # an integer field stored as `y` int32 ('' = none)
    c.min_examples = 1  # groups with fewer records are dropped
    c.max_examples = 0  # a group keeps its first max_examples records (0 = all)
    c.bucket_bytes = 64 << 20  # single-process route: input bytes per spill bucket (bounds memory)
    c.spill_dir = ""  # single-process route: where buckets are spilled ('' = the system temporary directory)
    c.csv_delimiter = ","
    return c


def _names(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def input_files(config: ml_collections.ConfigDict) -> tuple[list[str], str]:
    """The input files (globs expanded in sorted order, duplicates dropped) and their format."""
    if not config.inputs:
        raise ValueError("recipe grouped needs --config.inputs=FILE_OR_GLOB[,...]")
    files: list[str] = []
    for pattern in _names(config.inputs):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ValueError(f"config.inputs: {pattern!r} matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise ValueError(f"config.inputs: {path}: no such file")
            if os.path.abspath(path) not in {os.path.abspath(f) for f in files}:
                files.append(path)
    fmt = config.format or _EXTENSIONS.get(pathlib.Path(files[0]).suffix.lower(), "")
    if fmt not in FORMATS:
        raise ValueError(f"config.format must be one of {', '.join(FORMATS)} (or '' with a .jsonl, .csv or .parquet "
                         f"file), got {config.format!r} for {files[0]}")
    return files, fmt


def _check(config: ml_collections.ConfigDict) -> None:
    if not config.group_key:
        raise ValueError("recipe grouped needs --config.group_key=FIELD (the field that names each record's group)")
    if config.text_encoding not in ENCODINGS:
        raise ValueError(f"config.text_encoding must be one of {', '.join(ENCODINGS)}, got {config.text_encoding!r}")
    if config.text_key and config.text_encoding == "chars" and (config.feature_keys or config.label_key):
        raise ValueError("config.text_encoding=chars makes the features x and y: leave config.feature_keys and "
                         "config.label_key empty")
    if not (config.text_key or config.feature_keys or config.label_key):
        raise ValueError("recipe grouped stores nothing: set config.text_key, config.feature_keys or config.label_key")
    for key in ("min_examples", "max_examples"):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 0:
            raise ValueError(f"config.{key} must be an integer >= 0, got {config[key]!r}")
    if isinstance(config.bucket_bytes, bool) or not isinstance(config.bucket_bytes, int) or config.bucket_bytes < 1:
        raise ValueError(f"config.bucket_bytes must be an integer >= 1, got {config.bucket_bytes!r}")
    if config.text_encoding == "chars" and config.sequence_length < 1:
        raise ValueError(f"config.sequence_length must be >= 1, got {config.sequence_length}")


def schema(config: ml_collections.ConfigDict) -> Schema:
    """`text` uint8 [n] or next-character `x`, `y` int32 [sequence_length]; `x` float32 [k]; `y` int32."""
    _check(config)
    out: Schema = {}
    if config.text_key and config.text_encoding == "chars":
        return {"x": FeatureSpec("int32", (config.sequence_length,)),
                "y": FeatureSpec("int32", (config.sequence_length,))}
    if config.text_key:
        out["text"] = FeatureSpec("uint8", (None,))
    if config.feature_keys:
        out["x"] = FeatureSpec("float32", (len(_names(config.feature_keys)),))
    if config.label_key:
        out["y"] = FeatureSpec("int32", ())
    return out


def assets(config: ml_collections.ConfigDict) -> dict[str, bytes]:
    """`vocab.json` with text_encoding=chars (the character vocabulary of the shakespeare recipe)."""
    if config.text_key and config.text_encoding == "chars":
        return {"vocab.json": text.char_vocabulary().to_json(task="next-character prediction",
                                                              sequence_length=config.sequence_length,
                                                              packing="joined")}
    return {}


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 over the input files' names and bytes: changed input is not 'up to date'."""
    digest = hashlib.sha256()
    for path in input_files(config)[0]:
        digest.update(f"{os.path.basename(path)}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------------------------------------- reading


def csv_header(path: str, delimiter: str) -> tuple[list[str], int]:
    """The header's fields and the byte offset of the first row."""
    with open(path, "rb") as f:
        line = f.readline()
    header = next(csv.reader([line.decode("utf-8-sig", errors="replace")], delimiter=delimiter), None)
    if not header:
        raise ValueError(f"{path}: empty file (a CSV needs a header row)")
    return header, len(line)


def _record(config: ml_collections.ConfigDict, fields: dict[str, Any], where: str,
            from_text: bool) -> tuple[str, Value]:
    """`(group key, value)` of one record; `from_text`: CSV cells (strings) are parsed as numbers."""
    def get(key: str) -> Any:
        if key not in fields:
            raise ValueError(f"{where}: no field {key!r} (fields: {', '.join(map(str, fields)) or 'none'})")
        return fields[key]

    group = get(config.group_key)
    if isinstance(group, bool) or not isinstance(group, (str, int)):
        raise ValueError(f"{where}: group field {config.group_key!r} must be a string or an integer, "
                         f"got {type(group).__name__}")
    group = str(group)
    if not group:
        raise ValueError(f"{where}: empty group field {config.group_key!r}")
    value: Value = [None, [], None]
    if config.text_key:
        body = get(config.text_key)
        if not isinstance(body, str):
            raise ValueError(f"{where}: text field {config.text_key!r} must be a string, got {type(body).__name__}")
        value[0] = body
    for key in _names(config.feature_keys):
        number = get(key)
        try:
            if isinstance(number, bool) or not isinstance(number, (int, float, str) if from_text else (int, float)):
                raise TypeError
            value[1].append(float(number))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: field {key!r} must be a number, got {number!r}") from None
    if config.label_key:
        label = get(config.label_key)
        try:
            if isinstance(label, (bool, float)) or not isinstance(label, (int, str)):
                raise TypeError
            value[2] = int(label)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label field {config.label_key!r} must be an integer, got {label!r}") from None
    return group, value


def parse_line(config: ml_collections.ConfigDict, fmt: str, header: list[str] | None, line: bytes,
               where: str) -> tuple[str, Value]:
    """`(group key, value)` of one JSON Lines or CSV line; errors start with `where` (file and line)."""
    try:
        decoded = line.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 ({e.reason})") from None
    if fmt == "jsonl":
        try:
            fields = json.loads(decoded)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(fields).__name__}")
        return _record(config, fields, where, from_text=False)
    assert header is not None
    try:
        row = next(csv.reader([decoded], delimiter=config.csv_delimiter, strict=True))
    except csv.Error as e:
        raise ValueError(f"{where}: not valid CSV ({e}); quoted fields with line breaks are not supported") from None
    if len(row) != len(header):
        raise ValueError(f"{where}: {len(row)} fields but the header has {len(header)}")
    return _record(config, dict(zip(header, row)), where, from_text=True)


def line_records(config: ml_collections.ConfigDict, fmt: str, path: str, header: list[str] | None, start: int,
                 end: int, first_line: int | None = None) -> Iterator[tuple[int, int, str, Value]]:
    """`(byte offset, line length, group key, value)` of the JSON Lines / CSV records whose line starts in
    [start, end).

    Errors name `path` and the line number when `first_line` (the number of the line at `start`)
    is known, else the byte offset (a Beam read task that starts mid-file does not know it).
    """
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line that starts before `start` belongs to the previous range
        position = f.tell()
        number = first_line
        while position < end:
            line = f.readline()
            if not line:
                break
            if line.strip(b"\r\n \t"):
                where = f"{path} line {number}" if number is not None else f"{path} byte {position}"
                group, value = parse_line(config, fmt, header, line, where)
                yield position, len(line), group, value
            position += len(line)
            if number is not None:
                number += 1


def parquet_records(config: ml_collections.ConfigDict, path: str, row_group: int,
                    first_row: int) -> Iterator[tuple[int, str, Value]]:
    """`(row number, group key, value)` of one Parquet row group."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(row_group)
    for i, fields in enumerate(table.to_pylist()):
        group, value = _record(config, fields, f"{path} row {first_row + i}", from_text=False)
        yield first_row + i, group, value


def records(config: ml_collections.ConfigDict) -> Iterator[tuple[str, Value]]:
    """Every record of the input as `(group key, value)`, in input order."""
    files, fmt = input_files(config)
    for path in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            metadata = pq.ParquetFile(path).metadata
            first = 0
            for group in range(metadata.num_row_groups):
                for _, key, value in parquet_records(config, path, group, first):
                    yield key, value
                first += metadata.row_group(group).num_rows
            continue
        header, start = csv_header(path, config.csv_delimiter) if fmt == "csv" else (None, 0)
        if header is not None and config.group_key not in header:
            raise ValueError(f"{path}: no column {config.group_key!r} (columns: {', '.join(header)})")
        for _, _, key, value in line_records(config, fmt, path, header, start, os.path.getsize(path),
                                             first_line=2 if header is not None else 1):
            yield key, value


# ---------------------------------------------------------------------------------------------- grouping


def select(config: ml_collections.ConfigDict, values: Sequence[Value]) -> Sequence[Value] | None:
    """A group's records to store (None: fewer than min_examples), in input order."""
    if len(values) < config.min_examples or not values:
        return None
    return values[: config.max_examples] if config.max_examples else values


def client_examples(config: ml_collections.ConfigDict, group: str, values: Sequence[Value]) -> dict[str, Any]:
    """One group's stored features, from its records in input order."""
    out: dict[str, Any] = {}
    if config.text_key:
        try:
            data = [v[0].encode("utf-8") for v in values]
        except UnicodeEncodeError:
            raise ValueError(f"group {group!r}: a text is not valid Unicode (lone surrogate)") from None
        if config.text_encoding == "chars":
            vocab = text.char_vocabulary()
            x, y = text.char_sequences(data, text.char_table(vocab), vocab, config.sequence_length, "joined")
            return {"x": x, "y": y}
        out["text"] = [np.frombuffer(d, np.uint8) for d in data]
    if config.feature_keys:
        out["x"] = np.array([v[1] for v in values], np.float32).reshape(len(values), -1)
    if config.label_key:
        out["y"] = np.array([v[2] for v in values], np.int64)
    return out


def num_buckets(config: ml_collections.ConfigDict) -> int:
    """Spill buckets of the single-process route: input bytes / bucket_bytes, between 1 and MAX_BUCKETS."""
    total = sum(os.path.getsize(p) for p in input_files(config)[0])
    return max(1, min(MAX_BUCKETS, math.ceil(total / config.bucket_bytes)))


def bucket_of(group: str, buckets: int) -> int:
    """A stable hash (not Python's salted `hash`) of the group key, mod `buckets`."""
    return zlib.crc32(group.encode("utf-8", "surrogatepass")) % buckets


def _spill(config: ml_collections.ConfigDict, directory: str, buckets: int) -> list[str]:
    """Streams the input into `buckets` JSON Lines files `[group, value]`, each in input order."""
    paths = [os.path.join(directory, f"bucket-{b:05d}.jsonl") for b in range(buckets)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "w", encoding="ascii", buffering=1 << 16)) for p in paths]
        for group, value in records(config):
            files[bucket_of(group, buckets)].write(json.dumps([group, value]) + "\n")
    return paths


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yields each group's examples (split `train`): bucket by bucket, groups in key order."""
    _check(config)
    buckets = num_buckets(config)
    if config.spill_dir and not os.path.isdir(config.spill_dir):
        raise ValueError(f"config.spill_dir: {config.spill_dir}: no such directory")
    with tempfile.TemporaryDirectory(prefix="fedstream-grouped-", dir=config.spill_dir or None) as directory:
        for path in _spill(config, directory, buckets):
            groups: dict[str, list[Value]] = {}
            with open(path, encoding="ascii") as f:
                for line in f:
                    group, value = json.loads(line)
                    groups.setdefault(group, []).append(value)
            os.remove(path)
            for group in sorted(groups):
                values = select(config, groups.pop(group))
                if values is not None:
                    yield "train", group, client_examples(config, group, values)

