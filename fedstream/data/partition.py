"""Partitioners: split a centralized dataset's examples over simulated clients.

Each returns a list with one int64 array of example indices per client
(sorted ascending within a client); together they cover every example exactly
once. Each is a pure function of its arguments: all randomness comes from
`np.random.default_rng(seed)`, so the same seed gives the same split.
"""

from __future__ import annotations

import numbers

import numpy as np


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array (one label per example), got shape {labels.shape}")
    return labels


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into `num_clients` parts whose sizes differ by at most one."""
    num_examples = _check_int("num_examples", num_examples, 0)
    num_clients = _check_int("num_clients", num_clients, 1)
    if num_examples < num_clients:
        raise ValueError(f"cannot split {num_examples} examples over {num_clients} clients without empty clients")
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_label_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                              min_examples: int = 1, max_attempts: int = 1000) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al., 2019; Yurochkin et al., 2019).

    Exactly, for one attempt: for every class k in sorted order, the class's
    example indices are shuffled, proportions p_k ~ Dirichlet(alpha * 1_K) are
    drawn over the K clients, and the shuffled list is cut at
    floor(cumsum(p_k)[:-1] * n_k), giving piece j to client j. So each client's
    share of each class has mean 1/K and variance (1/K)(1 - 1/K)/(K alpha + 1):
    small alpha gives clients dominated by a few classes, large alpha tends to IID.

    Min-size rule: if some client ends up with fewer than `min_examples`
    examples, the whole attempt is discarded and redrawn (the RNG stream
    continues), at most `max_attempts` times; then a ValueError is raised.
    `min_examples=0` accepts the first draw (clients may be empty).
    """
    labels = _check_labels(labels)
    num_clients = _check_int("num_clients", num_clients, 1)
    min_examples = _check_int("min_examples", min_examples, 0)
    max_attempts = _check_int("max_attempts", max_attempts, 1)
    if not (isinstance(alpha, numbers.Real) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if min_examples * num_clients > len(labels):
        raise ValueError(f"min_examples={min_examples} x {num_clients} clients exceeds the {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members_of = [np.flatnonzero(labels == k) for k in classes]
    concentration = np.full(num_clients, float(alpha))
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in members_of:
            members = rng.permutation(members)
            proportions = rng.dirichlet(concentration)
            cuts = np.rint(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, np.minimum(cuts, len(members)))):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]
        if min(len(r) for r in result) >= min_examples:
            return result
    raise ValueError(f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples gave every one of {num_clients} "
                     f"clients >= {min_examples} examples in {max_attempts} attempts; "
                     "lower num_clients or min_examples, or raise alpha")


def shards_partition(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Examples are sorted by label (ties in random order), cut into
    `num_clients * shards_per_client` contiguous shards of equal size (when
    the count is not divisible, the first shards hold one example more), and
    each client receives `shards_per_client` shards chosen by a random
    permutation of the shards. With shards that do not straddle two labels,
    a client sees at most `shards_per_client` labels.
    """
    labels = _check_labels(labels)
    num_clients = _check_int("num_clients", num_clients, 1)
    shards_per_client = _check_int("shards_per_client", shards_per_client, 1)
    num_shards = num_clients * shards_per_client
    if len(labels) < num_shards:
        raise ValueError(f"cannot cut {len(labels)} examples into {num_clients} x {shards_per_client} = "
                         f"{num_shards} non-empty shards")
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(labels))
    order = tiebreak[np.argsort(labels[tiebreak], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in assignment]


QUANTITY_DISTRIBUTIONS = ("lognormal", "powerlaw")


def quantity_skew_partition(num_examples: int, num_clients: int, seed: int, *, distribution: str = "lognormal",
                            sigma: float = 1.0, exponent: float = 1.5, min_examples: int = 1) -> list[np.ndarray]:
    """Quantity-skewed split: clients of very different sizes, labels IID.

    Exactly: client weights are drawn i.i.d., `w_i = exp(sigma * z_i)` with
    z_i ~ N(0, 1) (`distribution="lognormal"`: log-sizes normal with standard
    deviation `sigma`; sigma 0 gives equal sizes) or `w_i = 1 / u_i^(1/exponent)`
    with u_i ~ U(0, 1] (`"powerlaw"`: a Pareto law with x_min 1,
    P(w > t) = t^-exponent, heavier-tailed for smaller exponents). Every client
    gets `min_examples`, and the remaining `num_examples - num_clients *
    min_examples` are shared in proportion to the weights, rounded by largest
    remainder (floors first, then one more example to the clients with the
    largest fractional parts, ties to the lower client index), so the sizes
    sum exactly to `num_examples`. A random permutation of the examples is
    then cut into those sizes in client order, so which examples a client
    holds is IID. The weights come first from `np.random.default_rng(seed)`,
    then the permutation.
    """
    num_examples = _check_int("num_examples", num_examples, 0)
    num_clients = _check_int("num_clients", num_clients, 1)
    min_examples = _check_int("min_examples", min_examples, 0)
    if distribution not in QUANTITY_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(QUANTITY_DISTRIBUTIONS)}, got {distribution!r}")
    if not (isinstance(sigma, numbers.Real) and np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not (isinstance(exponent, numbers.Real) and np.isfinite(exponent) and exponent > 0):
        raise ValueError(f"exponent must be a finite number > 0, got {exponent!r}")
    if min_examples * num_clients > num_examples:
        raise ValueError(f"min_examples={min_examples} x {num_clients} clients exceeds the {num_examples} examples")
    rng = np.random.default_rng(seed)
    if distribution == "lognormal":
        log_w = sigma * rng.standard_normal(num_clients)
    else:
        log_w = -np.log1p(-rng.random(num_clients)) / exponent  # u = 1 - U[0, 1) lies in (0, 1]
    weights = np.exp(log_w - log_w.max())  # scaled for range; only the proportions matter
    extra = num_examples - min_examples * num_clients
    raw = extra * weights / weights.sum()
    sizes = np.floor(raw).astype(np.int64)
    short = extra - int(sizes.sum())
    if short:
        sizes[np.argsort(-(raw - sizes), kind="stable")[:short]] += 1
    sizes += min_examples
    order = rng.permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]
