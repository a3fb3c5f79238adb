"""The on-disk federated dataset format, version 1: schema and example encoding.

A dataset directory (see docs/format.md) holds `metadata.json`, per split an
`index.npz` and client-contiguous ArrayRecord shards, and `_SUCCESS`, written
last. One record is one example: the features in schema order, each as its
raw little-endian C-order bytes; a variable-length feature (first dimension
`None`) is preceded by its length as a little-endian uint32. No pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import numbers
import os
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SUCCESS_FILE = "_SUCCESS"
INDEX_FILE = "index.npz"
_LENGTH = np.dtype("<u4")
_HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike, digest: Any = None) -> str:
    """Hex sha256 of the file at `path`, read in 1 MiB chunks (shards, downloads, recipe inputs).

    With `digest` (a `hashlib` hash object) the file's bytes are fed into it
    instead of a fresh sha256, to hash several files (or names and files) as
    one; its hex digest so far is returned.
    """
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


class DatasetFormatError(ValueError):
    """A dataset directory or record is invalid; the message names the file."""


def success_marker(metadata_bytes: bytes) -> bytes:
    """The content of `_SUCCESS`: the sha256 of `metadata.json`'s bytes, one line.

    The reader compares it on every open, so an edit of `metadata.json` (a dtype changed from
    float32 to int32 has the same record size) is caught before anything is decoded with it. An
    empty `_SUCCESS` (datasets written before the marker held a digest) is accepted unchecked.
    """
    return f"{METADATA_FILE} sha256 {hashlib.sha256(metadata_bytes).hexdigest()}\n".encode("ascii")


def check_success_marker(marker: bytes, metadata_bytes: bytes, directory: str | os.PathLike) -> None:
    """Raises DatasetFormatError naming `metadata.json` if a non-empty `_SUCCESS` does not record its sha256."""
    if not marker or marker == success_marker(metadata_bytes):
        return
    actual = hashlib.sha256(metadata_bytes).hexdigest()
    raise DatasetFormatError(f"{os.path.join(directory, METADATA_FILE)}: sha256 {actual[:16]}... differs from the "
                             f"one recorded in {SUCCESS_FILE} when the dataset was written (metadata.json or "
                             f"{SUCCESS_FILE} was edited or damaged; preprocess the dataset again)")


def record_layout(schema: Schema) -> str:
    """Each feature with its dtype, shape and bytes per example, e.g. `x float32[8, 8, 1] = 256 B, y int32[] = 4 B`
    (a variable-length feature: bytes per element of its first dimension, after a 4-byte length)."""
    parts = []
    for name, spec in schema.items():
        per = int(np.prod([d for d in spec.shape if d is not None], dtype=np.int64)) * spec.stored_dtype.itemsize
        size = f"4 B + {per} B per element" if spec.variable else f"{per} B"
        parts.append(f"{name} {spec.dtype}{list(spec.shape)} = {size}".replace("None", "n"))
    return ", ".join(parts)


def fixed_record_size(schema: Schema) -> int | None:
    """Bytes of one record when every feature has a fixed shape (None with a variable-length feature)."""
    fixed = _fixed_dtype(schema)
    return None if fixed is None else fixed.itemsize


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """dtype (numpy name) and per-example shape of one feature.

    `shape[0]` may be None: a variable-length feature (e.g. tokens).
    """

    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.dtype is None or isinstance(self.dtype, bytes):  # np.dtype(None) would silently be float64
            raise ValueError(f"invalid feature dtype {self.dtype!r}: use a name such as 'float32'")
        try:
            dtype = np.dtype(self.dtype)
        except (TypeError, ValueError):
            raise ValueError(f"invalid feature dtype {self.dtype!r}: use a name such as 'float32'") from None
        if dtype.kind not in "biuf":
            raise ValueError(f"unsupported feature dtype {self.dtype!r}: use bool, integer or float")
        object.__setattr__(self, "dtype", dtype.name)
        try:
            dims = tuple(self.shape)
        except TypeError:
            raise ValueError(f"invalid feature shape {self.shape!r}: expected a sequence of dimensions") from None
        if any(d is not None and (isinstance(d, bool) or not isinstance(d, numbers.Integral)) for d in dims):
            raise ValueError(f"invalid feature shape {self.shape!r}: dimensions must be integers (or None first)")
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in dims))
        if any(d is None for d in self.shape[1:]) or any(d is not None and d < 0 for d in self.shape):
            raise ValueError(f"invalid feature shape {self.shape}: only the first dimension may be None")
        try:  # NumPy's limits on one example (each dimension a C int, the size an intp)
            np.dtype((dtype, tuple(d for d in self.shape if d is not None)))
        except (ValueError, OverflowError, TypeError):
            raise ValueError(f"invalid feature shape {self.shape}: too large for one example") from None

    @property
    def variable(self) -> bool:
        """Whether the first dimension varies between examples."""
        return bool(self.shape) and self.shape[0] is None

    @property
    def stored_dtype(self) -> np.dtype:
        """The little-endian dtype of the bytes on disk."""
        return np.dtype(self.dtype).newbyteorder("<")

    def to_json(self) -> dict[str, Any]:
        """`{"dtype": name, "shape": [dims]}` (a variable first dimension is `null`)."""
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FeatureSpec:
        """Inverse of `to_json`; raises KeyError/TypeError/ValueError on malformed input."""
        return cls(d["dtype"], tuple(d["shape"]))


Schema = dict[str, FeatureSpec]


def schema_to_json(schema: Schema) -> dict[str, Any]:
    """The schema as JSON (a list keeps the feature order explicit)."""
    return {"features": [{"name": name, **spec.to_json()} for name, spec in schema.items()]}


def schema_from_json(d: Mapping[str, Any]) -> Schema:
    """Inverse of `schema_to_json`; raises ValueError on duplicate or non-string feature names."""
    schema: Schema = {}
    for f in d["features"]:
        name = f["name"]
        if not isinstance(name, str) or not name or name in schema:
            raise ValueError(f"invalid or duplicate feature name {name!r}")
        schema[name] = FeatureSpec.from_json(f)
    return schema


@functools.lru_cache(maxsize=64)
def _fixed_dtype_cached(items: tuple[tuple[str, FeatureSpec], ...]) -> np.dtype | None:
    if any(spec.variable for _, spec in items):
        return None
    return np.dtype([(name, spec.stored_dtype, spec.shape) for name, spec in items])


def _fixed_dtype(schema: Schema) -> np.dtype | None:
    """A packed structured dtype covering one record, when every feature has a fixed shape."""
    return _fixed_dtype_cached(tuple(schema.items()))


def encode_example(schema: Schema, example: Mapping[str, Any]) -> bytes:
    """Serializes one example (feature -> array of the feature's per-example shape)."""
    parts = []
    for name, spec in schema.items():
        value = np.asarray(example[name], dtype=spec.stored_dtype)
        if spec.variable:
            if value.ndim != len(spec.shape) or value.shape[1:] != spec.shape[1:]:
                raise ValueError(f"feature {name!r}: shape {value.shape} does not match {spec.shape}")
            parts.append(np.array(value.shape[0], _LENGTH).tobytes())
        elif value.shape != spec.shape:
            raise ValueError(f"feature {name!r}: shape {value.shape} does not match {spec.shape}")
        parts.append(np.ascontiguousarray(value).tobytes())
    return b"".join(parts)


def encode_examples(schema: Schema, columns: Mapping[str, Any], n: int) -> list[bytes]:
    """Serializes n examples given as columns (feature -> array [n, *shape], or a list of n arrays
    for a variable-length feature); the same bytes as `encode_example` per example.

    All-fixed schemas fill one packed structured array and slice its bytes (several times faster
    than per-example encoding); the columns must already have the schema's shapes.
    """
    fixed = _fixed_dtype(schema)
    if n == 0:
        return []
    if fixed is None or fixed.itemsize == 0:
        return [encode_example(schema, {name: columns[name][i] for name in schema}) for i in range(n)]
    table = np.empty(n, fixed)
    for name in schema:
        table[name] = columns[name]
    buf = table.tobytes()
    size = fixed.itemsize
    return [buf[i * size:(i + 1) * size] for i in range(n)]


def decode_examples(schema: Schema, records: Sequence[bytes], source: str = "") -> dict[str, Any]:
    """Decodes records into `{feature: array [n, *shape]}` (a list of arrays for variable-length features).

    All-fixed schemas decode with one `np.frombuffer` over the joined records (the training hot
    path). Their arrays are then read-only, possibly strided views into that one buffer: copy
    before writing to them. A record of the wrong length raises DatasetFormatError naming `source`.
    """
    fixed = _fixed_dtype(schema)
    if fixed is not None:
        bad = None
        if not set(map(len, records)) <= {fixed.itemsize}:  # C-speed check; find the culprit only on bad input
            bad = next(i for i, r in enumerate(records) if len(r) != fixed.itemsize)
        if bad is not None:
            raise DatasetFormatError(f"{source}: record {bad} has {len(records[bad])} bytes, "
                                     f"the schema needs {fixed.itemsize}")
        if fixed.itemsize == 0:  # only zero-size features: nothing to read
            return {name: np.zeros((len(records), *spec.shape), np.dtype(spec.dtype)) for name, spec in schema.items()}
        table = np.frombuffer(b"".join(records), dtype=fixed)
        # Read-only views into one buffer (no copy on little-endian hosts); callers gather from them.
        return {name: table[name].astype(np.dtype(spec.dtype), copy=False) for name, spec in schema.items()}
    columns: dict[str, list[np.ndarray]] = {name: [] for name in schema}
    for i, record in enumerate(records):
        offset = 0
        try:
            for name, spec in schema.items():
                shape = spec.shape
                if spec.variable:
                    (length,) = np.frombuffer(record, _LENGTH, count=1, offset=offset)
                    offset += _LENGTH.itemsize
                    shape = (int(length), *shape[1:])
                count = int(np.prod(shape, dtype=np.int64))
                value = np.frombuffer(record, spec.stored_dtype, count=count, offset=offset).reshape(shape)
                offset += count * spec.stored_dtype.itemsize
                columns[name].append(value.astype(np.dtype(spec.dtype)))
        except ValueError as e:
            raise DatasetFormatError(f"{source}: record {i} does not decode with the schema ({e})") from None
        if offset != len(record):
            raise DatasetFormatError(f"{source}: record {i} has {len(record) - offset} trailing bytes")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if spec.variable:
            out[name] = columns[name]
        else:
            out[name] = (np.stack(columns[name]) if columns[name]
                         else np.zeros((0, *spec.shape), np.dtype(spec.dtype)))
    return out
