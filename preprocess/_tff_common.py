"""Shared plumbing of the recipes that read TensorFlow Federated files (emnist, cifar100, ...).

Not a recipe. A TFF recipe has the config keys of `add_source_keys` and calls:

    path = resolve_source(config, REMOTES)          # config.source, or a verified download
    with open_source(path, config) as read:         # decompresses / extracts once
        for client_id, data in read(sqlite_split, h5_file, {"pixels": (28, 28), ...}):
            ...

`REMOTES` maps a download format (`sqlite` or `h5`) to a `Remote` (URL and
pinned sha256/size). A format without a pinned sha256 is only downloaded
when the user supplies one (`--config.sha256=...`).
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Callable, Iterator, Mapping

import ml_collections
import numpy as np

from fedstream.data import tff
from fedstream.data.download import Remote, cache_dir, fetch
from fedstream.data.format import file_sha256

TFF_BASE_URL = "https://storage.googleapis.com/tff-datasets-public/"

Reader = Callable[[str, str, tff.Features], Iterator[tuple[str, tff.ClientData]]]


def say(line: str) -> None:
    """Progress on stderr (the driver's own progress goes to stdout)."""
    print(line, file=sys.stderr, flush=True)


def add_source_keys(c: ml_collections.ConfigDict, default_download: str) -> None:
    """The config keys every TFF recipe has."""
    c.source = ""  # a local upstream file (.sqlite.lzma, .sqlite, legacy .tar.bz2 or a directory of .h5); '' = download
    c.download = default_download  # what to download when source is '': 'sqlite' (current) or 'h5' (legacy archive)
    c.sha256 = ""  # sha256 for the download; needed where none is pinned, else it must equal the pin
    c.cache_dir = ""  # downloads and temporary files; '' = $FEDSTREAM_CACHE or ~/.cache/fedstream
    c.check_counts = True  # False: a client/example count differing from upstream's is a warning, not an error


def source_kind(path: pathlib.Path) -> str:
    """'sqlite' (.sqlite, .sqlite.lzma/.xz), 'h5-archive' (.tar.bz2, .tar, .tgz ...) or 'h5-dir' (a directory)."""
    name = path.name.lower()
    if path.is_dir():
        return "h5-dir"
    if name.endswith((".sqlite", ".sqlite.lzma", ".sqlite.xz", ".db", ".lzma")):
        return "sqlite"
    if name.endswith((".tar.bz2", ".tbz2", ".tar", ".tar.gz", ".tgz")):
        return "h5-archive"
    raise ValueError(f"{path}: unknown kind of file; give a TFF .sqlite.lzma or .sqlite file, a legacy .tar.bz2 "
                     "archive of .h5 files, or a directory holding the extracted .h5 files")


def _remote(config: ml_collections.ConfigDict, remotes: Mapping[str, Remote]) -> Remote:
    if config.download not in remotes:
        raise ValueError(f"config.download must be one of {', '.join(sorted(remotes))}, got {config.download!r}")
    remote = remotes[config.download]
    pin = config.sha256.strip().lower()
    if pin and remote.sha256 and pin != remote.sha256:
        raise ValueError(f"config.sha256 {pin} differs from the sha256 pinned for {remote.url} ({remote.sha256})")
    if not pin and not remote.sha256:
        raise ValueError(f"no sha256 is pinned for {remote.url}: pass --config.sha256=<its sha256> to download "
                         "and verify it, or download it yourself and pass --source FILE")
    return Remote(remote.url, sha256=pin or remote.sha256, size=remote.size)


def resolve_source(config: ml_collections.ConfigDict, remotes: Mapping[str, Remote]) -> pathlib.Path:
    """`config.source` if set (it must exist), else the verified cached download of `remotes[config.download]`."""
    if config.source:
        path = pathlib.Path(config.source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file (config.source)")
        return path
    remote = _remote(config, remotes)
    if source_kind(pathlib.Path(remote.filename)) != "sqlite":
        tff.require_h5py()  # fail before a long download that could not be read
    return fetch(remote, config.cache_dir, progress=say)


def fingerprint(config: ml_collections.ConfigDict, remotes: Mapping[str, Remote]) -> str:
    """The identity of the input: the pinned sha256 of the download, or the sha256 of the local file(s)."""
    if not config.source:
        return f"sha256:{_remote(config, remotes).sha256}"
    path = pathlib.Path(config.source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (config.source)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".h5")
        return "sha256:" + ",".join(f"{p.name}={file_sha256(p)}" for p in files)
    return f"sha256:{file_sha256(path)}"


@contextlib.contextmanager
def open_source(path: pathlib.Path, config: ml_collections.ConfigDict,
                h5_counts: dict[str, tuple[int, int]] | None = None, count_feature: str = "",
                hints: Mapping[str, tuple[str, str]] | None = None) -> Iterator[Reader]:
    """Yields `read(sqlite_split, h5_file_name, features)`, an iterator of (client_id, data) of one split.

    A `.sqlite.lzma` is decompressed and an archive extracted once, into the
    cache directory, and deleted on exit. For the HDF5 layouts, `h5_counts`
    (a dict, filled before yielding) gets {h5 file name: (clients, examples)}
    of every .h5 file, from the shapes of `count_feature` (no data read).
    `hints` maps an .h5 name to (another name, advice): when the first is
    missing and the second is there (the other variant of the dataset), the
    error ends with the advice.
    """
    kind = source_kind(path)
    tmp = cache_dir(config.cache_dir)
    if kind == "sqlite":
        with tff.open_sqlite(path, tmp_dir=tmp, progress=say) as db:
            yield lambda split, _h5_name, features: db.clients(split, features)
        return
    tff.require_h5py()
    with contextlib.ExitStack() as stack:
        if kind == "h5-archive":
            members = stack.enter_context(tff.extract_h5_archive(path, tmp_dir=tmp, progress=say))
            label = lambda name: f"{path}:{name}"  # noqa: E731
        else:
            members = {p.name: p for p in path.iterdir() if p.suffix == ".h5"}
            label = lambda name: str(path / name)  # noqa: E731

        if h5_counts is not None:
            for name, member in members.items():
                h5_counts[name] = tff.h5_counts(member, count_feature, name=label(name))

        def read(_split: str, h5_name: str, features: tff.Features) -> Iterator[tuple[str, tff.ClientData]]:
            if h5_name not in members:
                other, advice = (hints or {}).get(h5_name, ("", ""))
                hint = f"; {advice}" if other in members else ""
                raise tff.TFFFormatError(f"{path}: no {h5_name} (has: {', '.join(sorted(members)) or 'no .h5 files'})"
                                         f"{hint}")
            return tff.iter_h5_clients(members[h5_name], features, name=label(h5_name))

        yield read


def check_labels(values: np.ndarray, num_classes: int, where: str, feature: str) -> np.ndarray:
    """`values` after checking they lie in [0, num_classes); `where` names the file, split and client."""
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise tff.TFFFormatError(f"{where}: feature {feature!r} has values {values.min()}..{values.max()}, "
                                 f"expected 0..{num_classes - 1}")
    return values
