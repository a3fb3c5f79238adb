"""A federated dataset held in memory, for notebooks, tests and data that already sits in NumPy arrays.

It has the reader interface of `FederatedDataset` (`schema`, `splits`,
`client_ids`, `client_sizes`, `num_clients`, `get_client`), so the same
cohort pipeline, packing and rounds run on it as on a preprocessed
directory:

    data = InMemoryDataset({"train": {"alice": {"x": x_a, "y": y_a}, "bob": {...}},
                            "test": {"alice": {...}, ...}})
    data = InMemoryDataset.from_arrays({"train": {"x": x, "y": y, "client": owner}, "test": {...}})

Client ids are strings; within a split clients are kept in sorted id order,
as preprocessing writes them, so a dataset built in memory and the same data
preprocessed to disk sample the same cohorts.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedstream.data.format import DatasetFormatError, FeatureSpec, Schema

ClientData = Mapping[str, np.ndarray]


class InMemoryDataset:
    """Clients' examples held as NumPy arrays, split by split.

    `splits` maps a split name to `{client_id: {feature: array}}`; every
    array of a client has one row per example, and every client of every
    split has the same features with the same dtype and per-example shape.
    """

    def __init__(self, splits: Mapping[str, Mapping[Any, ClientData]]) -> None:
        if not splits:
            raise DatasetFormatError("InMemoryDataset: no splits given")
        self._ids: dict[str, np.ndarray] = {}
        self._clients: dict[str, list[dict[str, np.ndarray]]] = {}
        self._positions: dict[str, dict[str, int]] = {}
        schema: Schema | None = None
        for split, clients in splits.items():
            if not isinstance(split, str) or not split:
                raise DatasetFormatError(f"InMemoryDataset: split names must be non-empty strings, got {split!r}")
            ids = sorted(str(c) for c in clients)
            if len(set(ids)) != len(ids):
                raise DatasetFormatError(f"InMemoryDataset: split {split!r} has client ids that are equal as strings")
            by_id = {str(c): data for c, data in clients.items()}
            rows = []
            for client_id in ids:
                data = {k: np.asarray(v) for k, v in by_id[client_id].items()}
                client_schema = _schema_of(data, f"split {split!r}, client {client_id!r}")
                if schema is None:
                    schema = client_schema
                elif client_schema != schema:
                    raise DatasetFormatError(
                        f"InMemoryDataset: split {split!r}, client {client_id!r} has features "
                        f"{_describe(client_schema)}, other clients have {_describe(schema)}")
                rows.append(data)
            self._ids[split] = np.array(ids, dtype=str)
            self._clients[split] = rows
            self._positions[split] = {c: i for i, c in enumerate(ids)}
        if schema is None:
            raise DatasetFormatError("InMemoryDataset: no clients in any split")
        self.schema: Schema = schema

    @classmethod
    def from_arrays(cls, splits: Mapping[str, Mapping[str, np.ndarray]], client_key: str = "client") -> "InMemoryDataset":
        """Builds a dataset from flat arrays: per split, features plus `client_key`, the owner of each row.

        `{"train": {"x": x, "y": y, "client": owner}}` gives every distinct
        `owner` value a client holding its rows, in their original order.
        """
        grouped: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for split, arrays in splits.items():
            if client_key not in arrays:
                raise DatasetFormatError(f"InMemoryDataset.from_arrays: split {split!r} has no {client_key!r} "
                                         f"array naming each example's client (arrays: {', '.join(arrays)})")
            owners = np.asarray(arrays[client_key])
            features = {k: np.asarray(v) for k, v in arrays.items() if k != client_key}
            for name, values in features.items():
                if values.shape[:1] != owners.shape[:1]:
                    raise DatasetFormatError(f"InMemoryDataset.from_arrays: split {split!r}: {name!r} has "
                                             f"{values.shape[0] if values.ndim else 0} rows, {client_key!r} has "
                                             f"{len(owners)}")
            names, inverse = np.unique(owners.astype(str), return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
            grouped[split] = {
                str(name): {k: v[order[bounds[i]:bounds[i + 1]]] for k, v in features.items()}
                for i, name in enumerate(names)}
        return cls(grouped)

    @property
    def splits(self) -> list[str]:
        """Split names, sorted."""
        return sorted(self._ids)

    def _check_split(self, split: str) -> None:
        if split not in self._ids:
            raise DatasetFormatError(f"in-memory dataset: no split {split!r} (splits: {', '.join(self.splits)})")

    def client_ids(self, split: str) -> np.ndarray:
        """Client ids of a split, sorted."""
        self._check_split(split)
        return self._ids[split]

    def client_sizes(self, split: str) -> np.ndarray:
        """Example counts per client, in id order."""
        self._check_split(split)
        return np.array([_num_rows(c) for c in self._clients[split]], np.int64)

    def num_clients(self, split: str) -> int:
        """Number of clients (including empty ones) in a split."""
        return len(self.client_ids(split))

    def client_index(self, split: str, client_id: str) -> int:
        """Position of `client_id` in the split."""
        self._check_split(split)
        try:
            return self._positions[split][client_id]
        except KeyError:
            raise DatasetFormatError(f"in-memory dataset: no client {client_id!r} in split {split!r}") from None

    def get_client(self, split: str, client: str | int) -> dict[str, np.ndarray]:
        """All examples of one client, by id or by position (the arrays themselves, not copies)."""
        self._check_split(split)
        i = self.client_index(split, client) if isinstance(client, str) else int(client)
        if not 0 <= i < len(self._clients[split]):
            raise DatasetFormatError(f"in-memory dataset: client position {i} out of range for split {split!r}")
        return self._clients[split][i]

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}: {self.num_clients(s)} clients / {int(self.client_sizes(s).sum())} examples"
                           for s in self.splits)
        return f"InMemoryDataset({counts}; features {_describe(self.schema)})"


def _num_rows(data: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(data.values())).shape[0]) if data else 0


def _schema_of(data: Mapping[str, np.ndarray], where: str) -> Schema:
    """The schema of one client's arrays; every array needs the same number of rows."""
    if not data:
        raise DatasetFormatError(f"InMemoryDataset: {where} has no features")
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in data.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise DatasetFormatError(f"InMemoryDataset: {where}: every feature needs one row per example, got rows "
                                 + ", ".join(f"{k}={v}" for k, v in counts.items()))
    out = {}
    for name, array in data.items():
        if array.dtype.kind not in "biuf":
            raise DatasetFormatError(f"InMemoryDataset: {where}: feature {name!r} has dtype {array.dtype}; use "
                                     "numeric arrays (token ids for text)")
        out[name] = FeatureSpec(array.dtype.name, tuple(int(d) for d in array.shape[1:]))
    return out


def _describe(schema: Schema) -> str:
    return ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in sorted(schema.items()))
