"""Shared test helpers: a small in-memory client source."""

from __future__ import annotations

import numpy as np

from fedstream.data.format import FeatureSpec


class InMemorySource:
    """Clients held in memory with the reader's interface (client_sizes, get_client, schema)."""

    def __init__(self, sizes, input_shape=(8, 8, 1), num_classes=10, seed=0):
        rng = np.random.default_rng(seed)
        self.schema = {"x": FeatureSpec("float32", tuple(input_shape)), "y": FeatureSpec("int32", ())}
        self.clients = [
            {"x": rng.normal(size=(int(n), *input_shape)).astype(np.float32),
             "y": rng.integers(0, num_classes, int(n)).astype(np.int32)}
            for n in sizes
        ]

    def client_sizes(self, split):
        return np.array([len(c["y"]) for c in self.clients], np.int64)

    def get_client(self, split, client):
        return self.clients[int(client)]


class SplitSource:
    """In-memory clients in named splits, each with an id (`FederatedDataset`'s client_ids, client_sizes, get_client).

    `splits` maps a split name to `{client_id: num_examples}`; the same id in
    two splits is the same client (e.g. its train and test data).
    """

    def __init__(self, splits, input_shape=(8, 8, 1), num_classes=10, seed=0):
        rng = np.random.default_rng(seed)
        self.schema = {"x": FeatureSpec("float32", tuple(input_shape)), "y": FeatureSpec("int32", ())}
        self.ids = {name: np.array(list(sizes), dtype=str) for name, sizes in splits.items()}
        self.data = {
            name: [{"x": rng.normal(size=(int(n), *input_shape)).astype(np.float32),
                    "y": rng.integers(0, num_classes, int(n)).astype(np.int32)} for n in sizes.values()]
            for name, sizes in splits.items()
        }

    def client_ids(self, split):
        return self.ids[split]

    def client_sizes(self, split):
        return np.array([len(c["y"]) for c in self.data[split]], np.int64)

    def get_client(self, split, client):
        if isinstance(client, str):
            client = self.ids[split].tolist().index(client)
        return self.data[split][int(client)]
