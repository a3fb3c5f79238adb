"""Shared plumbing of the text recipes `shakespeare` and `stackoverflow` (not a recipe).

Builds on `_tff_common` (source resolution, download, legacy HDF5) and adds
what the text recipes need: the upstream `client_metadata` counts of a
SQLite file before any client is read (a wrong file fails in seconds, not
after hours), and the published-count check that honours `check_counts`.

It also reads FedJAX's copies of the same datasets (`fedjax.datasets.shakespeare`,
`.stackoverflow`): one SQLite file per split (`shakespeare_train.sqlite`, ...)
with FedJAX's table `federated_data(client_id, data, num_examples)`, text
features as bytes-string arrays (msgpack ext type 4, decoded by the
`fedjax_sqlite` recipe's reader). `--source` names one of those files or
their directory; the other splits' files are looked up next to it by
FedJAX's names. Ids lose FedJAX's "<16 hex>:" prefix and are read in id
order, so the clients, counts and ids equal those of TFF's files; the
counts come from the rows' `num_examples` before any client is decoded.
"""

from __future__ import annotations

import contextlib
import pathlib
import warnings
from typing import Iterator, Mapping

import ml_collections
import numpy as np

from fedstream.data import tff
from fedstream.data.download import Remote, cache_dir
from fedstream.data.format import file_sha256
from fedstream.recipes import _tff_common as common
from fedstream.recipes import fedjax_sqlite


def fedjax_files(path: pathlib.Path, names: Mapping[str, str]) -> dict[str, pathlib.Path] | None:
    """{upstream split: FedJAX file} if `path` is FedJAX's layout, else None (a TFF file or .h5 directory).

    `names` maps each needed upstream (TFF SQLite) split name to FedJAX's file
    name of that split, e.g. {"train": "shakespeare_train.sqlite"}. `path` is
    one FedJAX file (the others must lie next to it) or a directory holding
    FedJAX files. A missing split file is an error naming it.
    """
    if path.is_dir():
        if not any((path / name).is_file() for name in names.values()):
            return None
        base = path
    elif path.suffix in (".sqlite", ".db") and fedjax_sqlite.is_fedjax_file(path):
        base = path.parent
        if path.name not in names.values():
            raise ValueError(f"{path}: a FedJAX SQLite file, but FedJAX names this dataset's files "
                             f"{', '.join(names.values())} (one per split); rename it, or pass the directory "
                             "holding them")
    else:
        return None
    missing = [name for name in names.values() if not fedjax_sqlite.is_fedjax_file(base / name)]
    if missing:
        raise ValueError(f"{base}: no FedJAX SQLite file {', '.join(missing)}; FedJAX stores this dataset as one "
                         f"file per split ({', '.join(names.values())}) and all of them are needed")
    return {split: base / name for split, name in names.items()}


def _fedjax_text(values: object, where: str, feature: str) -> list[bytes]:
    """A FedJAX text feature (a 1-D object array of bytes) as a list of bytes."""
    if (not isinstance(values, np.ndarray) or values.dtype != object or values.ndim != 1
            or any(not isinstance(v, bytes) for v in values)):
        shape = getattr(values, "shape", None)
        dtype = getattr(values, "dtype", type(values).__name__)
        raise tff.TFFFormatError(f"{where}: feature {feature!r} is not one bytes string per example (FedJAX's "
                                 f"ext type 4); it has dtype {dtype} and shape {shape}")
    return list(values)


def _fedjax_reader(files: Mapping[str, pathlib.Path]) -> common.Reader:
    def read(split: str, _h5_name: str, features: tff.Features) -> Iterator[tuple[str, tff.ClientData]]:
        for name, shape in features.items():
            if shape != ():
                raise ValueError(f"feature {name!r}: only one string per example is read from FedJAX files")
        path = files[split]
        for client_id, examples in fedjax_sqlite.iter_clients_by_id(path, list(features)):
            where = f"{path}: client {client_id!r}"
            yield client_id, {name: _fedjax_text(examples[name], where, name) for name in features}

    return read


def fingerprint(config: ml_collections.ConfigDict, remotes: Mapping[str, Remote],
                fedjax_names: Mapping[str, str]) -> str:
    """`_tff_common.fingerprint`, or for FedJAX's layout the sha256 of each split file read."""
    if config.source:
        files = fedjax_files(pathlib.Path(config.source).expanduser(), fedjax_names)
        if files is not None:
            return "sha256:" + ",".join(f"{p.name}={file_sha256(p)}" for p in files.values())
    return common.fingerprint(config, remotes)


@contextlib.contextmanager
def open_with_counts(path: pathlib.Path, config: ml_collections.ConfigDict,
                     fedjax_names: Mapping[str, str] | None = None,
                     ) -> Iterator[tuple[common.Reader, dict[str, tuple[int, int]]]]:
    """Like `_tff_common.open_source`, also yielding the SQLite file's `{split: (clients, examples)}`.

    The counts come from the `client_metadata` table; they are empty for the
    legacy HDF5 layout (which has none). With `fedjax_names` ({upstream split:
    FedJAX file name}), FedJAX's per-split files are read too (see `fedjax_files`),
    their counts taken from the rows' `num_examples`.
    """
    files = fedjax_files(path, fedjax_names) if fedjax_names else None
    if files is not None:
        common.say(f"reading FedJAX's SQLite files {', '.join(str(p) for p in files.values())}")
        yield _fedjax_reader(files), {split: fedjax_sqlite.table_counts(p) for split, p in files.items()}
        return
    if common.source_kind(path) == "sqlite":
        with tff.open_sqlite(path, tmp_dir=cache_dir(config.cache_dir), progress=common.say) as db:
            yield (lambda split, _h5_name, features: db.clients(split, features)), db.split_counts()
        return
    with common.open_source(path, config) as read:
        yield read, {}


@contextlib.contextmanager
def open_counted(path: pathlib.Path, config: ml_collections.ConfigDict, splits: Mapping[str, tuple[str, str]],
                 feature: str, hints: Mapping[str, tuple[str, str]] | None = None,
                 ) -> Iterator[tuple[common.Reader, dict[str, tuple[int, int]]]]:
    """`open_with_counts` for TFF layouts, with counts for the HDF5 layouts too.

    `splits` maps output split -> (SQLite split, .h5 file name); the counts
    come back keyed by output split: from `client_metadata` (SQLite) or from
    the .h5 files' shapes of `feature` (HDF5), before any client is read;
    a split whose file or metadata is missing has none (reading it then
    fails with its own error). `hints` as in `common.open_source`.
    """
    if common.source_kind(path) == "sqlite":
        with open_with_counts(path, config) as (read, counts):
            yield read, {split: counts[upstream] for split, (upstream, _) in splits.items() if upstream in counts} \
                if counts else {}
        return
    h5: dict[str, tuple[int, int]] = {}
    with common.open_source(path, config, h5, feature, hints=hints) as read:
        yield read, {split: h5[name] for split, (_, name) in splits.items() if name in h5}


def check_published(config: ml_collections.ConfigDict, source: pathlib.Path, split: str, what: str,
                    got: tuple[int, int], want: tuple[int, int]) -> None:
    """Raises (or warns, with check_counts=False) if `got` (clients, `what`) differs from the published `want`."""
    if tuple(got) == tuple(want):
        return
    message = (f"{source}: split {split!r} has {got[0]:,} clients / {got[1]:,} {what}, but the upstream dataset "
               f"has {want[0]:,} / {want[1]:,}")
    if config.check_counts:
        raise ValueError(message + " (--config.check_counts=False accepts a modified or partial file)")
    warnings.warn(message, stacklevel=2)


def check_metadata(config: ml_collections.ConfigDict, source: pathlib.Path, counts: Mapping[str, tuple[int, int]],
                   published: Mapping[str, tuple[int, int]], splits: Mapping[str, str], what: str) -> None:
    """Compares a SQLite file's client_metadata counts with the published ones, before reading clients, so
    a wrong file fails at once.

    `splits` maps output split -> upstream SQLite split name. No-op without counts (HDF5), and with
    check_counts=False: a mismatch is then one warning per split, from the check of what was
    read or written (a warning here too would say the same thing twice).
    """
    if not counts or not config.check_counts:
        return
    for split, upstream in splits.items():
        check_published(config, source, split, what, counts.get(upstream, (0, 0)), published[split])
