"""`fedstream preprocess --runner ...`: recipes `tabular` (client column), `arrays` and `grouped` on Apache Beam.

The single-process route (`fedstream.data.preprocessing.run_preprocess`) runs a recipe's
`generate` in one process. This route runs the same conversion as a Beam pipeline, one plan per
recipe (`_ROUTES`):

- `tabular` with `client_key`: the input is cut into byte ranges (CSV) or row groups (Parquet)
  that workers read in parallel; rows are keyed by `(split, client id)` and grouped with
  `GroupByKey`; each client's rows are put back in file order (every row carries its file and
  byte offset / row number) and converted with the recipe's own functions (`tabular._x`, `_y`).
  A Hugging Face dataset (format `hf`) is loaded on the driver with the recipe's own `_hf_split`
  (a save_to_disk directory, or `datasets.load_dataset`); the columns the recipe reads are
  written to one Parquet file per split in a hidden sibling of the output (deleted when the run
  ends, also on failure), which the Parquet path then reads. Image columns are refused (the
  single-process route decodes them with `datasets`).
- `arrays`: the client assignment (a client-id array or a partitioner of
  fedstream/data/partition.py, and the per-client test split) needs every label at once, so the
  driver computes it once with the recipe's own `assignment` from the ids or labels alone; tasks
  of clients' example indices go to workers, which read those rows (memory-mapped from an
  uncompressed .npz) and encode them.
- `grouped`: byte ranges (JSON Lines, CSV) or row groups (Parquet); every record is parsed on
  the worker that reads it, keyed by its group, and grouped; a line-format record travels through
  the shuffle as (file, offset, length) only, and the group's converter reads its kept lines
  again, so the shuffle is tens of bytes per record.

Workers encode clients with the dataset format's record encoding and write ArrayRecord part
files into the output's temporary directory, one file per bundle and split (a new one every
`records_per_shard` records). A manifest (JSON lines: part file, split, clients and counts) is
the pipeline's only other output. The driver then renames the parts listed in the manifest to
`<split>/shard-NNNNN.array_record`, deletes parts that no manifest line names (retried bundles),
and lets `DatasetWriter.close()` write `index.npz`, `metadata.json`, `_SUCCESS` and rename the
directory into place. The content digest (`FederatedDataset.content_digest`) equals the
single-process route's on the same input and config.

Needs `apache-beam` (`pip install fedstream[beam]`); it is imported only when this route runs.
DataflowRunner and object-store paths (gs://, s3://) are refused: inputs and output must be on a
filesystem every worker mounts (local for the DirectRunner, a shared mount for Flink/Spark); see
docs/beam.md.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from fedstream import __version__
from fedstream.config import ConfigError, apply_overrides, load_module, to_json
from fedstream.data.format import FeatureSpec, Schema, encode_examples
from fedstream.data.preprocessing import RECIPES_PACKAGE, recipe_name, up_to_date
from fedstream.data.writer import DEFAULT_COMPRESSION, DatasetWriter, _check_array

RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "PortableRunner", "PrismRunner")
RANGE_BYTES = 64 << 20  # bytes of CSV per read task
PARTS_DIR = "_beam_parts"
MANIFEST = "_manifest"
_TABULAR = "fedstream.recipes.tabular"
_ARRAYS = "fedstream.recipes.arrays"
_GROUPED = "fedstream.recipes.grouped"


def _beam() -> Any:
    """The `apache_beam` module, or a ConfigError that says how to install it."""
    try:
        import apache_beam
    except ImportError:
        raise ConfigError("--runner needs Apache Beam: pip install 'fedstream[beam]'") from None
    return apache_beam


def pipeline_args(runner: str, beam_options: Sequence[str]) -> list[str]:
    """Beam's command-line options: `--runner=RUNNER` and each `KEY=VALUE` of `beam_options` as `--KEY=VALUE`."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    args = [f"--runner={runner}"]
    for option in beam_options:
        option = option.strip()
        if not option.lstrip("-"):
            raise ConfigError(f"--beam-option {option!r}: expected KEY=VALUE (e.g. direct_num_workers=4)")
        args.append(option if option.startswith("--") else f"--{option}")
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=WARNING")  # workers log each start and stop at INFO
    return args


# ---------------------------------------------------------------------------------------------- planning


def _check_config(config: ml_collections.ConfigDict, tabular: Any) -> dict[str, str]:
    """The splits' input files; raises ConfigError for what this route does not support."""
    fmt = tabular._format(config)
    if fmt not in ("csv", "parquet", "hf"):
        raise ConfigError(f"the Beam route reads csv, parquet and hf, not format {fmt!r}")
    if not config.client_key:
        raise ConfigError("the Beam route groups rows by a client column: set --config.client_key (the partitioners "
                          "need every label at once; use the single-process route for them)")
    if config.test_fraction > 0:
        raise ConfigError("the Beam route does not support config.test_fraction (its random split depends on the "
                          "order clients are visited); give a test file with --config.test")
    if not config.input_dtype:
        raise ConfigError("the Beam route needs a fixed --config.input_dtype (one client's rows cannot tell the "
                          "dtype that the whole column would infer)")
    splits = tabular._splits(config)
    for source in splits.values() if fmt != "hf" else ():
        if not pathlib.Path(source).is_file():
            raise ConfigError(f"{source}: no such file")
    return splits


def _csv_header(path: pathlib.Path, delimiter: str) -> tuple[list[str], int]:
    """The header's fields and the byte offset of the first row."""
    with open(path, "rb") as f:
        line = f.readline()
    text = line.decode("utf-8-sig")
    header = next(csv.reader([text], delimiter=delimiter, strict=True), None)
    if not header:
        raise ValueError(f"{path}: empty file (a CSV needs a header row)")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: a column appears twice in the header")
    return header, len(line)


def _tasks(splits: dict[str, str], fmt: str, delimiter: str, range_bytes: int,
           names: dict[str, str]) -> list[dict[str, Any]]:
    """One read task per byte range (csv) or row group (parquet) of every input file; `names` are the
    splits' names in messages."""
    tasks: list[dict[str, Any]] = []
    for file_index, (split, source) in enumerate(splits.items()):
        path = pathlib.Path(source).absolute()
        if fmt == "csv":
            header, first = _csv_header(path, delimiter)
            size = path.stat().st_size
            for start in range(first, max(size, first + 1), range_bytes):
                tasks.append({"split": split, "file": file_index, "path": str(path), "start": start,
                              "end": min(start + range_bytes, size), "header": header})
        else:
            import pyarrow.parquet as pq

            offset = 0
            metadata = pq.ParquetFile(path).metadata
            for group in range(metadata.num_row_groups):
                tasks.append({"split": split, "file": file_index, "path": str(path), "row_group": group,
                              "first_row": offset, "name": names[split]})
                offset += metadata.row_group(group).num_rows
    return tasks


def _head_table(tabular: Any, config: ml_collections.ConfigDict, source: str, name: str, rows: int = 1000) -> Any:
    """The first rows of `source` as the recipe's `_Table` (to derive the schema on the driver)."""
    path = pathlib.Path(source)
    if tabular._format(config) == "csv":
        header, first = _csv_header(path, config.csv_delimiter)
        lines = []
        with open(path, "rb") as f:
            f.seek(first)
            while len(lines) < rows:
                line = f.readline()
                if not line:
                    break
                if line.strip(b"\r\n"):
                    lines.append(_csv_fields(line, header, config.csv_delimiter, str(path), first))
        return _csv_table(str(path), header, lines)
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    table = parquet.read_row_group(0) if parquet.metadata.num_row_groups else parquet.schema_arrow.empty_table()
    return tabular._arrow_table(name, table.slice(0, rows))


def _schema(tabular: Any, config: ml_collections.ConfigDict, splits: dict[str, str], names: dict[str, str]
            ) -> Schema:
    """x and y as `tabular.schema` derives them, from the head of the train file."""
    table = _head_table(tabular, config, splits["train"], names["train"])
    ids = tabular._client_ids(table, config.client_key)
    features = {"x": tabular._x(config, table, ids)}
    if config.label_key:
        if tabular._raw_labels(config, table, ids).dtype.kind == "U":
            raise ConfigError("the Beam route supports numeric labels only (string labels need one vocabulary over "
                              "all rows; use the single-process route)")
        features["y"] = tabular._y(config, table, ids, None)
    return {k: FeatureSpec(v.dtype.name, v.shape[1:]) for k, v in features.items()}


# ---------------------------------------------------------------------------------------------- workers


def _csv_fields(line: bytes, header: list[str], delimiter: str, name: str, offset: int) -> list[str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} byte {offset}: not UTF-8 ({e.reason})") from None
    try:
        row = next(csv.reader([text], delimiter=delimiter, strict=True))
    except csv.Error as e:
        raise ValueError(f"{name} byte {offset}: not valid CSV ({e}); a quoted field with a line break is not "
                         "supported on the Beam route") from None
    if len(row) != len(header):
        raise ValueError(f"{name} byte {offset}: {len(row)} fields but the header has {len(header)} (truncated "
                         "file, wrong delimiter, or a quoted line break?)")
    return row


def _csv_table(name: str, header: list[str], rows: list[list[str]]) -> Any:
    tabular = importlib.import_module(_TABULAR)
    table = np.array(rows, dtype=str).reshape(len(rows), len(header))
    return tabular._Table(name, {key: table[:, j] for j, key in enumerate(header)}, len(rows))


def read_task(task: dict[str, Any], client_key: str, delimiter: str) -> Iterator[tuple[tuple[str, str], tuple]]:
    """Rows of one read task as `((split, client id), (file, position, row))`; position orders rows in a file."""
    split, name = task["split"], task["path"]
    if "row_group" in task:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(name).read_row_group(task["row_group"])
        tabular = importlib.import_module(_TABULAR)
        ids = tabular._client_ids(tabular._arrow_table(task["name"], table), client_key)
        for i, row in enumerate(table.to_pylist()):
            yield (split, str(ids[i])), (task["file"], task["first_row"] + i, row)
        return
    header, start, end = task["header"], task["start"], task["end"]
    key = header.index(client_key) if client_key in header else None
    if key is None:
        raise ValueError(f"{name}: no column {client_key!r} (columns: {', '.join(header)})")
    with open(name, "rb") as f:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            f.readline()  # the line that starts before `start` belongs to the previous task
        position = f.tell()
        while position < end:  # a line belongs to the task that holds its first byte
            line = f.readline()
            if not line:
                break
            if line.strip(b"\r\n"):
                row = _csv_fields(line, header, delimiter, name, position)
                if not row[key]:
                    raise ValueError(f"{name} byte {position}: empty client id")
                yield (split, row[key]), (task["file"], position, row)
            position += len(line)


def convert_client(element: tuple[tuple[str, str], Iterable[tuple]], config_dict: dict[str, Any],
                   headers: dict[int, Any], schema_json: dict[str, Any]) -> tuple[str, str, int, list[bytes]]:
    """One client's rows (any order) -> `(split, client id, n, encoded records)`, rows in file order."""
    from fedstream.data.format import schema_from_json

    (split, client_id), rows = element
    rows = sorted(rows, key=lambda r: (r[0], r[1]))
    tabular = importlib.import_module(_TABULAR)
    config = ml_collections.ConfigDict(config_dict)
    schema = schema_from_json(schema_json)
    header = headers[rows[0][0]]
    name = f"{header['name']} (client {client_id!r})"
    if header["kind"] == "csv":
        table = _csv_table(name, header["columns"], [r[2] for r in rows])
    else:
        import pyarrow as pa

        arrow_schema = pa.ipc.read_schema(pa.py_buffer(header["arrow_schema"]))
        table = tabular._arrow_table(name, pa.Table.from_pylist([r[2] for r in rows], schema=arrow_schema))
    ids = np.array([client_id] * len(rows), dtype=str)
    features = {"x": tabular._x(config, table, ids)}
    if config.label_key:
        if tabular._raw_labels(config, table, ids).dtype.kind == "U":
            raise ValueError(f"{name}: string labels are not supported on the Beam route")
        features["y"] = tabular._y(config, table, ids, None)
    columns = {k: _check_array(split, client_id, k, spec, features[k]) for k, spec in schema.items()}
    return split, client_id, len(rows), encode_examples(schema, columns, len(rows))


def _write_parts_fn(parts_dir: str, options: str, records_per_shard: int) -> Any:
    """A Beam DoFn writing clients into ArrayRecord part files, one open file per split and bundle."""
    beam = _beam()
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from apache_beam.utils.windowed_value import WindowedValue

    class WriteParts(beam.DoFn):  # type: ignore[misc, name-defined]
        def start_bundle(self) -> None:
            self.open: dict[str, dict[str, Any]] = {}
            self.done: list[dict[str, Any]] = []

        def _close(self, split: str) -> None:
            part = self.open.pop(split)
            part["writer"].close()
            self.done.append({"split": split, "file": part["file"], "clients": part["clients"]})

        def process(self, element: tuple[str, str, int, list[bytes]]) -> Iterator[Any]:
            from array_record.python.array_record_module import ArrayRecordWriter

            split, client_id, n, records = element
            part = self.open.get(split)
            if part is not None and part["records"] >= records_per_shard and n:
                self._close(split)
                part = None
            if part is None:
                file = os.path.join(parts_dir, f"{split}-{uuid.uuid4().hex}.array_record")
                part = self.open[split] = {"writer": ArrayRecordWriter(file, options), "file": file,
                                           "clients": [], "records": 0}
            for record in records:
                part["writer"].write(record)
            part["clients"].append([client_id, n])
            part["records"] += n
            return iter(())

        def finish_bundle(self) -> Iterator[Any]:
            for split in list(self.open):
                self._close(split)
            for part in self.done:
                yield WindowedValue(json.dumps(part), MIN_TIMESTAMP, [GlobalWindow()])

    return WriteParts()


# ---------------------------------------------------------------------------------------------- plans


@dataclasses.dataclass
class _Plan:
    """What the driver needs to run one recipe on Beam."""

    schema: Schema
    tasks: list[Any]  # the pipeline's input, one element per read task
    stages: Callable[[Any], Any]  # tasks PCollection -> PCollection of (split, client id, n, encoded records)
    what: str  # for the progress line, e.g. "12 read tasks"
    cleanup: Callable[[], None] = lambda: None  # deletes the plan's temporary files (run after the pipeline)


def _hf_to_parquet(module: Any, config: ml_collections.ConfigDict, splits: dict[str, str], directory: pathlib.Path,
                   range_bytes: int) -> dict[str, str]:
    """Writes the columns that the recipe reads of each HF split (`tabular._hf_split`, rows in the
    dataset's order) to `directory/<split>.parquet`, row groups of about `range_bytes` of Arrow data
    (one read task each); returns {split: Parquet file}. Image columns are refused: the
    single-process route decodes them with `datasets`, which the Parquet route does not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = module._datasets()
    out = {}
    for split, hf_split in splits.items():
        ds = module._hf_split(config, hf_split)
        name = module._hf_name(config, hf_split)
        columns = dict.fromkeys(ds.column_names)
        used = module._inputs(config, module._Table(name, columns, len(ds)))
        used += [k for k in (config.label_key, config.client_key) if k]
        for key in used:
            if key not in columns:
                raise ValueError(f"{name}: no column {key!r} (columns: {', '.join(columns) or 'none'})")
            if isinstance(ds.features[key], datasets.Image):
                raise ConfigError(f"{name}: column {key!r} holds images; the Beam route does not decode images "
                                  "(use the single-process route)")
        ds = ds.select_columns([k for k in columns if k in used]).with_format("arrow")
        rows = max(1, int(range_bytes * len(ds) // max(ds.data.nbytes, 1))) if len(ds) else 1
        path = directory / f"{split}.parquet"
        first = ds[0:rows]
        try:
            with pq.ParquetWriter(path, first.schema) as writer:
                writer.write_table(first, row_group_size=rows)
                for start in range(rows, len(ds), rows):
                    writer.write_table(ds[start:start + rows], row_group_size=rows)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{name}: cannot write it as Parquet ({module._one_line(e)})") from None
        out[split] = str(path)
    return out


def _tabular_plan(module: Any, config: ml_collections.ConfigDict, range_bytes: int, scratch: pathlib.Path) -> _Plan:
    """Read tasks over the CSV byte ranges / Parquet row groups, grouped by the client column. An HF
    dataset's splits are first written to Parquet files under `scratch` (the plan's cleanup deletes
    them) and read as Parquet."""
    splits = _check_config(config, module)
    fmt = module._format(config)
    names = dict(splits)
    cleanup: Callable[[], None] = lambda: None
    if fmt == "hf":
        names = {split: module._hf_name(config, hf_split) for split, hf_split in splits.items()}
        scratch.mkdir()
        cleanup = functools.partial(shutil.rmtree, scratch, ignore_errors=True)
        try:
            splits, fmt = _hf_to_parquet(module, config, splits, scratch, range_bytes), "parquet"
        except BaseException:
            cleanup()
            raise
    try:
        return _tabular_stages(module, config, range_bytes, splits, fmt, names, cleanup)
    except BaseException:
        cleanup()
        raise


def _tabular_stages(module: Any, config: ml_collections.ConfigDict, range_bytes: int, splits: dict[str, str],
                    fmt: str, names: dict[str, str], cleanup: Callable[[], None]) -> _Plan:
    beam = _beam()
    schema = _schema(module, config, splits, names)
    tasks = _tasks(splits, fmt, config.csv_delimiter, int(range_bytes), names)
    headers: dict[int, Any] = {}
    for file_index, (split, source) in enumerate(splits.items()):
        if fmt == "csv":
            headers[file_index] = {"kind": "csv", "name": names[split],
                                   "columns": _csv_header(pathlib.Path(source), config.csv_delimiter)[0]}
        else:
            import pyarrow.parquet as pq

            arrow_schema = pq.ParquetFile(source).schema_arrow
            headers[file_index] = {"kind": "parquet", "name": names[split],
                                   "arrow_schema": arrow_schema.serialize().to_pybytes()}
    from fedstream.data.format import schema_to_json

    client_key, delimiter = config.client_key, config.csv_delimiter
    config_dict, schema_json = config.to_dict(), schema_to_json(schema)

    def stages(tasks_pc: Any) -> Any:
        return (tasks_pc
                | "Reshuffle" >> beam.Reshuffle()
                | "Read" >> beam.FlatMap(read_task, client_key, delimiter)
                | "GroupByClient" >> beam.GroupByKey()
                | "Convert" >> beam.Map(convert_client, config_dict, headers, schema_json))

    return _Plan(schema, tasks, stages, f"{len(tasks)} read tasks", cleanup)


# ---------------------------------------------------------------------------------------------- arrays

ARRAYS_TASK_EXAMPLES = 1 << 16  # example indices per `arrays` conversion task


def _arrays_plan(module: Any, config: ml_collections.ConfigDict, task_examples: int) -> _Plan:
    """The client assignment, computed once on the driver by the recipe's own `assignment` (the
    partitioners of fedstream.data.partition, the test split's RNG stream), cut into tasks of about
    `task_examples` indices; workers read their clients' rows from the .npz and encode them."""
    beam = _beam()
    from fedstream.data.format import schema_to_json

    try:
        schema = module.schema(config)
        n = module.num_examples(config)
        keys = module.assignment_keys(config)
        with np.load(config.path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in keys}
        tasks: list[list[tuple[str, str, np.ndarray]]] = [[]]
        size = 0
        for split, client_id, idx in module.assignment(config, arrays, n):
            if size >= task_examples and tasks[-1]:
                tasks.append([])
                size = 0
            tasks[-1].append((split, client_id, np.asarray(idx, np.int64)))
            size += len(idx) + 1
    except ValueError as e:
        raise ConfigError(str(e)) from None
    del arrays
    config_dict, schema_json = config.to_dict(), schema_to_json(schema)

    def stages(tasks_pc: Any) -> Any:
        return (tasks_pc
                | "Reshuffle" >> beam.Reshuffle()
                | "Convert" >> beam.FlatMap(convert_arrays_task, config_dict, schema_json))

    return _Plan(schema, [t for t in tasks if t], stages, f"{sum(len(t) for t in tasks):,} clients in "
                 f"{len([t for t in tasks if t])} tasks")


_NPZ_CACHE: dict[tuple[str, str, int, int], np.ndarray] = {}


def npz_array(path: str, key: str) -> np.ndarray:
    """Array `key` of the .npz at `path`: memory-mapped when the member is stored uncompressed
    (`np.savez`), else decompressed once per worker process (`np.savez_compressed`)."""
    import struct
    import zipfile

    stat = os.stat(path)
    cache_key = (path, key, stat.st_size, stat.st_mtime_ns)
    if cache_key in _NPZ_CACHE:
        return _NPZ_CACHE[cache_key]
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{key}.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)  # the member's local file header: its name and extra field follow
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            if dtype.hasobject:
                raise ValueError(f"{path}: array {key!r} is an object array")
            array = np.memmap(path, dtype, "r", offset=offset, shape=shape, order="F" if fortran else "C")
        else:
            with z.open(info) as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
    for old in [k for k in _NPZ_CACHE if k[0] != path or k[2:] != cache_key[2:]]:
        del _NPZ_CACHE[old]  # one file's arrays at a time (all its features stay cached)
    _NPZ_CACHE[cache_key] = array
    return array


def convert_arrays_task(task: list[tuple[str, str, np.ndarray]], config_dict: dict[str, Any],
                        schema_json: dict[str, Any]) -> Iterator[tuple[str, str, int, list[bytes]]]:
    """One task's clients -> `(split, client id, n, encoded records)`, rows in the assignment's order."""
    from fedstream.data.format import schema_from_json

    arrays = importlib.import_module(_ARRAYS)
    config = ml_collections.ConfigDict(config_dict)
    schema = schema_from_json(schema_json)
    cache: dict[str, np.ndarray] = {}
    for split, client_id, idx in task:
        columns = {}
        for key, spec in schema.items():
            if key not in cache:
                cache[key] = npz_array(config.path, key)
            values = arrays.stored(config, key, np.asarray(cache[key][idx]))
            columns[key] = _check_array(split, client_id, key, spec, values)
        yield split, client_id, len(idx), encode_examples(schema, columns, len(idx))


# ---------------------------------------------------------------------------------------------- grouped


def _grouped_plan(module: Any, config: ml_collections.ConfigDict, range_bytes: int) -> _Plan:
    """Read tasks over the JSON Lines / CSV byte ranges or Parquet row groups, records keyed by group,
    grouped with GroupByKey, each group put back in input order and converted by the recipe's own
    `select` and `client_examples`."""
    beam = _beam()
    from fedstream.data.format import schema_to_json

    try:
        schema = module.schema(config)
        files, fmt = module.input_files(config)
        tasks: list[dict[str, Any]] = []
        files_info: dict[int, Any] = {}
        for file_index, source in enumerate(files):
            path = str(pathlib.Path(source).absolute())
            if fmt == "parquet":
                import pyarrow.parquet as pq

                metadata = pq.ParquetFile(path).metadata
                first = 0
                for group in range(metadata.num_row_groups):
                    tasks.append({"file": file_index, "path": path, "row_group": group, "first_row": first})
                    first += metadata.row_group(group).num_rows
                continue
            header, start = module.csv_header(path, config.csv_delimiter) if fmt == "csv" else (None, 0)
            if header is not None and config.group_key not in header:
                raise ValueError(f"{source}: no column {config.group_key!r} (columns: {', '.join(header)})")
            files_info[file_index] = (path, fmt, header)
            size = os.path.getsize(path)
            for begin in range(start, size, range_bytes):
                tasks.append({"file": file_index, "path": path, "fmt": fmt, "header": header, "start": begin,
                              "end": min(begin + range_bytes, size),
                              "first_line": (1 if header is None else 2) if begin == start else None})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    config_dict, schema_json = config.to_dict(), schema_to_json(schema)

    def stages(tasks_pc: Any) -> Any:
        return (tasks_pc
                | "Reshuffle" >> beam.Reshuffle()
                | "Read" >> beam.FlatMap(read_grouped_task, config_dict)
                | "GroupByKey" >> beam.GroupByKey()
                | "Convert" >> beam.FlatMap(convert_group, config_dict, files_info, schema_json))

    return _Plan(schema, tasks, stages, f"{len(tasks)} read tasks")


def read_grouped_task(task: dict[str, Any], config_dict: dict[str, Any]) -> Iterator[tuple[str, tuple]]:
    """Records of one read task as `(group key, (file, position, payload))`; position orders records in a
    file. Every record is parsed (a bad one fails here, naming the file and line or byte), but a JSON
    Lines / CSV record's payload is only its line's length: the group's converter reads the line
    again, so the shuffle carries tens of bytes per record instead of its text. A Parquet record's
    payload is its value (a row cannot be re-read cheaply)."""
    grouped = importlib.import_module(_GROUPED)
    config = ml_collections.ConfigDict(config_dict)
    if "row_group" in task:
        for position, group, value in grouped.parquet_records(config, task["path"], task["row_group"],
                                                              task["first_row"]):
            yield group, (task["file"], position, value)
        return
    for position, length, group, _ in grouped.line_records(config, task["fmt"], task["path"], task["header"],
                                                           task["start"], task["end"], task["first_line"]):
        yield group, (task["file"], position, length)


def convert_group(element: tuple[str, Iterable[tuple]], config_dict: dict[str, Any], files: dict[int, Any],
                  schema_json: dict[str, Any]) -> Iterator[tuple[str, str, int, list[bytes]]]:
    """One group's records (any order) -> `(split, client id, n, encoded records)`, or nothing if dropped.
    Records are put back in input order and selected (min/max examples) first, then the kept JSON Lines /
    CSV lines are read again from `files` (file index -> path, format, CSV header)."""
    from fedstream.data.format import schema_from_json

    grouped = importlib.import_module(_GROUPED)
    group, rows = element
    config = ml_collections.ConfigDict(config_dict)
    kept = grouped.select(config, sorted(rows, key=lambda r: (r[0], r[1])))
    if kept is None:
        return
    values, handles = [], {}
    with contextlib.ExitStack() as stack:
        for file, position, payload in kept:
            if not isinstance(payload, int):
                values.append(payload)
                continue
            path, fmt, header = files[file]
            if file not in handles:
                handles[file] = stack.enter_context(open(path, "rb"))
            handles[file].seek(position)
            line = handles[file].read(payload)
            values.append(grouped.parse_line(config, fmt, header, line, f"{path} byte {position}")[1])
    schema = schema_from_json(schema_json)
    features = grouped.client_examples(config, group, values)
    columns = {k: _check_array("train", group, k, spec, features[k]) for k, spec in schema.items()}
    n = len(next(iter(columns.values())))
    yield "train", group, n, encode_examples(schema, columns, n)


# ---------------------------------------------------------------------------------------------- driver

_WORKER_ERROR = re.compile(r"^(?:ValueError|ConfigError|fedstream\.config\.ConfigError): (.+?)(?: \[while running '[^']*'\])*$",
                           re.MULTILINE)


_OBJECT_STORE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _worker_error(error: BaseException) -> str | None:
    """The one-line message of the ValueError a recipe function raised on a worker (it names the file,
    line or byte, client and key), from the runner's wrapped error; None for any other failure."""
    if isinstance(error, ValueError) and "Traceback" not in str(error):
        return _WORKER_ERROR.sub(r"\1", f"ValueError: {error}").strip() or None
    found = _WORKER_ERROR.findall(str(error))
    return found[-1] if found else None


def run_preprocess_beam(
    recipe: str,
    output: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    runner: str = "DirectRunner",
    beam_options: Sequence[str] = (),
    force: bool = False,
    compression: str = DEFAULT_COMPRESSION,
    records_per_shard: int = 4096,
    range_bytes: int = RANGE_BYTES,
    task_examples: int = ARRAYS_TASK_EXAMPLES,
    progress: Callable[[str], None] | None = print,
) -> pathlib.Path:
    """Writes the dataset of `recipe` (`tabular` with a client column, `arrays`, `grouped`) into `output` with Beam.

    `runner` and `beam_options` (`KEY=VALUE`, Beam's pipeline options without `--`) choose where
    the pipeline runs. Otherwise as `run_preprocess`: same metadata, same no-op rerun, `force`
    to replace. `range_bytes` is the size of a CSV / JSON Lines read task (and the Arrow bytes of
    an HF split's Parquet row group), `task_examples` the examples per `arrays` task. Returns the
    output path.
    """
    _beam()
    say = progress or (lambda _: None)
    args = pipeline_args(runner, beam_options)
    if runner == "DataflowRunner":
        raise ConfigError("DataflowRunner is not supported yet: this route reads and writes with local paths, and "
                          "Dataflow workers share no filesystem with the driver (object-store output, e.g. gs://, "
                          "is not implemented; see docs/beam.md)")
    for where, value in [("--output", str(output))] + [(f"--config.{o.partition('=')[0]}", o.partition("=")[2])
                                                          for o in overrides]:
        if _OBJECT_STORE.match(value.strip()):
            raise ConfigError(f"{where}={value}: object-store paths are not supported by the Beam route (it opens "
                              "local paths and finishes with a directory rename, which an object store does not "
                              "have; see docs/beam.md); use a filesystem every worker mounts")
    if logging.getLogger("apache_beam").level == logging.NOTSET:  # Beam logs every worker's start at INFO
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
    for logger in ("apache_beam.runners.portability.local_job_service", "apache_beam.runners.common"):
        if logging.getLogger(logger).level == logging.NOTSET:  # a failed DoFn's traceback, summed up below
            logging.getLogger(logger).setLevel(logging.CRITICAL)
    module = load_module(recipe, RECIPES_PACKAGE)
    name = recipe_name(recipe)
    module_name = getattr(module, "__name__", "")
    if module_name not in _ROUTES:
        raise ConfigError(f"the Beam route (--runner) supports the recipes {', '.join(sorted(ROUTE_RECIPES))}, "
                          f"not {name!r}; run it without --runner")
    config = apply_overrides(module.get_config(), overrides)
    config_json = json.loads(to_json(config))
    try:
        fingerprint = str(module.fingerprint(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    output = pathlib.Path(output).absolute()
    if up_to_date(output, name, config_json, fingerprint, compression, force, say):
        return output
    size = task_examples if module_name == _ARRAYS else range_bytes
    if module_name == _TABULAR:  # an HF dataset's splits go to Parquet files here, next to the output
        scratch = output.with_name(f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-hf")
        plan = _tabular_plan(module, config, int(size), scratch)
    else:
        plan = _ROUTES[module_name](module, config, int(size))
    try:
        return _run_plan(plan, module, config, output, name, runner, args, compression, records_per_shard,
                         config_json, fingerprint, say)
    finally:
        plan.cleanup()


def _run_plan(plan: _Plan, module: Any, config: ml_collections.ConfigDict, output: pathlib.Path, name: str,
              runner: str, args: list[str], compression: str, records_per_shard: int, config_json: dict[str, Any],
              fingerprint: str, say: Callable[[str], None]) -> pathlib.Path:
    """Runs `plan`'s pipeline into the output's temporary directory and finishes the dataset."""
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    metadata = {"recipe": name, "config": config_json, "source": module.SOURCE, "seed": config_json.get("seed"),
                "fedstream_version": __version__, "input_fingerprint": fingerprint}
    say(f"preprocessing {name} into {output} on {runner} ({plan.what})")
    start = time.perf_counter()
    with DatasetWriter(output, plan.schema, metadata=metadata, compression=compression) as writer:
        parts_dir = writer.tmp_dir / PARTS_DIR
        parts_dir.mkdir()
        try:
            with beam.Pipeline(options=PipelineOptions(args)) as pipeline:
                _ = (plan.stages(pipeline | "Tasks" >> beam.Create(plan.tasks))
                     | "WriteParts" >> beam.ParDo(_write_parts_fn(str(parts_dir), writer.options, records_per_shard))
                     | "Manifest" >> beam.io.WriteToText(str(writer.tmp_dir / MANIFEST / "part"),
                                                         file_name_suffix=".jsonl"))
        except Exception as e:  # a worker's error arrives wrapped in the runner's, with its traceback as text
            message = _worker_error(e)
            if message is None:
                raise
            raise ValueError(message) from None
        parts = []
        for manifest in sorted((writer.tmp_dir / MANIFEST).glob("part*.jsonl")):
            parts.extend(json.loads(line) for line in manifest.read_text().splitlines() if line)
        # Deterministic shard numbering: by split, then by the part's first client id.
        parts.sort(key=lambda p: (p["split"], p["clients"][0][0] if p["clients"] else "", p["file"]))
        counts: dict[str, list[int]] = {}
        for part in parts:
            writer.add_shard(part["split"], part["file"], [(c, int(n)) for c, n in part["clients"]])
            tally = counts.setdefault(part["split"], [0, 0])
            tally[0] += len(part["clients"])
            tally[1] += sum(int(n) for _, n in part["clients"])
        shutil.rmtree(parts_dir)  # parts of retried bundles that no manifest line names
        shutil.rmtree(writer.tmp_dir / MANIFEST)
        if callable(getattr(module, "assets", None)):
            for asset_name, data in module.assets(config).items():
                writer.add_asset(asset_name, data)
    summary = "; ".join(f"{split}: {c:,} clients / {n:,} examples" for split, (c, n) in sorted(counts.items()))
    say(f"wrote {summary or 'no clients'} to {output} in {time.perf_counter() - start:.1f} s")
    return output


_ROUTES: dict[str, Callable[..., _Plan]] = {_TABULAR: _tabular_plan, _ARRAYS: _arrays_plan, _GROUPED: _grouped_plan}
ROUTE_RECIPES = tuple(k.rsplit(".", 1)[1] for k in _ROUTES)
