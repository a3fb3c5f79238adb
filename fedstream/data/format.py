"""The on-disk federated dataset format, version 1: schema and example encoding.

A dataset directory (see docs/format.md) holds `metadata.json`, per split an
`index.npz` and client-contiguous ArrayRecord shards, and `_SUCCESS`, written
last. One record is one example: the features in schema order, each as its
raw little-endian C-order bytes; a variable-length feature (first dimension
`None`) is preceded by its length as a little-endian uint32. No pickle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SUCCESS_FILE = "_SUCCESS"
INDEX_FILE = "index.npz"
_LENGTH = np.dtype("<u4")


class DatasetFormatError(ValueError):
    """A dataset directory or record is invalid; the message names the file."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """dtype (numpy name) and per-example shape of one feature.

    `shape[0]` may be None: a variable-length feature (e.g. tokens).
    """

    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))
        if any(d is None for d in self.shape[1:]) or any(d is not None and d < 0 for d in self.shape):
            raise ValueError(f"invalid feature shape {self.shape}: only the first dimension may be None")
        if np.dtype(self.dtype).kind not in "biuf":
            raise ValueError(f"unsupported feature dtype {self.dtype!r}: use bool, integer or float")

    @property
    def variable(self) -> bool:
        """Whether the first dimension varies between examples."""
        return bool(self.shape) and self.shape[0] is None

    @property
    def stored_dtype(self) -> np.dtype:
        """The little-endian dtype of the bytes on disk."""
        return np.dtype(self.dtype).newbyteorder("<")

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FeatureSpec:
        return cls(d["dtype"], tuple(d["shape"]))


Schema = dict[str, FeatureSpec]


def schema_to_json(schema: Schema) -> dict[str, Any]:
    """The schema as JSON (a list keeps the feature order explicit)."""
    return {"features": [{"name": name, **spec.to_json()} for name, spec in schema.items()]}


def schema_from_json(d: Mapping[str, Any]) -> Schema:
    return {f["name"]: FeatureSpec.from_json(f) for f in d["features"]}


def _fixed_dtype(schema: Schema) -> np.dtype | None:
    """A structured dtype covering one record, when every feature has a fixed shape."""
    if any(spec.variable for spec in schema.values()):
        return None
    return np.dtype([(name, spec.stored_dtype, spec.shape) for name, spec in schema.items()])


def encode_example(schema: Schema, example: Mapping[str, Any]) -> bytes:
    """Serializes one example (feature -> array of the feature's per-example shape)."""
    parts = []
    for name, spec in schema.items():
        value = np.asarray(example[name], dtype=spec.stored_dtype)
        if spec.variable:
            if value.shape[1:] != spec.shape[1:]:
                raise ValueError(f"feature {name!r}: shape {value.shape} does not match {spec.shape}")
            parts.append(np.array(value.shape[0], _LENGTH).tobytes())
        elif value.shape != spec.shape:
            raise ValueError(f"feature {name!r}: shape {value.shape} does not match {spec.shape}")
        parts.append(np.ascontiguousarray(value).tobytes())
    return b"".join(parts)


def decode_examples(schema: Schema, records: Sequence[bytes], source: str = "") -> dict[str, Any]:
    """Decodes records into `{feature: array [n, *shape]}` (a list of arrays for variable-length features).

    All-fixed schemas decode with one `np.frombuffer` over the joined records.
    """
    fixed = _fixed_dtype(schema)
    if fixed is not None:
        if any(len(r) != fixed.itemsize for r in records):
            bad = next(i for i, r in enumerate(records) if len(r) != fixed.itemsize)
            raise DatasetFormatError(f"{source}: record {bad} has {len(records[bad])} bytes, "
                                     f"the schema needs {fixed.itemsize}")
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
