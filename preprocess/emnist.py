"""Recipe `emnist`: Federated EMNIST of TensorFlow Federated, one client per writer.

TFF's `tff.simulation.datasets.emnist` (LEAF's FEMNIST preprocessing of
NIST Special Database 19, grouped by writer; each writer's examples split
into train and test, every writer in both). Two upstream layouts are read:

- `emnist_all.sqlite.lzma` (TFF's current file): splits `all_train`/`all_test`
  or `digits_only_train`/`digits_only_test`; tf.Example features `pixels`
  (784 floats) and `label` (int64);
- the legacy archives `fed_emnist.tar.bz2` (62 classes) and
  `fed_emnist_digitsonly.tar.bz2` (10 classes) of HDF5 files
  `fed_emnist[_digitsonly]_{train,test}.h5`, `examples/<writer>/{pixels,label}`
  (needs h5py: `pip install 'fedstream[tff-h5]'`); or a directory of those .h5 files.

`--source FILE` reads a local copy; otherwise the file is downloaded into the
cache (`cache_dir`, $FEDSTREAM_CACHE or ~/.cache/fedstream) and verified.
The default download is the legacy archive, the EMNIST file whose sha256
is pinned; the SQLite file has no pinned checksum, so
`--config.download=sqlite` also needs `--config.sha256=<hex>`.

Output, splits `train` and `test` with TFF's client ids (writer ids such as
`f0000_14`), clients in id order, examples in upstream order:

- `x` float32 (28, 28, 1): TFF's pixels unchanged, in [0, 1] with
  **1.0 = background (white) and 0.0 = ink**, the inverse of MNIST. TFF's
  own baselines train on this as is; FedJAX feeds `1 - x`. Invert in the
  model or pipeline if you want MNIST polarity.
- `y` int32: 0-9 digits, 10-35 upper-case A-Z, 36-61 lower-case a-z
  (`only_digits=True`: 0-9 only).

Sizes (TFF): 62 classes, 3,400 clients, 671,585 train / 77,483 test examples;
`only_digits=True`: 3,383 clients, 341,873 / 40,832. These are checked
before converting, against the SQLite file's `client_metadata` or the .h5
files' shapes, and again after writing (`check_counts=False` turns a
mismatch into one warning, after writing, e.g. for a modified file).

    fedstream preprocess emnist --output data/emnist --source emnist_all.sqlite.lzma
    fedstream preprocess emnist --output data/emnist_digits --config.only_digits=True
"""

from __future__ import annotations

import re

from typing import Iterator

import ml_collections
import numpy as np

from fedstream.data.download import Remote
from fedstream.data.format import FeatureSpec, Schema
from fedstream.recipes import _tff_common as common
from fedstream.recipes import _tff_text

SOURCE = ("Federated EMNIST of TensorFlow Federated (tff.simulation.datasets.emnist; LEAF FEMNIST preprocessing, "
          "Caldas et al. 2018, of EMNIST, Cohen et al. 2017, from NIST Special Database 19, grouped by writer), "
          "files from storage.googleapis.com/tff-datasets-public; data under NIST's terms for SD 19, TFF code "
          "Apache-2.0. Pixels as TFF stores them: float32 in [0, 1], 1.0 = background")

REMOTES = {
    False: {
        "sqlite": Remote(common.TFF_BASE_URL + "emnist_all.sqlite.lzma"),
        "h5": Remote(common.TFF_BASE_URL + "fed_emnist.tar.bz2",
                     sha256="fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0"),
    },
    True: {
        "sqlite": Remote(common.TFF_BASE_URL + "emnist_all.sqlite.lzma"),
        "h5": Remote(common.TFF_BASE_URL + "fed_emnist_digitsonly.tar.bz2",
                     sha256="55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b"),
    },
}
# (clients, examples) per split, from TFF's documentation.
COUNTS = {False: {"train": (3400, 671_585), "test": (3400, 77_483)},
          True: {"train": (3383, 341_873), "test": (3383, 40_832)}}
FEATURES = {"pixels": (28, 28), "label": ()}


def get_config() -> ml_collections.ConfigDict:
    """`only_digits` (False: 62 classes) and the TFF source keys (source, download, sha256, cache_dir, ...)."""
    c = ml_collections.ConfigDict()
    c.only_digits = False
    common.add_source_keys(c, default_download="h5")
    return c


def num_classes(config: ml_collections.ConfigDict) -> int:
    """10 with only_digits, else 62."""
    return 10 if config.only_digits else 62


def schema(config: ml_collections.ConfigDict) -> Schema:
    """`x` float32 (28, 28, 1), 1.0 = background; `y` int32 label; `domain_id` int32 (see `writer_domain`)."""
    return {"x": FeatureSpec("float32", (28, 28, 1)), "y": FeatureSpec("int32", ()),
            "domain_id": FeatureSpec("int32", ())}


_WRITER = re.compile(r"^f(\d{4})_\d{2}$")


def writer_domain(client_id: str) -> int:
    """FedJAX's EMNIST domains for AgnosticFedAvg: writers 2100-2599 (high school) -> 0, others (census) -> 1.

    Client ids are TFF's writer ids `fNNNN_NN`; other ids (e.g. test fixtures) fall in domain 1.
    """
    match = _WRITER.match(client_id)
    return 0 if match and 2100 <= int(match.group(1)) <= 2599 else 1


def upstream_names(config: ml_collections.ConfigDict, split: str) -> tuple[str, str]:
    """(SQLite split name, legacy .h5 file name) of output split `train` or `test`."""
    if config.only_digits:
        return f"digits_only_{split}", f"fed_emnist_digitsonly_{split}.h5"
    return f"all_{split}", f"fed_emnist_{split}.h5"


def variant_hints() -> dict[str, tuple[str, str]]:
    """For `open_source`: a legacy .h5 file of one variant missing while the other variant's is there
    (the digits-only archive read without only_digits, or the reverse) names the flag to set."""
    hints = {}
    for split in ("train", "test"):
        digits, full = f"fed_emnist_digitsonly_{split}.h5", f"fed_emnist_{split}.h5"
        hints[full] = (digits, "this is the digits-only file: set only_digits=True (--config.only_digits=True)")
        hints[digits] = (full, "this is the 62-class file: set only_digits=False, or use the digits-only archive")
    return hints


def counts_hint(config: ml_collections.ConfigDict, counts: dict[str, tuple[int, int]]) -> str:
    """Advice when the written (clients, examples) per split are those of the other variant."""
    other = not bool(config.only_digits)
    if {split: tuple(c) for split, c in counts.items()} == COUNTS[other]:
        return (f"; these are the counts of the {'digits-only' if other else '62-class'} file: set "
                f"only_digits={other} (--config.only_digits={other})")
    return ""


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields every `train` client, then every `test` client, in client id order."""
    path = common.resolve_source(config, REMOTES[bool(config.only_digits)])
    classes = num_classes(config)
    splits = {split: upstream_names(config, split) for split in ("train", "test")}
    with _tff_text.open_counted(path, config, splits, "label", hints=variant_hints()) as (read, counts):
        # Before converting, so a wrong or partial file fails at once (with check_counts=False, the check
        # after writing warns once).
        hint = counts_hint(config, counts) if len(counts) == len(splits) else ""
        for split, got in counts.items() if config.check_counts else ():
            try:
                _tff_text.check_published(config, path, split, "examples", got,
                                          COUNTS[bool(config.only_digits)][split])
            except ValueError as e:
                raise ValueError(f"{e}{hint}") from None
        for split in ("train", "test"):
            sqlite_split, h5_name = upstream_names(config, split)
            for client_id, data in read(sqlite_split, h5_name, FEATURES):
                pixels = data["pixels"]
                labels = common.check_labels(data["label"], classes, f"{path}: split {split!r}, client {client_id!r}",
                                             "label")
                yield split, client_id, {"x": pixels.reshape(len(pixels), 28, 28, 1), "y": labels,
                                         "domain_id": np.full(len(labels), writer_domain(client_id), np.int32)}


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 of the local source file(s), or the pinned sha256 of the download."""
    return common.fingerprint(config, REMOTES[bool(config.only_digits)])


def expected_counts(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """TFF's documented (clients, examples) per split."""
    return dict(COUNTS[bool(config.only_digits)])
