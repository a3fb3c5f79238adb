"""Recipe `arrays`: any NumPy `.npz` of feature arrays, split over clients.

Either the file has a 1-D client-id array (`client_key`), and examples are
grouped by it (clients in order of first appearance, examples in file order
within a client; the ids become the client ids, bytes decoded as UTF-8), or
a partitioner splits the examples: `iid`, `dirichlet` (label skew, `alpha`,
`min_examples`) or `shards` (McMahan et al., `shards_per_client`), both of
the latter on the labels `label_key`; clients are then `client_00000`, ....

Each client's examples are then split into `train` and `test` like the
digits recipe (shuffled with seed (seed, 1), last ceil(test_fraction * n) to
test); test_fraction 0 writes only `train`, in file order.

Features: the keys in `features` (default: every array but the client ids),
stored with their per-example shape (all dimensions after the first) and
dtype, except that floating arrays are converted to `float_dtype`
(float32 by default; '' keeps them). Arrays are read with
allow_pickle=False: object arrays are refused. The file's sha256 is the
input fingerprint, so rerunning after the file changed needs --force.

    fedstream preprocess arrays --output data/mine --config.path=mine.npz \
        --config.partitioner=dirichlet --config.alpha=0.3 --config.num_clients=50

On Apache Beam (`--runner`, docs/beam.md) the assignment (`assignment`) is computed once on the
driver from the ids or labels alone, and workers read their clients' rows (memory-mapped from an
uncompressed .npz); the content digest equals this route's.
"""

from __future__ import annotations

import math
import zipfile
from typing import Iterator

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema, file_sha256
from fedstream.data.partition import dirichlet_label_partition, iid_partition, shards_partition

SOURCE = "a user-provided .npz file (provenance and license are the user's)"
PARTITIONERS = ("iid", "dirichlet", "shards")


def get_config() -> ml_collections.ConfigDict:
    """Knobs; `path` is required."""
    c = ml_collections.ConfigDict()
    c.path = ""  # the .npz file (required)
    c.features = ""  # comma-separated keys to store; '' = all but client_key
    c.label_key = "y"  # labels for the dirichlet and shards partitioners
    c.client_key = ""  # 1-D array of client ids; '' = use the partitioner
    c.partitioner = "iid"  # iid | dirichlet | shards
    c.num_clients = 10
    c.alpha = 0.5
    c.min_examples = 1
    c.shards_per_client = 2
    c.test_fraction = 0.0
    c.float_dtype = "float32"  # floating features are stored as this ('' = keep)
    c.seed = 0
    return c


def _headers(config: ml_collections.ConfigDict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """dtype and shape of every array in the file, from the .npy headers only (no data read)."""
    if not config.path:
        raise ValueError("recipe arrays needs --config.path=FILE.npz")
    try:
        with zipfile.ZipFile(config.path) as z:
            out = {}
            for member in z.namelist():
                if not member.endswith(".npy"):
                    continue
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                out[member[: -len(".npy")]] = (dtype, shape)
            return out
    except FileNotFoundError:
        raise ValueError(f"{config.path}: no such file") from None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{config.path}: not a readable .npz file ({e})") from None


def _keys(config: ml_collections.ConfigDict) -> tuple[list[str], dict[str, tuple[np.dtype, tuple[int, ...]]]]:
    """The feature keys, after checking every array the config needs (names the file and key on error)."""
    if config.partitioner not in PARTITIONERS and not config.client_key:
        raise ValueError(f"config.partitioner must be one of {', '.join(PARTITIONERS)}, got {config.partitioner!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"config.seed must be an integer >= 0, got {config.seed!r}")
    if not 0.0 <= config.test_fraction < 1.0:
        raise ValueError(f"config.test_fraction must be in [0, 1), got {config.test_fraction}")
    headers = _headers(config)
    features = [k.strip() for k in config.features.split(",") if k.strip()] or [
        k for k in headers if k != config.client_key]
    if not features:
        raise ValueError(f"{config.path}: no arrays to store as features (arrays: {', '.join(headers) or 'none'})")
    if config.client_key in features:
        raise ValueError(f"{config.path}: client_key {config.client_key!r} cannot also be a feature")
    needed = list(features)
    if config.client_key:
        needed.append(config.client_key)
    elif config.partitioner in ("dirichlet", "shards") and config.label_key not in needed:
        needed.append(config.label_key)
    for key in needed:
        if key not in headers:
            raise ValueError(f"{config.path}: no array {key!r} (arrays: {', '.join(headers) or 'none'})")
        dtype, shape = headers[key]
        if dtype.hasobject:
            raise ValueError(f"{config.path}: array {key!r} is an object array, which needs pickle; "
                             "store plain numeric arrays")
        if not shape:
            raise ValueError(f"{config.path}: array {key!r} is a scalar; arrays need a leading example dimension")
    lengths = {k: headers[k][1][0] for k in needed}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{config.path}: arrays have different leading dimensions {lengths}")
    if config.client_key:
        dtype, shape = headers[config.client_key]
        if len(shape) != 1 or dtype.kind not in "iuUS":
            raise ValueError(f"{config.path}: client ids {config.client_key!r} must be a 1-D integer or string array")
    for key in features:
        if headers[key][0].kind not in "biuf":
            raise ValueError(f"{config.path}: array {key!r} has dtype {headers[key][0]}; features must be "
                             "bool, integer or float")
    return features, headers


def _stored_dtype(config: ml_collections.ConfigDict, dtype: np.dtype) -> np.dtype:
    if dtype.kind == "f" and config.float_dtype:
        try:
            target = np.dtype(config.float_dtype)
        except TypeError:
            target = np.dtype("V1")  # not a dtype name: refused below
        if target.kind != "f":
            raise ValueError(f"config.float_dtype must be a float dtype such as float32, got {config.float_dtype!r}")
        return target
    return dtype


def schema(config: ml_collections.ConfigDict) -> Schema:
    """Inferred from the arrays' dtypes (floats as float_dtype) and per-example shapes."""
    features, headers = _keys(config)
    return {k: FeatureSpec(_stored_dtype(config, headers[k][0]).name, headers[k][1][1:]) for k in features}


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """sha256 of the .npz file: a changed file is not 'up to date'."""
    if not config.path:
        raise ValueError("recipe arrays needs --config.path=FILE.npz")
    try:
        return f"sha256:{file_sha256(config.path)}"
    except FileNotFoundError:
        raise ValueError(f"{config.path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{config.path}: cannot read ({e.strerror or e})") from None


def _load(config: ml_collections.ConfigDict, keys: list[str]) -> dict[str, np.ndarray]:
    with np.load(config.path, allow_pickle=False) as f:
        return {k: f[k] for k in dict.fromkeys(keys)}


def _id_text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _clients(config: ml_collections.ConfigDict, arrays: dict[str, np.ndarray], n: int) -> list[tuple[str, np.ndarray]]:
    """(client id, example indices in file order) per client; `arrays` holds the ids or labels it needs."""
    if config.client_key:
        ids = arrays[config.client_key]
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        by_group = np.argsort(inverse, kind="stable")  # grouped, file order within a group
        groups = np.split(by_group, np.cumsum(np.bincount(inverse, minlength=len(first)))[:-1])
        out = []
        for g in np.argsort(first, kind="stable"):
            try:
                out.append((_id_text(ids[first[g]]), groups[g]))
            except UnicodeDecodeError:
                raise ValueError(f"{config.path}: client id {ids[first[g]]!r} in {config.client_key!r} "
                                 "is not UTF-8") from None
        return out
    if isinstance(config.num_clients, int) and config.num_clients > max(n, 1):
        # More clients than examples leaves clients empty, and a huge count would only spend memory
        # and hours writing empty clients.
        raise ValueError(f"{config.path}: config.num_clients={config.num_clients} exceeds its {n} examples")
    if config.partitioner == "iid":
        parts = iid_partition(n, config.num_clients, config.seed)
    else:
        labels = arrays[config.label_key]
        if labels.ndim != 1:
            raise ValueError(f"{config.path}: labels {config.label_key!r} must be 1-D, got shape {labels.shape}")
        if config.partitioner == "dirichlet":
            parts = dirichlet_label_partition(labels, config.num_clients, config.alpha, config.seed,
                                              min_examples=config.min_examples)
        else:
            parts = shards_partition(labels, config.num_clients, config.shards_per_client, config.seed)
    width = max(len(str(config.num_clients - 1)), 5)
    return [(f"client_{i:0{width}d}", part) for i, part in enumerate(parts)]


def assignment_keys(config: ml_collections.ConfigDict) -> list[str]:
    """The arrays the client assignment reads: the client ids, the labels (dirichlet, shards) or none (iid)."""
    if config.client_key:
        return [config.client_key]
    return [config.label_key] if config.partitioner in ("dirichlet", "shards") else []


def assignment(config: ml_collections.ConfigDict, arrays: dict[str, np.ndarray],
               n: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """`(split, client id, example indices)` in writing order: each client's 'train', then its 'test'
    when test_fraction > 0. Reads only the `assignment_keys` arrays, so the Beam route computes it once
    on the driver and ships the indices to workers."""
    rng = np.random.default_rng([config.seed, 1])
    for client_id, idx in _clients(config, arrays, n):
        if config.test_fraction > 0:
            shuffled = rng.permutation(idx)
            num_test = math.ceil(config.test_fraction * len(idx))
            yield "train", client_id, shuffled[: len(idx) - num_test]
            yield "test", client_id, shuffled[len(idx) - num_test:]
        else:
            yield "train", client_id, idx


def num_examples(config: ml_collections.ConfigDict) -> int:
    """The examples in the file (the leading dimension of its feature arrays, from the headers)."""
    features, headers = _keys(config)
    return int(headers[features[0]][1][0])


def stored(config: ml_collections.ConfigDict, key: str, values: np.ndarray) -> np.ndarray:
    """`values` of feature `key` as stored (floats as float_dtype)."""
    return values.astype(_stored_dtype(config, values.dtype), copy=False)


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields each client's examples ('train', then 'test' when test_fraction > 0)."""
    features, headers = _keys(config)
    arrays = _load(config, features + assignment_keys(config))
    for key in features:
        arrays[key] = stored(config, key, arrays[key])
    for split, client_id, idx in assignment(config, arrays, int(headers[features[0]][1][0])):
        yield split, client_id, {k: arrays[k][idx] for k in features}
