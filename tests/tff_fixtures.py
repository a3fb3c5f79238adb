"""Small files in TensorFlow Federated's upstream layouts, for tests of TFF recipes.

Reusable by any recipe reading TFF data (emnist, cifar100, shakespeare, stackoverflow):

    write_tff_sqlite(path, {"train": {"c1": {"pixels": array[n, 28, 28], "label": array[n]}, ...}, ...})
        -> examples + client_metadata tables (TFF's schema and indexes), one serialized
           tf.train.Example per row; LZMA-compressed when `path` ends in .lzma
    write_tff_h5(path, {"c1": {"pixels": ..., "label": ...}, ...})       -> examples/<client>/<feature>
    write_tff_h5_archive(path, {"fed_emnist_train.h5": clients, ...})      -> a .tar.bz2 of such .h5 files
    emnist_clients(...), cifar100_clients(...)                              -> random data of the right shapes

A client is either columnar `{feature: array [n, ...] or list of n values}` or
a list of per-example dicts / raw serialized bytes (to build broken inputs).
String features are lists of `bytes` (or numpy `S` arrays).
"""

from __future__ import annotations

import io
import lzma
import pathlib
import sqlite3
import tarfile
from typing import Any, Mapping, Sequence

import numpy as np

from fedstream.data.tff import serialize_example

Client = Mapping[str, Any] | Sequence[Mapping[str, Any] | bytes]


def client_rows(client: Client) -> list[bytes]:
    """Serialized tf.train.Examples of one client, in order."""
    if isinstance(client, Mapping):
        names = list(client)
        n = len(client[names[0]]) if names else 0
        return [serialize_example({k: client[k][i] for k in names}) for i in range(n)]
    return [row if isinstance(row, bytes) else serialize_example(row) for row in client]


def write_tff_sqlite(path: str | pathlib.Path, splits: Mapping[str, Mapping[str, Client]], *,
                     interleave_seed: int | None = 0, lzma_format: int = lzma.FORMAT_ALONE,
                     metadata: bool = True, extra_metadata: Sequence[tuple[str, str, int]] = (),
                     metadata_counts: Mapping[tuple[str, str], int] | None = None) -> pathlib.Path:
    """Writes TFF's SQLite layout; `.lzma`/`.xz` paths are compressed (FORMAT_ALONE by default, like `.lzma`).

    Rows of different clients are interleaved in a seeded random order (each
    client's own rows stay in order), so readers must group by client id
    themselves; `interleave_seed=None` writes client by client.
    `extra_metadata` appends raw (client_id, split_name, num_examples) rows
    (e.g. a duplicate) and `metadata_counts` {(split, client_id): n} replaces
    the recorded count of a client, to test error handling.
    """
    path = pathlib.Path(path)
    compress = path.suffix in (".lzma", ".xz")
    db_path = path.with_name(path.name + ".tmp.sqlite") if compress else path
    db_path.unlink(missing_ok=True)
    rows: list[tuple[str, str, bytes]] = []
    queues = []
    con = sqlite3.connect(db_path)
    try:
        con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                    "serialized_example_proto BLOB NOT NULL)")
        con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                    "num_examples INTEGER NOT NULL)")
        for split, clients in splits.items():
            for client_id, client in clients.items():
                blobs = client_rows(client)
                queues.append([(split, client_id, b) for b in blobs])
                if metadata:
                    count = (metadata_counts or {}).get((split, client_id), len(blobs))
                    con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, split, count))
        con.executemany("INSERT INTO client_metadata VALUES (?, ?, ?)", list(extra_metadata))
        if interleave_seed is None:
            rows = [row for queue in queues for row in queue]
        else:
            rng = np.random.default_rng(interleave_seed)
            owners = np.concatenate([np.full(len(q), i) for i, q in enumerate(queues)] or [np.zeros(0, int)])
            rng.shuffle(owners)
            positions = [0] * len(queues)
            for owner in owners:
                rows.append(queues[owner][positions[owner]])
                positions[owner] += 1
        con.executemany("INSERT INTO examples VALUES (?, ?, ?)", rows)
        con.execute("CREATE INDEX examples_client_id ON examples (client_id)")
        con.execute("CREATE INDEX examples_split_client_id ON examples (split_name, client_id)")
        con.commit()
    finally:
        con.close()
    if compress:
        with open(db_path, "rb") as src, lzma.open(path, "wb", format=lzma_format, preset=0) as dst:
            dst.write(src.read())
        db_path.unlink()
    return path


def write_tff_h5(path: str | pathlib.Path, clients: Mapping[str, Mapping[str, Any]]) -> pathlib.Path:
    """Writes TFF's legacy HDF5 layout: `examples/<client_id>/<feature>` datasets [n, ...] (needs h5py)."""
    import h5py

    path = pathlib.Path(path)
    with h5py.File(path, "w") as f:
        examples = f.create_group("examples")
        for client_id, features in clients.items():
            group = examples.create_group(client_id)
            for name, values in features.items():
                array = np.asarray(values)
                group.create_dataset(name, data=array, dtype=array.dtype)
    return path


def write_tff_h5_archive(path: str | pathlib.Path, files: Mapping[str, Mapping[str, Mapping[str, Any]]], *,
                         prefix: str = "") -> pathlib.Path:
    """A `.tar.bz2` holding one TFF .h5 file per entry of `files` ({file name: clients}), under `prefix`."""
    path = pathlib.Path(path)
    with tarfile.open(path, "w:bz2") as tar:
        for name, clients in files.items():
            h5_path = path.with_name(f".{name}.fixture")
            write_tff_h5(h5_path, clients)
            tar.add(h5_path, arcname=prefix + name)
            h5_path.unlink()
        readme = b"fixture\n"
        info = tarfile.TarInfo(prefix + "README")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return path


def truncate(path: str | pathlib.Path, keep_fraction: float = 0.5) -> pathlib.Path:
    """Cuts a file to `keep_fraction` of its bytes (a broken download)."""
    path = pathlib.Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def emnist_clients(rng: np.random.Generator, client_ids: Sequence[str], sizes: Sequence[int],
                   num_classes: int = 62) -> dict[str, dict[str, np.ndarray]]:
    """EMNIST-shaped clients: `pixels` float32 [n, 28, 28] in [0, 1] (1 = background), `label` int32 [n]."""
    out = {}
    for client_id, n in zip(client_ids, sizes):
        pixels = np.where(rng.random((n, 28, 28)) < 0.8, 1.0, rng.random((n, 28, 28))).astype(np.float32)
        out[client_id] = {"pixels": pixels, "label": rng.integers(0, num_classes, n).astype(np.int32)}
    return out


def cifar100_clients(rng: np.random.Generator, client_ids: Sequence[str],
                     size: int = 4) -> dict[str, dict[str, np.ndarray]]:
    """CIFAR-100-shaped clients: `image` uint8 [n, 32, 32, 3], `label` int64 0-99, `coarse_label` = label // 5."""
    out = {}
    for client_id in client_ids:
        label = rng.integers(0, 100, size).astype(np.int64)
        out[client_id] = {"image": rng.integers(0, 256, (size, 32, 32, 3)).astype(np.uint8),
                          "label": label, "coarse_label": label // 5}
    return out
