"""Small files in FedJAX's SQLite layout, for tests of the recipes that read them.

FedJAX (`fedjax.core.sqlite_federated_data.SQLiteFederatedDataBuilder`) writes
one table per file, one row per client,

    federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)

with `data = zlib.compress(serialization.msgpack_serialize(examples))`. The
encoder below is FedJAX's `_msgpack_ext_pack` (fedjax/core/serialization.py)
re-typed without FedJAX or JAX: ext type 1 = ndarray `(shape, dtype name,
C-order bytes)`, 3 = NumPy scalar, 4 = object ndarray of bytes `(shape, flat
list of bytes)` (the text features of Shakespeare and Stack Overflow).

    write_db(path, [(client_id bytes, {feature: array} or raw blob, num_examples or None), ...])
    write_fedjax_text(path, {client_id: {feature: list of bytes or array}}, seed)  -> hosted-file style ids
"""

from __future__ import annotations

import pathlib
import sqlite3
import zlib
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

CREATE = ("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, "
          "num_examples INTEGER NOT NULL);")  # fedjax.core.sqlite_federated_data.SQLiteFederatedDataBuilder


def fedjax_ext_pack(x: Any) -> Any:
    """fedjax/core/serialization.py `_msgpack_ext_pack`, re-typed here without FedJAX or JAX."""
    if isinstance(x, np.ndarray) and x.dtype.hasobject:
        flat = list(x.flatten())
        return msgpack.ExtType(4, msgpack.packb((x.shape, flat), use_bin_type=True))
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
    if isinstance(x, np.generic):
        a = np.asarray(x)
        return msgpack.ExtType(3, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
    return x


def fedjax_blob(examples: Mapping[str, Any]) -> bytes:
    """`zlib.compress(serialization.msgpack_serialize(examples))`, as SQLiteFederatedDataBuilder.add_many."""
    return zlib.compress(msgpack.packb(dict(examples), default=fedjax_ext_pack, strict_types=True))


def write_db(path: str | pathlib.Path, rows: Sequence[tuple[bytes, Any, int | None]],
             create: str = CREATE) -> pathlib.Path:
    """rows: (client_id bytes, examples dict or raw blob, num_examples or None = computed); replaces `path`."""
    pathlib.Path(path).unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(create)
    for cid, examples, n in rows:
        blob = examples if isinstance(examples, bytes) else fedjax_blob(examples)
        if n is None:
            n = len(next(iter(examples.values())))
        conn.execute("INSERT INTO federated_data VALUES (?, ?, ?);", (cid, blob, n))
    conn.commit()
    conn.close()
    return pathlib.Path(path)


def bytes_array(values: Sequence[bytes]) -> np.ndarray:
    """A 1-D object array of bytes, as FedJAX stores a text feature."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def write_fedjax_text(path: str | pathlib.Path, clients: Mapping[str, Mapping[str, Any]],
                      seed: int = 0) -> pathlib.Path:
    """One FedJAX split file of text clients, ids as FedJAX's hosted files have them ("<16 hex>:" + id).

    Lists of bytes become object arrays (ext type 4); other values are stored
    as given. Rows are inserted in prefixed-id order (a seeded random hash), so
    the rowid order differs from the id order.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for cid, features in clients.items():
        examples = {k: bytes_array(v) if isinstance(v, list) else v for k, v in features.items()}
        rows.append((f"{int(rng.integers(0, 2**63)):016x}:{cid}".encode(), examples, None))
    return write_db(path, sorted(rows, key=lambda row: row[0]))
