"""Recipe `fedjax-sqlite`: FedJAX's SQLite client files, one file per split.

FedJAX (`fedjax.core.sqlite_federated_data`) stores a federated dataset as one
SQLite table per file,

    CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY,
                                 data BLOB NOT NULL, num_examples INTEGER NOT NULL);

one row per client, where `data` is `zlib.compress(msgpack(examples))` and
`examples` is a dict {feature name: ndarray} with a shared leading example
axis. The ndarrays use FedJAX's msgpack extension types
(`fedjax/core/serialization.py`, forked from Flax): code 1 = ndarray, packed
as a nested msgpack array `(shape, dtype name, C-order bytes)`; 2 = complex;
3 = NumPy scalar (as code 1); 4 = object ndarray of bytes, `(shape, flat list
of bytes)`. This recipe decodes exactly that with `msgpack` and
`np.frombuffer`: no pickle, no FedJAX, no TensorFlow.

Splits: `train` and `test` (paths), plus any others in `files`
("held_out=PATH,..."); clients are read in rowid order (FedJAX's iteration
order), ids decoded as UTF-8 (`strip_id_prefix` drops the "<16 hex>:" prefix
of FedJAX's hosted files). Features: every array in the rows, or those in
`features`; `input_key` / `label_key` rename a source feature to `x` / `y`
(the names the train loop reads), `input_shape` reshapes `x` per example
(e.g. FedJAX EMNIST `pixels` (28, 28) -> 28,28,1), floats are stored as
`float_dtype`, `y` as `label_dtype` (values must fit). The schema is taken
from the first client of the first split; every client must match it.
Each row's `num_examples` is checked against its data.

FedJAX's own datasets, recognised by the first client's features when
`input_key`, `label_key`, `features` and `input_shape` are all unset:

- EMNIST (`pixels` [N, 28, 28] float32, `label` [N] int32): x = pixels as
  28,28,1, y = label;
- CIFAR-100 (`image` [N, 32, 32, 3] uint8, `label`, `coarse_label`): x =
  image, y = label, `coarse_label` kept;
- Shakespeare (`snippets`) and Stack Overflow (`tokens`, ...) hold bytes
  strings (ext type 4), which are text, not numbers: they are converted by
  `fedstream preprocess shakespeare --source FILE` / `stackoverflow --source
  FILE` (vocabulary, packing, TFF's ids and counts); here they are refused.

Anything else without features `x` and `y` is refused, naming the features
found and the keys to set (`require_xy=False` writes it anyway, for a
pipeline that sets `model.input_key` / `model.label_key`).

Values: by default as stored. FedJAX's files keep EMNIST's TFF polarity
(1.0 = background, 0.0 = ink), but FedJAX's `emnist.load_data` feeds models
`x = 1 - pixels` (ink = 1) and adds `domain_id` (`emnist.domain_id`: the
writer number NNNN of the id "<16 hex>:fNNNN_NN" or "fNNNN_NN", 2100-2599
high school = 0, else census = 1). `fedjax_convention=True` writes what
FedJAX's `load_data` gives models: EMNIST x = 1 - pixels (28, 28, 1)
float32, y = label, `domain_id` int32 (from the id as stored, before
`strip_id_prefix`; another id is an error); CIFAR-100 x = image (uint8), y =
label, no coarse_label. It needs one of those two datasets and leaves
input_key, label_key, features and input_shape to it.

    fedstream preprocess fedjax-sqlite --output data/emnist \\
        --config.train=federated_emnist_train.sqlite --config.test=federated_emnist_test.sqlite
    fedstream preprocess fedjax-sqlite --output data/emnist_fedjax --config.fedjax_convention=True \\
        --config.train=federated_emnist_train.sqlite --config.test=federated_emnist_test.sqlite
    fedstream preprocess fedjax-sqlite --output data/mine \\
        --config.train=train.sqlite --config.input_key=pixels --config.label_key=label --config.input_shape=28,28,1

The name is spelled `fedjax-sqlite` or `fedjax_sqlite` alike.
Every error names the file and, where there is one, the client, on one line.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import sqlite3
import sys
import urllib.parse
import zlib
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema, file_sha256

SOURCE = "user-provided FedJAX SQLite files (provenance and license are the user's)"
TABLE = "federated_data"
COLUMNS = ("client_id", "data", "num_examples")
# FedJAX serialization.py, _MsgpackExtType.
EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR, EXT_BYTES_NDARRAY = 1, 2, 3, 4
_ID_PREFIX = re.compile(r"^[0-9a-f]{16}:")
# A bytes-string feature of FedJAX's text datasets -> the recipe that converts those files.
_TEXT_RECIPES = {
    "snippets": "Shakespeare with its vocabulary and packing: fedstream preprocess shakespeare --source FILE",
    "tokens": "Stack Overflow with its vocabulary: fedstream preprocess stackoverflow --source FILE",
}
_SAFE_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def get_config() -> ml_collections.ConfigDict:
    """Knobs; at least one split file (`train`, `test` or `files`) is required."""
    c = ml_collections.ConfigDict()
    c.train = ""  # FedJAX .sqlite file of the train split
    c.test = ""  # FedJAX .sqlite file of the test split ('' = none)
    c.files = ""  # more (or all) splits: "held_out=PATH,..."
    c.features = ""  # comma-separated source features to keep ('' = all)
    c.input_key = ""  # source feature stored as `x` ('' = none renamed)
    c.label_key = ""  # source feature stored as `y` ('' = none renamed)
    c.input_shape = ()  # per-example shape of x, e.g. 28,28,1 (one dimension: 784,); () = as in the file
    c.float_dtype = "float32"  # floating features are stored as this ('' = keep)
    c.label_dtype = "int32"  # y is stored as this ('' = keep); integer values must fit
    c.strip_id_prefix = False  # drop FedJAX's "<16 hex digits>:" client-id prefix
    c.fedjax_convention = False  # True: what FedJAX's load_data feeds models (EMNIST: x = 1 - pixels, domain_id)
    c.require_xy = True  # False: write a file without features `x` / `y` (set model.input_key / label_key then)
    c.seed = 0  # no randomness; recorded in the metadata like every recipe's seed
    return c


class _BadRow(ValueError):
    """A row that does not decode; the caller adds file and client."""


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def split_files(config: ml_collections.ConfigDict) -> dict[str, pathlib.Path]:
    """{split: file} from `train`, `test` and `files`, in that order (a split named twice is an error)."""
    pairs = [("train", config.train), ("test", config.test)]
    for item in filter(None, (s.strip() for s in config.files.split(","))):
        if "=" not in item:
            raise ValueError(f"config.files: {item!r} is not of the form SPLIT=PATH")
        split, path = item.split("=", 1)
        pairs.append((split.strip(), path.strip()))
    out: dict[str, pathlib.Path] = {}
    for split, path in pairs:
        if not path:
            continue
        if not _SAFE_SPLIT.match(split):
            raise ValueError(f"invalid split name {split!r}: use letters, digits, '_', '-', '.'")
        if split in out:
            raise ValueError(f"split {split!r} is given twice (config.{split} and config.files)")
        out[split] = pathlib.Path(path)
    if not out:
        raise ValueError("recipe fedjax-sqlite needs --config.train=FILE.sqlite (and/or --config.test, --config.files)")
    return out


def _connect(path: pathlib.Path) -> sqlite3.Connection:
    """Opens `path` read-only (never creates it) and checks the FedJAX table."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")]
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: not a readable SQLite file ({_one_line(e)}); truncated or corrupt?") from None
    if not columns:
        conn.close()
        raise ValueError(f"{path}: no table {TABLE!r}; not a FedJAX SQLite file")
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        conn.close()
        raise ValueError(f"{path}: table {TABLE!r} lacks columns {missing}; not a FedJAX SQLite file")
    return conn


def _ndarray(data: bytes) -> np.ndarray:
    """FedJAX's ext type 1: msgpack (shape, dtype name, C-order bytes) -> read-only ndarray."""
    import msgpack

    try:
        shape, name, buffer = msgpack.unpackb(data, raw=True)
        shape = tuple(int(d) for d in shape)
        name = name.decode("ascii")
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, msgpack.UnpackException) as e:
        raise _BadRow(f"malformed ndarray ({_one_line(e)})") from None
    if any(d < 0 for d in shape) or not isinstance(buffer, bytes):
        raise _BadRow(f"malformed ndarray (shape {shape})")
    if name == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        try:
            dtype = np.dtype(name)
        except TypeError:
            raise _BadRow(f"unknown ndarray dtype {name!r}") from None
        if dtype.kind not in "biufc" or dtype.hasobject:
            raise _BadRow(f"unsupported ndarray dtype {name!r}")
    if len(buffer) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise _BadRow(f"ndarray of shape {shape} and dtype {name} has {len(buffer)} bytes; truncated or corrupt")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return array.astype(np.float32) if name == "bfloat16" else array


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code == EXT_NDARRAY:
        return _ndarray(data)
    if code == EXT_NPSCALAR:
        return _ndarray(data)[()]
    if code == EXT_BYTES_NDARRAY:
        try:
            shape, flat = msgpack.unpackb(data, raw=True)
            return np.array(flat, dtype=object).reshape(shape)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise _BadRow(f"malformed bytes ndarray ({_one_line(e)})") from None
    if code == EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    raise _BadRow(f"unknown msgpack extension type {code}")


def decode_examples(blob: bytes) -> dict[str, np.ndarray]:
    """One FedJAX `data` blob (zlib + msgpack) -> {feature: ndarray}, without pickle.

    Raises ValueError (without file or client) on anything that is not a dict of arrays.
    """
    import msgpack

    if not isinstance(blob, bytes):
        raise _BadRow(f"data is {type(blob).__name__}, not a BLOB")
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise _BadRow(f"data does not decompress ({_one_line(e)}); truncated or corrupt") from None
    try:
        tree = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False)
    except _BadRow:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # incl. ExtraData, incomplete input
        raise _BadRow(f"data is not FedJAX msgpack ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(tree, dict):
        raise _BadRow(f"data holds a {type(tree).__name__}, not a dict of feature arrays")
    out = {}
    for key, value in tree.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            raise _BadRow(f"feature {name!r} is a {type(value).__name__}, not an array with an example axis")
        out[name] = value
    return out


def _client_id(raw: Any, strip_prefix: bool) -> str:
    """A row's client id as text (UTF-8), without FedJAX's "<16 hex>:" prefix if `strip_prefix`."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadRow(f"client id is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    elif isinstance(raw, str):
        text = raw
    elif isinstance(raw, int):
        text = str(raw)
    else:
        raise _BadRow(f"client id is a {type(raw).__name__}, not bytes or text")
    if strip_prefix:
        text = _ID_PREFIX.sub("", text, count=1)
    if not text:
        raise _BadRow("client id is empty")
    return text


def _renames(config: ml_collections.ConfigDict) -> dict[str, str]:
    renames = {}
    for source, target in ((config.input_key, "x"), (config.label_key, "y")):
        if source:
            renames[source] = target
    if config.input_key and config.input_key == config.label_key:
        raise ValueError(f"config.input_key and config.label_key are both {config.input_key!r}")
    return renames


def _input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    shape = config.input_shape
    if not shape:
        return None
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"config.input_shape must be positive integers such as 28,28,1 (one dimension: 784,), "
                         f"got {shape!r}")
    return tuple(shape)


def _target_dtype(config: ml_collections.ConfigDict, name: str, dtype: np.dtype) -> np.dtype:
    if name == "y" and config.label_dtype:
        return np.dtype(config.label_dtype)
    if dtype.kind == "f" and config.float_dtype:
        return np.dtype(config.float_dtype)
    return dtype


def _convert(examples: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Selects, renames, reshapes and casts one client's features (raises _BadRow)."""
    renames = _renames(config)
    wanted = [k.strip() for k in config.features.split(",") if k.strip()]
    for key in list(wanted) + list(renames):
        if key not in examples:
            raise _BadRow(f"no feature {key!r} (features: {', '.join(sorted(examples)) or 'none'})")
    if wanted:
        examples = {k: examples[k] for k in dict.fromkeys(wanted + list(renames))}
    out: dict[str, np.ndarray] = {}
    for key, value in examples.items():
        name = renames.get(key, key)
        if name in out:
            raise _BadRow(f"feature {key!r} is renamed to {name!r}, which the file already has")
        if value.dtype.hasobject:
            hint = _TEXT_RECIPES.get(key, "")
            raise _BadRow(f"feature {key!r} holds bytes strings (FedJAX ext type 4), which cannot be stored as "
                          "numbers; choose numeric features with --config.features"
                          + (f", or convert FedJAX's {hint}" if hint else ""))
        if value.dtype.kind == "c":
            raise _BadRow(f"feature {key!r} is complex ({value.dtype}); not supported")
        out[name] = value
    lengths = {k: len(v) for k, v in examples.items()}  # source names, as the user knows them
    if len(set(lengths.values())) > 1:
        raise _BadRow(f"features have different example counts {lengths}")
    shape = _input_shape(config)
    if shape is not None:
        if "x" not in out:
            raise _BadRow("config.input_shape is set but there is no feature 'x' (set config.input_key)")
        x = out["x"]
        if int(np.prod(x.shape[1:], dtype=np.int64)) != int(np.prod(shape)):
            raise _BadRow(f"x examples of shape {x.shape[1:]} cannot be reshaped to {shape}")
        out["x"] = x.reshape(len(x), *shape)
    for name, value in out.items():
        target = _target_dtype(config, name, value.dtype)
        if target == value.dtype:
            continue
        if target.kind in "iu":
            if value.dtype.kind == "f" and value.size and not np.array_equal(value, np.round(value)):
                raise _BadRow(f"feature {name!r} has non-integer values; cannot store them as {target.name}")
            if value.size and value.dtype.kind in "iuf":
                info = np.iinfo(target)
                if value.min() < info.min or value.max() > info.max:
                    raise _BadRow(f"feature {name!r} values {value.min()}..{value.max()} do not fit {target.name}")
        elif target.kind != "f" and value.dtype != target:
            raise _BadRow(f"feature {name!r} of dtype {value.dtype} cannot be stored as {target.name}")
        out[name] = value.astype(target)
    return out


# FedJAX's numeric datasets, recognised by their features in the first client
# (fedjax/datasets/emnist.py, cifar100.py `load_split`): dataset -> (feature shapes, mapping).
KNOWN_DATASETS: dict[str, tuple[dict[str, tuple[int, ...]], dict[str, Any]]] = {
    "EMNIST": ({"pixels": (28, 28), "label": ()},
               {"input_key": "pixels", "label_key": "label", "input_shape": (28, 28, 1)}),
    "CIFAR-100": ({"image": (32, 32, 3), "label": (), "coarse_label": ()},
                  {"input_key": "image", "label_key": "label", "input_shape": ()}),
}


def recognise(examples: dict[str, np.ndarray]) -> str | None:
    """The FedJAX dataset whose raw features (names and per-example shapes) `examples` has, or None."""
    for name, (shapes, _) in KNOWN_DATASETS.items():
        if (set(examples) == set(shapes)
                and all(examples[k].shape[1:] == shape and examples[k].dtype.kind in "biuf"
                        for k, shape in shapes.items())):
            return name
    return None


def fedjax_domain_id(client_id: str) -> int:
    """`fedjax.datasets.emnist.domain_id` of a client id as stored: 0 (HIGH_SCHOOL) or 1 (CENSUS).

    FedJAX reads the writer number from "<16 hex>:fNNNN_NN" (25 characters,
    characters 18..21) or "fNNNN_NN" (8, characters 1..4); writers 2100-2599
    are domain 0. Any other id is an error, as in FedJAX.
    """
    try:
        if len(client_id) == 25:
            writer = int(client_id[18:22])
        elif len(client_id) == 8:
            writer = int(client_id[1:5])
        else:
            raise ValueError
    except ValueError:
        raise _BadRow("client id is neither '<16 hex>:fNNNN_NN' nor 'fNNNN_NN', so FedJAX's EMNIST domain_id "
                      "(fedjax_convention) is undefined for it") from None
    return 0 if 2100 <= writer <= 2599 else 1


def _first_examples(path: pathlib.Path) -> dict[str, np.ndarray] | None:
    """The first row's examples as decoded (None if the table is empty)."""
    conn = _connect(path)
    try:
        row = conn.execute(f"SELECT client_id, data FROM {TABLE} ORDER BY rowid LIMIT 1").fetchone()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: SQLite read failed ({_one_line(e)}); truncated or corrupt file") from None
    finally:
        conn.close()
    if row is None:
        return None
    try:
        return decode_examples(row[1])
    except _BadRow as e:
        raise ValueError(f"{path}: client {row[0]!r} (row 1): {e}") from None


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str | None]:
    """(config with the input/label mapping filled in, the FedJAX dataset recognised or None).

    Without input_key, label_key and features, a file of a FedJAX dataset in
    `KNOWN_DATASETS` gets that dataset's mapping (EMNIST: x = pixels as
    28,28,1, y = label). With `fedjax_convention`, the file must be such a
    dataset and the mapping is FedJAX's `load_data`'s (see the module docstring).
    """
    explicit = [k for k in ("input_key", "label_key", "features", "input_shape") if config[k]]
    if explicit and not config.fedjax_convention:
        return config, None
    path = next(iter(split_files(config).values()))
    first = _first_examples(path)
    dataset = recognise(first) if first is not None else None
    if config.fedjax_convention:
        if explicit:
            raise ValueError(f"config.fedjax_convention=True sets x and y itself; leave {', '.join(explicit)} unset")
        if dataset is None:
            known = " or ".join(f"{name} ({', '.join(shapes)})" for name, (shapes, _) in KNOWN_DATASETS.items())
            found = f"features {', '.join(first)}" if first else "no clients"
            raise ValueError(f"{path}: config.fedjax_convention=True needs a file of FedJAX's {known}; "
                             f"the first client has {found}")
    if dataset is None:
        return config, None
    resolved = ml_collections.ConfigDict(config.to_dict())
    for key, value in KNOWN_DATASETS[dataset][1].items():
        resolved[key] = value
    if config.fedjax_convention and dataset == "CIFAR-100":
        resolved.features = "image,label"  # FedJAX's load_data drops coarse_label
    return resolved, dataset


def _convention(config: ml_collections.ConfigDict, dataset: str | None) -> str | None:
    return dataset if config.fedjax_convention else None


def _check_xy(spec: Schema, path: pathlib.Path) -> None:
    missing = [k for k in ("x", "y") if k not in spec]
    if missing:
        raise ValueError(f"{path}: the output would have features {', '.join(spec)} but no "
                         f"{' or '.join(map(repr, missing))}, which the trainer reads: set "
                         "--config.input_key=FEATURE and --config.label_key=FEATURE (or --config.require_xy=False "
                         "to keep these names and set model.input_key / model.label_key in the pipeline)")


def _rows(path: pathlib.Path, config: ml_collections.ConfigDict,
          convention: str | None = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(client id, converted examples) per row of one file in rowid order; errors name file and client.

    `config` is resolved (`resolve`); `convention` "EMNIST" applies FedJAX's
    `load_data`: x = 1 - pixels, domain_id from the id as stored.
    """
    conn = _connect(path)
    seen: dict[str, int] = {}
    label = None
    try:
        cursor = conn.execute(f"SELECT rowid, client_id, data, num_examples FROM {TABLE} ORDER BY rowid")
        while True:
            try:
                row = cursor.fetchone()
            except sqlite3.DatabaseError as e:
                after = f" after client {label!r}" if label is not None else ""
                raise ValueError(f"{path}: SQLite read failed{after} ({_one_line(e)}); truncated or corrupt file") \
                    from None
            if row is None:
                break
            rowid, raw_id, blob, num_examples = row
            label = raw_id  # how errors name the client: its text, or its bytes when they are not UTF-8
            if isinstance(raw_id, bytes):
                try:
                    label = raw_id.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            try:
                client_id = _client_id(raw_id, bool(config.strip_id_prefix))
                if client_id in seen:
                    raise _BadRow(f"duplicate client id (also row {seen[client_id]})")
                seen[client_id] = rowid
                examples = _convert(decode_examples(blob), config)
                n = len(next(iter(examples.values()))) if examples else 0
                if convention == "EMNIST":
                    examples["x"] = 1 - examples["x"]
                    examples["domain_id"] = np.full(n, fedjax_domain_id(_client_id(raw_id, False)), np.int32)
                if num_examples != n:
                    raise _BadRow(f"num_examples is {num_examples} but the data holds {n} examples")
            except _BadRow as e:
                raise ValueError(f"{path}: client {label!r} (row {rowid}): {e}") from None
            yield client_id, examples
    finally:
        conn.close()


def is_fedjax_file(path: pathlib.Path) -> bool:
    """True if `path` is a SQLite file holding FedJAX's `federated_data` table (never raises, never creates)."""
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return False
    except OSError:
        return False
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return TABLE in tables


def table_counts(path: pathlib.Path) -> tuple[int, int]:
    """(clients, examples) of one FedJAX file, from its rows' `num_examples` (no client is decoded)."""
    conn = _connect(path)
    try:
        clients, examples = conn.execute(f"SELECT COUNT(*), TOTAL(num_examples) FROM {TABLE}").fetchone()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: SQLite read failed ({_one_line(e)}); truncated or corrupt file") from None
    finally:
        conn.close()
    return int(clients), int(examples)


def iter_clients_by_id(path: pathlib.Path, features: Sequence[str]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(client id, {feature: array as decoded}) of one FedJAX file, in client id order, prefix stripped.

    TFF's order (its SQLite files list clients by id): FedJAX's hosted files
    prefix each id with "<16 hex digits>:" and store rows in that hashed
    order, so ids are stripped and sorted (by code point = UTF-8 byte order)
    first, and each row is then fetched by rowid. `features` must all be
    present; each row's `num_examples` is checked. Errors name file and client.
    """
    conn = _connect(path)
    try:
        order: list[tuple[str, int]] = []
        seen: dict[str, Any] = {}
        try:
            for rowid, raw_id in conn.execute(f"SELECT rowid, client_id FROM {TABLE}"):
                try:
                    client_id = _client_id(raw_id, True)
                except _BadRow as e:
                    raise ValueError(f"{path}: client {raw_id!r} (row {rowid}): {e}") from None
                if client_id in seen:
                    raise ValueError(f"{path}: client ids {seen[client_id]!r} and {raw_id!r} are both "
                                     f"{client_id!r} without FedJAX's prefix")
                seen[client_id] = raw_id
                order.append((client_id, rowid))
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path}: SQLite read failed ({_one_line(e)}); truncated or corrupt file") from None
        order.sort()
        for client_id, rowid in order:
            try:
                blob, num_examples = conn.execute(f"SELECT data, num_examples FROM {TABLE} WHERE rowid = ?",
                                                  (rowid,)).fetchone()
            except sqlite3.DatabaseError as e:
                raise ValueError(f"{path}: client {client_id!r}: SQLite read failed ({_one_line(e)}); truncated or "
                                 "corrupt file") from None
            try:
                examples = decode_examples(blob)
                missing = [k for k in features if k not in examples]
                if missing:
                    raise _BadRow(f"no feature {missing[0]!r} (features: {', '.join(sorted(examples)) or 'none'})")
                lengths = {k: len(v) for k, v in examples.items()}
                if len(set(lengths.values())) > 1:
                    raise _BadRow(f"features have different example counts {lengths}")
                n = next(iter(lengths.values()), 0)
                if num_examples != n:
                    raise _BadRow(f"num_examples is {num_examples} but the data holds {n} examples")
            except _BadRow as e:
                raise ValueError(f"{path}: client {client_id!r} (row {rowid}): {e}") from None
            yield client_id, examples
    finally:
        conn.close()


def schema(config: ml_collections.ConfigDict) -> Schema:
    """The first client's features (after renaming, reshaping and casting) with their per-example shapes.

    Refuses a schema without `x` and `y` unless `require_xy` is False.
    """
    resolved, dataset = resolve(config)
    split, path = next(iter(split_files(config).items()))
    for _, examples in _rows(path, resolved, _convention(config, dataset)):
        if not examples:
            raise ValueError(f"{path}: the first client has no features")
        spec = {k: FeatureSpec(v.dtype.name, v.shape[1:]) for k, v in examples.items()}
        if config.require_xy:
            _check_xy(spec, path)
        return spec
    raise ValueError(f"{path}: table {TABLE!r} has no clients (split {split!r})")


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 over the split files (split name and contents): a changed file is not 'up to date'."""
    digest = hashlib.sha256()
    for split, path in split_files(config).items():
        digest.update(f"{split}\0".encode())
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            file_sha256(path, digest)
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    return f"sha256:{digest.hexdigest()}"


def expected_counts(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """(clients, examples) per split from the tables' own counts."""
    return {split: table_counts(path) for split, path in split_files(config).items()}


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields every client of every split file, in rowid order, checked against the schema."""
    spec = schema(config)
    resolved, dataset = resolve(config)
    convention = _convention(config, dataset)
    if dataset is not None:
        shape = f" as {','.join(map(str, resolved.input_shape))}" if resolved.input_shape else ""
        how = ("FedJAX's load_data: x = 1 - pixels, domain_id" if convention == "EMNIST" else
               "FedJAX's load_data" if convention else "values as stored")
        print(f"fedjax-sqlite: FedJAX's {dataset} recognised: x = {resolved.input_key}{shape}, "
              f"y = {resolved.label_key} ({how})", file=sys.stderr, flush=True)
    for split, path in split_files(config).items():
        for client_id, examples in _rows(path, resolved, convention):
            if set(examples) != set(spec):
                missing, extra = sorted(set(spec) - set(examples)), sorted(set(examples) - set(spec))
                raise ValueError(f"{path}: client {client_id!r}: features differ from the first client's "
                                 f"(missing {missing}, extra {extra})")
            for name, value in examples.items():
                want = spec[name]
                if value.shape[1:] != want.shape or value.dtype.name != want.dtype:
                    raise ValueError(f"{path}: client {client_id!r}: feature {name!r} has examples of shape "
                                     f"{value.shape[1:]} and dtype {value.dtype.name}; the first client's are "
                                     f"{want.shape} {want.dtype}")
            yield split, client_id, examples
