"""Partitioners: split a centralized dataset's examples over simulated clients.

Each returns a list with one int64 index array per client; together they
cover every example exactly once. Each is a pure function of its seed.
"""

from __future__ import annotations

import numpy as np


def _check_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise ValueError(f"cannot split {num_examples} examples over {num_clients} clients")


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into `num_clients` parts whose sizes differ by at most one."""
    _check_clients(num_clients, num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [part.astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_label_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_examples: int = 1, max_attempts: int = 1000
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al., 2019; Yurochkin et al., 2019).

    For every class k, proportions p_k ~ Dirichlet(alpha * 1_clients) are drawn
    and the class's shuffled examples are cut at the cumulative proportions.
    Small alpha gives clients dominated by few classes; large alpha tends to
    IID. The whole draw is repeated until every client has at least
    `min_examples` examples (at most `max_attempts` times).
    """
    labels = np.asarray(labels)
    _check_clients(num_clients, len(labels))
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_examples * num_clients > len(labels):
        raise ValueError(f"min_examples={min_examples} x {num_clients} clients exceeds {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k in classes:
            members = rng.permutation(np.flatnonzero(labels == k))
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(r) for r in result) >= min_examples:
            return result
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} clients "
                     f">= {min_examples} examples in {max_attempts} attempts; lower num_clients or min_examples")


def shards_partition(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Examples are sorted by label (ties in random order), cut into
    `num_clients * shards_per_client` equal shards, and each client receives
    `shards_per_client` random shards. Leftover examples (when the count is
    not divisible) go one each to the first shards.
    """
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    _check_clients(num_shards, len(labels))
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(labels))
    order = tiebreak[np.argsort(labels[tiebreak], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in assignment]
