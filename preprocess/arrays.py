"""Recipe `arrays`: any NumPy `.npz` of feature arrays, split over clients.

Either the file has a client-id array (`client_key`), and examples are
grouped by it (clients in order of first appearance, examples in file
order), or a partitioner splits the examples: `iid`, `dirichlet` (label skew,
`alpha`), or `shards` (McMahan et al., `shards_per_client`). Each client's
examples are then split into `train` and `test` like the digits recipe
(shuffled, last ceil(test_fraction * n) to test); test_fraction 0 writes only
`train`. Arrays are loaded with allow_pickle=False: object arrays are refused.

    fedstream preprocess arrays --output data/mine --config.path=mine.npz \
        --config.partitioner=dirichlet --config.alpha=0.3 --config.num_clients=50
"""

from __future__ import annotations

import math
from typing import Iterator

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema
from fedstream.data.partition import dirichlet_label_partition, iid_partition, shards_partition

SOURCE = "a user-provided .npz file"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.path = ""  # the .npz file (required)
    c.features = ""  # comma-separated keys to keep; '' = all but client_key
    c.label_key = "y"  # used by the dirichlet and shards partitioners
    c.client_key = ""  # array of client ids; '' = use the partitioner
    c.partitioner = "iid"  # iid | dirichlet | shards
    c.num_clients = 10
    c.alpha = 0.5
    c.shards_per_client = 2
    c.min_examples = 1
    c.test_fraction = 0.0
    c.float_dtype = "float32"  # floating features are stored as this ('' = keep)
    c.seed = 0
    return c


def _load(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    if not config.path:
        raise ValueError("recipe arrays needs --config.path=FILE.npz")
    try:
        with np.load(config.path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        raise ValueError(f"{config.path}: cannot load without pickle ({e}); store plain numeric arrays") from None
    except OSError as e:
        raise ValueError(f"{config.path}: cannot read ({e})") from None
    keys = [k.strip() for k in config.features.split(",") if k.strip()] or [
        k for k in arrays if k != config.client_key]
    needed = keys + ([config.client_key] if config.client_key else [])
    for key in needed:
        if key not in arrays:
            raise ValueError(f"{config.path}: no array {key!r} (arrays: {', '.join(arrays)})")
    lengths = {k: len(arrays[k]) for k in needed}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{config.path}: arrays have different leading dimensions {lengths}")
    out = {}
    for key in needed:
        value = arrays[key]
        if key != config.client_key and value.dtype.kind == "f" and config.float_dtype:
            value = value.astype(config.float_dtype)
        if key != config.client_key and value.dtype.kind not in "biuf":
            raise ValueError(f"{config.path}: array {key!r} has dtype {value.dtype}; features must be numeric")
        out[key] = value
    return out


def schema(config: ml_collections.ConfigDict) -> Schema:
    arrays = _load(config)
    return {k: FeatureSpec(v.dtype.name, v.shape[1:]) for k, v in arrays.items() if k != config.client_key}


def _clients(config: ml_collections.ConfigDict, arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    if config.client_key:
        ids = arrays[config.client_key]
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        return [(str(ids[first[g]]), np.flatnonzero(inverse == g)) for g in order]
    if config.partitioner == "iid":
        parts = iid_partition(n, config.num_clients, config.seed)
    elif config.partitioner in ("dirichlet", "shards"):
        if config.label_key not in arrays:
            raise ValueError(f"{config.path}: partitioner {config.partitioner!r} needs labels {config.label_key!r}")
        labels = arrays[config.label_key]
        parts = (dirichlet_label_partition(labels, config.num_clients, config.alpha, config.seed,
                                           min_examples=config.min_examples)
                 if config.partitioner == "dirichlet"
                 else shards_partition(labels, config.num_clients, config.shards_per_client, config.seed))
    else:
        raise ValueError(f"config.partitioner must be iid, dirichlet or shards, got {config.partitioner!r}")
    width = max(len(str(config.num_clients - 1)), 5)
    return [(f"client_{i:0{width}d}", part) for i, part in enumerate(parts)]


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    arrays = _load(config)
    features = [k for k in arrays if k != config.client_key]
    rng = np.random.default_rng([config.seed, 1])
    for client_id, idx in _clients(config, arrays):
        if config.test_fraction > 0:
            shuffled = rng.permutation(idx)
            num_test = math.ceil(config.test_fraction * len(idx))
            train, test = shuffled[: len(idx) - num_test], shuffled[len(idx) - num_test:]
            yield "train", client_id, {k: arrays[k][train] for k in features}
            yield "test", client_id, {k: arrays[k][test] for k in features}
        else:
            yield "train", client_id, {k: arrays[k][idx] for k in features}
