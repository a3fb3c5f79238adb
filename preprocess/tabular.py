"""Recipe `tabular`: a CSV file, a Parquet file or a Hugging Face dataset, split over clients.

One row is one example. `format` is `csv` (stdlib `csv`, a header row,
UTF-8), `parquet` (needs pyarrow) or `hf` (needs the Hugging Face `datasets`
library: a directory written by `save_to_disk`, or anything
`datasets.load_dataset` takes, e.g. `hf_dataset=parquet` with
`hf_data_files`); '' infers csv/parquet from the extension of `train`. For
csv and parquet `train` / `test` are files; for hf they are split names
(default `train`).

Features: `x` is the column `input_key` or, for several comma-separated
columns (default: every column but the label and client columns), those
columns flattened and concatenated per example; `input_shape` reshapes it,
`input_scale` multiplies it, and it is stored as `input_dtype`. List
columns (Parquet lists, HF sequences) and HF images become arrays; every row
must have the same shape. `y` is the column `label_key`: integers (stored as
`label_dtype`), or strings, mapped to ids in sorted order over all splits
(the names are stored as the asset `labels.json`). Missing values are
errors.

Clients: the column `client_key` (ids are the column's values as text;
clients in order of first appearance, rows in file order), or a
partitioner from `fedstream.data.partition` over the rows: `iid`,
`dirichlet` (label skew, `alpha`, `min_examples`), `shards`
(`shards_per_client`) or `quantity` (quantity skew: client sizes drawn from
a log-normal with `quantity_sigma`, or a power law with
`quantity_exponent`; `min_examples`), clients then `client_00000`, .... A
test file or split is grouped by its own client column, or partitioned
independently with the same partitioner (seed derived from `seed`).
`test_fraction` > 0 instead splits each client's rows into train and test
(LEAF convention, as in the `arrays` recipe).

    fedstream preprocess tabular --output data/adult --config.train=adult.csv \\
        --config.label_key=income --config.partitioner=quantity --config.num_clients=100

Errors name the file (or HF split), the row or line and, where known, the client, on one line.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import pathlib
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema, file_sha256
from fedstream.data.partition import (dirichlet_label_partition, iid_partition, quantity_skew_partition,
                                      shards_partition)

SOURCE = "a user-provided CSV / Parquet file or Hugging Face dataset (provenance and license are the user's)"
FORMATS = ("csv", "parquet", "hf")
PARTITIONERS = ("iid", "dirichlet", "shards", "quantity")
_EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}
_HF_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")


def get_config() -> ml_collections.ConfigDict:
    """Knobs; `train` (or, for hf, `hf_dataset`) is required."""
    c = ml_collections.ConfigDict()
    c.format = ""  # csv | parquet | hf; '' = from the extension of train
    c.train = ""  # csv/parquet: the file; hf: the split name ('' = train)
    c.test = ""  # csv/parquet: a test file; hf: a test split name ('' = none)
    c.hf_dataset = ""  # hf: a save_to_disk directory, or a name/builder for datasets.load_dataset
    c.hf_config = ""  # hf: load_dataset's configuration name
    c.hf_data_files = ""  # hf: load_dataset data_files, "train=a.parquet,test=b.parquet" or one path
    c.hf_cache_dir = ""  # hf: load_dataset cache_dir ('' = the datasets default)
    c.csv_delimiter = ","
    c.input_key = ""  # comma-separated input columns; '' = all but label_key and client_key
    c.label_key = "label"  # column stored as y ('' = no y)
    c.client_key = ""  # natural client column; '' = use the partitioner
    c.input_shape = ()  # per-example shape of x, e.g. 28,28,1 (one dimension: 784,); () = as read
    c.input_scale = 1.0  # x is multiplied by this (e.g. 1/255)
    c.input_dtype = "float32"  # x is stored as this ('' = keep)
    c.label_dtype = "int32"  # y is stored as this (integer or float dtype)
    c.partitioner = "iid"  # iid | dirichlet | shards | quantity
    c.num_clients = 10
    c.alpha = 0.5  # dirichlet
    c.min_examples = 1  # dirichlet, quantity
    c.shards_per_client = 2  # shards
    c.quantity_distribution = "lognormal"  # quantity: lognormal | powerlaw
    c.quantity_sigma = 1.0  # quantity lognormal: standard deviation of log client sizes
    c.quantity_exponent = 1.5  # quantity powerlaw: tail exponent, P(size > t) ~ t^-exponent
    c.test_fraction = 0.0  # > 0: per-client train/test split of the train rows
    c.seed = 0
    return c


class _RowError(ValueError):
    """A value that does not convert, at row `row` of the table (the caller names file and client)."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def _names(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


@dataclasses.dataclass
class _Table:
    """Columns of one split: numeric arrays [n, ...] or object/str arrays [n]."""

    name: str  # the file, or the HF dataset and split, for messages
    columns: dict[str, Any]  # name -> np.ndarray, or a loader returning one (read on first use)
    num_rows: int
    where_row: Callable[[int], str] = lambda row: f"row {row}"

    def column(self, key: str) -> np.ndarray:
        if key not in self.columns:
            raise ValueError(f"{self.name}: no column {key!r} (columns: {', '.join(self.columns) or 'none'})")
        value = self.columns[key]
        if callable(value):
            value = self.columns[key] = value()
        return value


# ---------------------------------------------------------------------------------------------- reading


def _format(config: ml_collections.ConfigDict) -> str:
    if config.format:
        if config.format not in FORMATS:
            raise ValueError(f"config.format must be one of {', '.join(FORMATS)}, got {config.format!r}")
        return config.format
    if config.hf_dataset:
        return "hf"
    if not config.train:
        raise ValueError("recipe tabular needs --config.train=FILE (.csv or .parquet) or --config.hf_dataset=...")
    fmt = _EXTENSIONS.get(pathlib.Path(config.train).suffix.lower())
    if fmt is None:
        raise ValueError(f"{config.train}: cannot tell the format from the extension; set --config.format="
                         f"{'|'.join(FORMATS)}")
    return fmt


def _splits(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{fedstream split: file or HF split}."""
    if _format(config) == "hf":
        if not config.hf_dataset:
            raise ValueError("format hf needs --config.hf_dataset=DIR_OR_NAME")
        out = {"train": config.train or "train"}
    else:
        if not config.train:
            raise ValueError(f"format {config.format or 'csv/parquet'} needs --config.train=FILE")
        out = {"train": config.train}
    if config.test:
        if config.test_fraction > 0:
            raise ValueError("give either config.test or config.test_fraction, not both")
        out["test"] = config.test
    return out


def _numeric_text(values: np.ndarray) -> np.ndarray:
    """A CSV column (str array) as int64, else float64, else the strings."""
    for dtype in (np.int64, np.float64):
        try:
            return values.astype(dtype)
        except (ValueError, OverflowError):
            continue
    return values


def _read_csv(path: pathlib.Path, delimiter: str, client_key: str) -> _Table:
    if len(delimiter) != 1:
        raise ValueError(f"config.csv_delimiter must be one character, got {delimiter!r}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text, bad_utf8 = raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        text, bad_utf8 = raw.decode("utf-8-sig", "surrogateescape"), e
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file (a CSV needs a header row)")
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise ValueError(f"{path}: column {dup!r} appears twice in the header")
        rows, lines = [], []
        for row in reader:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                client = f": client {row[header.index(client_key)]!r}" if client_key in header and len(row) > \
                    header.index(client_key) else ""
                raise ValueError(f"{path} line {reader.line_num}{client}: {len(row)} fields but the header has "
                                 f"{len(header)} (truncated file or wrong delimiter?)")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: not valid CSV ({_one_line(e)}); truncated file?") from None
    if bad_utf8 is not None:
        def raw(value: str) -> bytes:
            return value.encode("utf-8", "surrogateescape")

        for row, line in zip(rows, lines):
            for key, value in zip(header, row):
                if any("\udc80" <= ch <= "\udcff" for ch in value):
                    if key == client_key:
                        raise ValueError(f"{path} line {line}: client {raw(value)!r}: client id is not valid UTF-8")
                    client = f": client {raw(row[header.index(client_key)])!r}" if client_key in header else ""
                    raise ValueError(f"{path} line {line}{client}: column {key!r} value {raw(value)!r} is not "
                                     "valid UTF-8")
        raise ValueError(f"{path}: not UTF-8 ({bad_utf8.reason} at byte {bad_utf8.start})")
    table = np.array(rows, dtype=str).reshape(len(rows), len(header))
    columns = {key: table[:, j] for j, key in enumerate(header)}
    return _Table(str(path), columns, len(rows), where_row=lambda row: f"line {lines[row]}")


def _arrow_to_numpy(column: Any) -> np.ndarray:
    """A pyarrow (Chunked)Array -> numeric array [n, ...] (lists become axes) or object array of str/bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise _RowError(row, "missing value (null)")
    kind = array.type
    if pa.types.is_dictionary(kind):
        return _arrow_to_numpy(array.dictionary_decode())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise _RowError(row, f"a list of {lengths[row]} values where the others have {lengths[0]}: rows must "
                                 "have the same shape")
        try:
            inner = _arrow_to_numpy(array.flatten())
        except _RowError as e:
            outer = int(np.searchsorted(np.cumsum(lengths), e.row, side="right"))
            raise _RowError(outer, str(e)) from None
        width = int(lengths[0]) if len(lengths) else 0
        return inner.reshape(len(array), width, *inner.shape[1:])
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return array.to_numpy(zero_copy_only=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or \
            pa.types.is_large_binary(kind):
        return np.array(array.to_pylist(), dtype=object)
    raise _RowError(0, f"column type {kind} is not supported (numbers, strings, bytes and lists of them are)")


def _arrow_table(name: str, table: Any, decoded: dict[str, Callable[[], np.ndarray]] | None = None) -> _Table:
    columns: dict[str, Any] = {key: (lambda col=table.column(key): _arrow_to_numpy(col)) for key in table.column_names}
    columns.update(decoded or {})
    return _Table(name, columns, table.num_rows)


def _read_parquet(path: pathlib.Path) -> _Table:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("format parquet needs pyarrow: pip install pyarrow (fedstream's 'parquet' extra)") from None
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({_one_line(e)}); truncated?") from None
    return _arrow_table(str(path), table)


def _datasets() -> Any:
    """The `datasets` module, or a ValueError that says how to install it."""
    try:
        import datasets
    except ImportError:
        raise ValueError("format hf needs the Hugging Face datasets library: pip install datasets "
                         "(fedstream's 'hf' extra)") from None
    return datasets


def _hf_dataset(config: ml_collections.ConfigDict) -> Any:
    datasets = _datasets()
    source = config.hf_dataset
    local = pathlib.Path(source)
    try:
        if local.is_dir() and any((local / f).exists() for f in _HF_SAVED):
            return datasets.load_from_disk(str(local))
        data_files: Any = None
        if config.hf_data_files:
            items = _names(config.hf_data_files)
            data_files = dict(i.split("=", 1) for i in items) if all("=" in i for i in items) else items
        return datasets.load_dataset(source, config.hf_config or None, data_files=data_files,
                                     cache_dir=config.hf_cache_dir or None)
    except (OSError, ValueError, FileNotFoundError, KeyError, TypeError) as e:
        raise ValueError(f"hf dataset {source!r}: cannot load ({_one_line(e)})") from None


def _hf_name(config: ml_collections.ConfigDict, split: str) -> str:
    """How messages name an HF split."""
    return f"hf dataset {config.hf_dataset!r} split {split!r}"


def _hf_split(config: ml_collections.ConfigDict, split: str) -> Any:
    """The `datasets.Dataset` of HF split `split` (a single saved Dataset is the split `train`)."""
    datasets = _datasets()
    loaded = _hf_dataset(config)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"hf dataset {config.hf_dataset!r}: no split {split!r} (splits: {', '.join(loaded)})")
        ds = loaded[split]
    elif split == "train":
        ds = loaded  # a single Dataset saved with save_to_disk: it is the train split
    else:
        raise ValueError(f"hf dataset {config.hf_dataset!r} is a single Dataset without splits; "
                         f"there is no split {split!r}")
    return ds


def _read_hf(config: ml_collections.ConfigDict, split: str) -> _Table:
    datasets = _datasets()
    ds = _hf_split(config, split)
    name = _hf_name(config, split)

    def images(key: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            values = ds.with_format("numpy")[:][key]
            if isinstance(values, np.ndarray) and values.dtype != object:
                return values
            shapes = [np.shape(v) for v in values]
            row = next(i for i, s in enumerate(shapes) if s != shapes[0])
            raise _RowError(row, f"an image of shape {shapes[row]} where row 0 has {shapes[0]}")
        return load

    decoded = {k: images(k) for k, f in ds.features.items() if isinstance(f, datasets.Image)}
    return _arrow_table(name, ds.with_format("arrow")[:], decoded)


def _read(config: ml_collections.ConfigDict, source: str) -> _Table:
    fmt = _format(config)
    if fmt == "csv":
        return _read_csv(pathlib.Path(source), config.csv_delimiter, config.client_key)
    if fmt == "parquet":
        return _read_parquet(pathlib.Path(source))
    return _read_hf(config, source)


# ---------------------------------------------------------------------------------------------- converting


def _client_ids(table: _Table, key: str) -> np.ndarray:
    """The client column as text ids (str array)."""
    try:
        values = table.column(key)
    except _RowError as e:
        raise ValueError(f"{table.name} {table.where_row(e.row)}: client column {key!r}: {e}") from None
    if values.ndim != 1:
        raise ValueError(f"{table.name}: client column {key!r} holds lists; it must hold one id per row")
    ids = []
    for row, value in enumerate(values.tolist()):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{table.name} {table.where_row(row)}: client {value!r}: client id is not valid "
                                 f"UTF-8 ({e.reason} at byte {e.start})") from None
        text = str(value)
        if not text:
            raise ValueError(f"{table.name} {table.where_row(row)}: empty client id")
        ids.append(text)
    return np.array(ids, dtype=str) if ids else np.zeros(0, "<U1")


def _fail(table: _Table, ids: np.ndarray | None, row: int, message: str) -> ValueError:
    client = f": client {str(ids[row])!r}" if ids is not None and row < len(ids) else ""
    return ValueError(f"{table.name} {table.where_row(row)}{client}: {message}")


def _numeric(table: _Table, key: str, ids: np.ndarray | None) -> np.ndarray:
    try:
        values = table.column(key)
    except _RowError as e:
        raise _fail(table, ids, e.row, f"column {key!r}: {e}") from None
    if values.dtype.kind == "U":
        values = _numeric_text(values)
    if values.dtype.kind not in "biuf":
        for row, value in enumerate(values.tolist()):
            try:
                float(value)
            except (TypeError, ValueError):
                raise _fail(table, ids, row, f"column {key!r}: {value!r} is not a number") from None
        values = values.astype(np.float64)
    return values


def _input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    shape = config.input_shape
    if not shape:
        return None
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"config.input_shape must be positive integers such as 28,28,1 (one dimension: 784,), "
                         f"got {shape!r}")
    return tuple(shape)


def _inputs(config: ml_collections.ConfigDict, table: _Table) -> list[str]:
    keys = _names(config.input_key) or [k for k in table.columns if k not in (config.label_key, config.client_key)]
    if not keys:
        raise ValueError(f"{table.name}: no input columns (set --config.input_key)")
    for key in keys:
        if key in (config.label_key, config.client_key):
            raise ValueError(f"{table.name}: column {key!r} cannot be both an input and the label or client column")
        if key not in table.columns:
            raise ValueError(f"{table.name}: no column {key!r} (columns: {', '.join(table.columns) or 'none'})")
    return keys


def _x(config: ml_collections.ConfigDict, table: _Table, ids: np.ndarray | None) -> np.ndarray:
    parts = [_numeric(table, key, ids) for key in _inputs(config, table)]
    n = table.num_rows
    x = parts[0] if len(parts) == 1 else np.concatenate([p.reshape(n, -1) for p in parts], axis=1)
    shape = _input_shape(config)
    if shape is not None:
        if int(np.prod(x.shape[1:], dtype=np.int64)) != int(np.prod(shape)):
            raise ValueError(f"{table.name}: inputs of shape {x.shape[1:]} cannot be reshaped to {shape}")
        x = x.reshape(n, *shape)
    if config.input_scale != 1.0:
        x = x * config.input_scale
    if config.input_dtype:
        target = np.dtype(config.input_dtype)
        if target.kind in "iu" and x.dtype.kind in "iu" and x.size:
            info = np.iinfo(target)
            if x.min() < info.min or x.max() > info.max:
                raise ValueError(f"{table.name}: inputs {x.min()}..{x.max()} do not fit {target.name}")
        elif target.kind not in "f" and x.dtype.kind == "f":
            raise ValueError(f"{table.name}: float inputs cannot be stored as {target.name}")
        x = x.astype(target)
    return x


def _raw_labels(config: ml_collections.ConfigDict, table: _Table, ids: np.ndarray | None) -> np.ndarray:
    try:
        values = table.column(config.label_key)
    except _RowError as e:
        raise _fail(table, ids, e.row, f"label column {config.label_key!r}: {e}") from None
    if values.ndim != 1:
        raise ValueError(f"{table.name}: label column {config.label_key!r} must hold one value per row")
    if values.dtype.kind == "U":
        values = _numeric_text(values)
    if values.dtype.kind == "O":
        values = np.array([v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)
                           for v in values.tolist()], dtype=str).reshape(len(values))
    return values


def _y(config: ml_collections.ConfigDict, table: _Table, ids: np.ndarray | None, vocab: list[str] | None
       ) -> np.ndarray:
    values = _raw_labels(config, table, ids)
    target = np.dtype(config.label_dtype)
    if vocab is not None:
        if target.kind not in "iu":
            raise ValueError(f"{table.name}: label column {config.label_key!r} holds strings; they become ids, so "
                             f"label_dtype must be an integer dtype, not {target.name}")
        index = {v: i for i, v in enumerate(vocab)}
        return np.array([index[str(v)] for v in values.tolist()], dtype=target).reshape(len(values))
    if target.kind == "f":
        return values.astype(target)
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if len(bad):
            raise _fail(table, ids, int(bad[0]), f"label {values[bad[0]]} is not an integer (for regression "
                                                 "targets set --config.label_dtype=float32)")
    if values.size:
        info = np.iinfo(target)
        bad = np.flatnonzero((values < info.min) | (values > info.max))
        if len(bad):
            raise _fail(table, ids, int(bad[0]), f"label {values[bad[0]]} does not fit {target.name}")
    return values.astype(target)


# ---------------------------------------------------------------------------------------------- clients


def _partition(config: ml_collections.ConfigDict, n: int, labels: np.ndarray | None, seed: Any
               ) -> list[np.ndarray]:
    if config.partitioner not in PARTITIONERS:
        raise ValueError(f"config.partitioner must be one of {', '.join(PARTITIONERS)}, got {config.partitioner!r}")
    if config.partitioner == "iid":
        return iid_partition(n, config.num_clients, seed)
    if config.partitioner == "quantity":
        return quantity_skew_partition(n, config.num_clients, seed, distribution=config.quantity_distribution,
                                       sigma=config.quantity_sigma, exponent=config.quantity_exponent,
                                       min_examples=config.min_examples)
    if labels is None:
        raise ValueError(f"partitioner {config.partitioner!r} needs labels: set --config.label_key")
    if config.partitioner == "dirichlet":
        return dirichlet_label_partition(labels, config.num_clients, config.alpha, seed,
                                         min_examples=config.min_examples)
    return shards_partition(labels, config.num_clients, config.shards_per_client, seed)


def _seed(config: ml_collections.ConfigDict, stream: int) -> int:
    """The partition seed of a split: `seed` for train, one derived from (seed, stream) otherwise."""
    if stream == 0:
        return config.seed
    return int(np.random.SeedSequence([config.seed, stream]).generate_state(1)[0])


def _groups(config: ml_collections.ConfigDict, table: _Table, ids: np.ndarray | None, y: np.ndarray | None,
            stream: int) -> list[tuple[str, np.ndarray]]:
    """(client id, row indices in file order) per client."""
    if ids is not None:
        if not len(ids):
            return []
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        by_group = np.argsort(inverse, kind="stable")
        groups = np.split(by_group, np.cumsum(np.bincount(inverse, minlength=len(first)))[:-1])
        return [(str(ids[first[g]]), groups[g]) for g in np.argsort(first, kind="stable")]
    try:
        parts = _partition(config, table.num_rows, y, _seed(config, stream))
    except ValueError as e:
        raise ValueError(f"{table.name}: {e}") from None
    width = max(len(str(config.num_clients - 1)), 5)
    return [(f"client_{i:0{width}d}", part) for i, part in enumerate(parts)]


def _label_vocab(config: ml_collections.ConfigDict, tables: dict[str, _Table],
                 ids: dict[str, np.ndarray | None]) -> list[str] | None:
    """Sorted distinct string labels over all splits; None for numeric labels."""
    if not config.label_key:
        return None
    labels = {split: _raw_labels(config, table, ids[split]) for split, table in tables.items()}
    if not any(values.dtype.kind == "U" for values in labels.values()):
        return None
    # strings (in any split): every label is a string, numbers in another split included
    return sorted({str(v) for values in labels.values() for v in values.tolist()})


def _prepare(config: ml_collections.ConfigDict) -> Iterator[tuple[str, _Table, list[tuple[str, np.ndarray]],
                                                                  dict[str, np.ndarray]]]:
    """(split, table, clients, {x, y}) per split, all converted before anything is yielded."""
    if not 0.0 <= config.test_fraction < 1.0:
        raise ValueError(f"config.test_fraction must be in [0, 1), got {config.test_fraction}")
    tables = {split: _read(config, source) for split, source in _splits(config).items()}
    all_ids = {split: _client_ids(table, config.client_key) if config.client_key else None
               for split, table in tables.items()}
    vocab = _label_vocab(config, tables, all_ids)
    out = []
    for stream, (split, table) in enumerate(tables.items()):
        ids = all_ids[split]
        features = {"x": _x(config, table, ids)}
        if config.label_key:
            features["y"] = _y(config, table, ids, vocab)
        groups = _groups(config, table, ids, features.get("y"), stream)
        out.append((split, table, groups, features))
    return iter(out)


def schema(config: ml_collections.ConfigDict) -> Schema:
    """x and y with the dtypes and per-example shapes the data converts to."""
    for _, _, _, features in _prepare(config):
        return {k: FeatureSpec(v.dtype.name, v.shape[1:]) for k, v in features.items()}
    raise ValueError("no data")


def assets(config: ml_collections.ConfigDict) -> dict[str, bytes]:
    """`labels.json` (the label strings, id = position) when the labels are strings."""
    if not config.label_key:
        return {}
    tables = {split: _read(config, source) for split, source in _splits(config).items()}
    vocab = _label_vocab(config, tables, {split: None for split in tables})
    return {} if vocab is None else {"labels.json": json.dumps(vocab, ensure_ascii=False).encode()}


def _hash_path(digest: Any, path: pathlib.Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
        try:
            file_sha256(file, digest)
        except OSError as e:
            raise ValueError(f"{file}: cannot read ({e.strerror or e})") from None


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 of the input files (a save_to_disk directory: all its files; a Hub dataset: its name only)."""
    digest = hashlib.sha256()
    if _format(config) == "hf":
        digest.update(f"hf\0{config.hf_dataset}\0{config.hf_config}\0".encode())
        local = pathlib.Path(config.hf_dataset)
        if local.exists():
            _hash_path(digest, local)
        for item in _names(config.hf_data_files):
            path = pathlib.Path(item.split("=", 1)[-1])
            if path.exists():
                _hash_path(digest, path)
    else:
        for split, source in _splits(config).items():
            digest.update(f"{split}\0".encode())
            path = pathlib.Path(source)
            if not path.is_file():
                raise ValueError(f"{path}: no such file")
            _hash_path(digest, path)
    return f"sha256:{digest.hexdigest()}"


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields each client's rows per split ('train', and 'test' from a test file or test_fraction)."""
    rng = np.random.default_rng([config.seed, 1])
    for split, _, groups, features in _prepare(config):
        for client_id, rows in groups:
            if config.test_fraction > 0:
                shuffled = rng.permutation(rows)
                num_test = math.ceil(config.test_fraction * len(rows))
                train, test = shuffled[: len(rows) - num_test], shuffled[len(rows) - num_test:]
                yield "train", client_id, {k: v[train] for k, v in features.items()}
                yield "test", client_id, {k: v[test] for k, v in features.items()}
            else:
                yield split, client_id, {k: v[rows] for k, v in features.items()}
