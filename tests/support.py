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
