"""Recipe `digits`: the embedded 8x8 handwritten digits, label-skewed over clients.

1,797 grey-scale 8x8 images of the digits 0-9 (pixel values 0..16), the test
set of the UCI "Optical Recognition of Handwritten Digits" data as bundled
with scikit-learn, shipped in `assets/digits.csv.gz` (64 pixels then the
label per row). No download.

All examples are partitioned over `num_clients` clients with a seeded
Dirichlet(alpha) label-skew partitioner; then each client's examples are
shuffled and its last ceil(test_fraction * n) go to the `test` split (the
LEAF convention), so `train` and `test` have the same client ids.
Features: `x` float32 (8, 8, 1) = pixels / 16, `y` int32 label.
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
from typing import Iterator

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema
from fedstream.data.partition import dirichlet_label_partition

SOURCE = ("UCI ML Repository, Optical Recognition of Handwritten Digits (Alpaydin & Kaynak, 1998), test set of "
          "1,797 images, CC BY 4.0; the copy bundled with scikit-learn (BSD-3-Clause), embedded in fedstream")
NUM_EXAMPLES = 1797


def get_config() -> ml_collections.ConfigDict:
    """The recipe's knobs: 100 clients (~18 examples each), Dirichlet(0.5) label skew, 20% test."""
    c = ml_collections.ConfigDict()
    c.num_clients = 100
    c.alpha = 0.5
    c.min_examples = 5  # every client gets >= 5 examples, so >= 4 train and >= 1 test at test_fraction 0.2
    c.test_fraction = 0.2
    c.seed = 0
    return c


def schema(config: ml_collections.ConfigDict) -> Schema:
    """`x` float32 (8, 8, 1) in [0, 1], `y` int32 label 0-9."""
    return {"x": FeatureSpec("float32", (8, 8, 1)), "y": FeatureSpec("int32", ())}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The embedded images (float32 [1797, 8, 8, 1] in [0, 1]) and labels (int32)."""
    resource = importlib.resources.files("fedstream.recipes").joinpath("assets/digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (NUM_EXAMPLES, 65):
        raise ValueError(f"assets/digits.csv.gz: expected {NUM_EXAMPLES} rows of 65 values, got {table.shape}")
    return (table[:, :64] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), table[:, 64].astype(np.int32)


def client_splits(config: ml_collections.ConfigDict, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) per client: Dirichlet partition, then a per-client split.

    Indices are rows of the CSV. The per-client split uses its own stream
    (seed, 1), so changing test_fraction does not change the partition.
    """
    if not 0.0 <= config.test_fraction < 1.0:
        raise ValueError(f"config.test_fraction must be in [0, 1), got {config.test_fraction}")
    parts = dirichlet_label_partition(labels, config.num_clients, config.alpha, config.seed,
                                      min_examples=config.min_examples)
    rng = np.random.default_rng([config.seed, 1])
    out = []
    for part in parts:
        shuffled = rng.permutation(part)
        num_test = math.ceil(config.test_fraction * len(shuffled))
        out.append((shuffled[: len(shuffled) - num_test], shuffled[len(shuffled) - num_test:]))
    return out


def client_id(i: int, num_clients: int) -> str:
    """`client_00007`: zero-padded (at least 5 digits) so lexicographic order is numeric order."""
    return f"client_{i:0{max(len(str(num_clients - 1)), 5)}d}"


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields ('train', id, examples) then ('test', id, examples) for each client in order."""
    x, y = load_digits()
    for i, (train, test) in enumerate(client_splits(config, y)):
        client = client_id(i, config.num_clients)
        yield "train", client, {"x": x[train], "y": y[train]}
        yield "test", client, {"x": x[test], "y": y[test]}


def expected_counts(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """Every client in both splits, all 1,797 examples, test = sum of ceil(test_fraction * n_client)."""
    _, y = load_digits()
    sizes = [len(p) for p in dirichlet_label_partition(y, config.num_clients, config.alpha, config.seed,
                                                       min_examples=config.min_examples)]
    num_test = sum(math.ceil(config.test_fraction * n) for n in sizes)
    return {"train": (config.num_clients, NUM_EXAMPLES - num_test), "test": (config.num_clients, num_test)}
