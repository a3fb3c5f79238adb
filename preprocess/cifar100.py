"""Recipe `cifar100`: Federated CIFAR-100 of TensorFlow Federated (Pachinko Allocation partition).

TFF's `tff.simulation.datasets.cifar100`: CIFAR-100's 50,000 training images
partitioned over 500 clients and its 10,000 test images over 100 clients,
100 images each, by a two-level Dirichlet (Pachinko Allocation: coarse
labels ~ Dir(0.1) per client, fine given coarse ~ Dir(10)); a true
partition. Two upstream layouts are read:

- `cifar100.sqlite.lzma` (TFF's current file, the default download, size and
  sha256 pinned): splits `train`/`test`; tf.Example features `image` (3,072
  int64), `label`, `coarse_label` (int64);
- the legacy archive `fed_cifar100.tar.bz2` (sha256 pinned) of
  `fed_cifar100_{train,test}.h5`, `examples/<id>/{image,label,coarse_label}`
  (needs h5py: `pip install 'fedstream[tff-h5]'`); or a directory of those .h5 files.

`--source FILE` reads a local copy; otherwise the file is downloaded into the
cache (`cache_dir`, $FEDSTREAM_CACHE or ~/.cache/fedstream) and verified.

Output, splits `train` (ids "0".."499") and `test` ("0".."99"), TFF's client
ids unchanged (so in string order: "0", "1", "10", "100", ...):

- `x` uint8 (32, 32, 3): the RGB image, 0-255 (normalize in the pipeline);
- `y` int32: the fine label, 0-99;
- `coarse_label` int32: the super-class, 0-19.

Counts (500 / 50,000 train, 100 / 10,000 test) are checked after writing;
`check_counts=False` makes a mismatch a warning.
"""

from __future__ import annotations

from typing import Iterator

import ml_collections
import numpy as np

from fedstream.data.download import Remote
from fedstream.data.format import FeatureSpec, Schema
from fedstream.recipes import _tff_common as common

SOURCE = ("Federated CIFAR-100 of TensorFlow Federated (tff.simulation.datasets.cifar100: CIFAR-100, Krizhevsky "
          "2009, partitioned by Pachinko Allocation over 500 train / 100 test clients), files from "
          "storage.googleapis.com/tff-datasets-public; CIFAR-100 has no formal license (cite Krizhevsky 2009), "
          "TFF code Apache-2.0")

REMOTES = {
    "sqlite": Remote(common.TFF_BASE_URL + "cifar100.sqlite.lzma",
                     sha256="23d3916c9caa33395737ee560cc7cb77bbd05fc7b73647ee7be3a7e764172939", size=153_019_920),
    "h5": Remote(common.TFF_BASE_URL + "fed_cifar100.tar.bz2",
                 sha256="e8575e22c038ecef1ce6c7d492d7abee7da13b1e1ba9b70a7fc18531ba7590de"),
}
COUNTS = {"train": (500, 50_000), "test": (100, 10_000)}
FEATURES = {"image": (32, 32, 3), "label": (), "coarse_label": ()}


def get_config() -> ml_collections.ConfigDict:
    """The TFF source keys (source, download, sha256, cache_dir, check_counts)."""
    c = ml_collections.ConfigDict()
    common.add_source_keys(c, default_download="sqlite")
    return c


def schema(config: ml_collections.ConfigDict) -> Schema:
    """`x` uint8 (32, 32, 3), `y` int32 fine label, `coarse_label` int32."""
    return {"x": FeatureSpec("uint8", (32, 32, 3)), "y": FeatureSpec("int32", ()),
            "coarse_label": FeatureSpec("int32", ())}


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields every `train` client, then every `test` client, in client id (string) order."""
    path = common.resolve_source(config, REMOTES)
    with common.open_source(path, config) as read:
        for split in ("train", "test"):
            for client_id, data in read(split, f"fed_cifar100_{split}.h5", FEATURES):
                where = f"{path}: split {split!r}, client {client_id!r}"
                image = common.check_labels(data["image"], 256, where, "image")  # int64 in SQLite: must fit uint8
                yield split, client_id, {
                    "x": image.astype(np.uint8, copy=False),
                    "y": common.check_labels(data["label"], 100, where, "label"),
                    "coarse_label": common.check_labels(data["coarse_label"], 20, where, "coarse_label"),
                }


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 of the local source file(s), or the pinned sha256 of the download."""
    return common.fingerprint(config, REMOTES)


def expected_counts(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """TFF's (clients, examples) per split."""
    return dict(COUNTS)
