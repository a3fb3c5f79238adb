"""Shared plumbing of the text recipes `shakespeare` and `stackoverflow` (not a recipe).

Builds on `_tff_common` (source resolution, download, legacy HDF5) and adds
what the text recipes need: the upstream `client_metadata` counts of a
SQLite file before any client is read (a wrong file fails in seconds, not
after hours), and the published-count check that honours `check_counts`.
"""

from __future__ import annotations

import contextlib
import pathlib
import warnings
from typing import Iterator, Mapping

import ml_collections

from fedstream.data import tff
from fedstream.data.download import cache_dir
from fedstream.recipes import _tff_common as common


@contextlib.contextmanager
def open_with_counts(path: pathlib.Path,
                     config: ml_collections.ConfigDict) -> Iterator[tuple[common.Reader, dict[str, tuple[int, int]]]]:
    """Like `_tff_common.open_source`, also yielding the SQLite file's `{split: (clients, examples)}`.

    The counts come from the `client_metadata` table; they are empty for the
    legacy HDF5 layout (which has none).
    """
    if common.source_kind(path) == "sqlite":
        with tff.open_sqlite(path, tmp_dir=cache_dir(config.cache_dir), progress=common.say) as db:
            yield (lambda split, _h5_name, features: db.clients(split, features)), db.split_counts()
        return
    with common.open_source(path, config) as read:
        yield read, {}


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
