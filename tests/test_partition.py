"""Statistical properties of the partitioners."""

import numpy as np
import pytest

from fedstream.data.partition import dirichlet_label_partition, iid_partition, shards_partition

RNG = np.random.default_rng(123)
LABELS = RNG.integers(0, 10, 20000)


def assert_exact_cover(parts, n):
    flat = np.concatenate(parts)
    assert flat.dtype == np.int64
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))  # nothing lost, nothing duplicated


def label_hist(parts, labels, k=10):
    return np.array([np.bincount(labels[p], minlength=k) for p in parts], float)


def test_iid_sizes_and_labels():
    parts = iid_partition(len(LABELS), 20, seed=0)
    assert_exact_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    hist = label_hist(parts, LABELS)
    expected = np.bincount(LABELS, minlength=10) / len(LABELS) * hist.sum(1, keepdims=True)
    chi2 = ((hist - expected) ** 2 / expected).sum(1)  # ~ chi2(9) per client: mean 9, p(>35) ~ 1e-4
    assert chi2.max() < 35


def test_dirichlet_large_alpha_is_near_iid_small_alpha_is_skewed():
    wide = dirichlet_label_partition(LABELS, 20, alpha=1000.0, seed=0)
    skew = dirichlet_label_partition(LABELS, 20, alpha=0.1, seed=0)
    for parts in (wide, skew):
        assert_exact_cover(parts, len(LABELS))

    def max_class_share(parts):
        hist = label_hist(parts, LABELS)
        return (hist.max(1) / np.maximum(hist.sum(1), 1)).mean()

    assert max_class_share(wide) < 0.15  # global max share is ~0.1
    assert max_class_share(skew) > 0.5


@pytest.mark.parametrize("alpha", [0.3, 1.0, 5.0])
def test_dirichlet_shares_match_dirichlet_moments(alpha):
    # For each class, the clients' shares of it are one Dirichlet(alpha * 1_K) draw:
    # mean 1/K, variance (1/K)(1 - 1/K) / (K alpha + 1).
    k, labels = 10, np.repeat(np.arange(200), 500)  # 200 classes x 500 examples: many draws
    parts = dirichlet_label_partition(labels, k, alpha=alpha, seed=1, min_examples=0)
    assert_exact_cover(parts, len(labels))
    shares = label_hist(parts, labels, 200) / 500.0  # [clients, classes]
    mean, var = 1 / k, (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    assert abs(shares.mean() - mean) < 1e-9  # shares of each class sum to 1
    assert abs(shares.var() - var) < 0.15 * var + 1e-4


def test_dirichlet_min_examples_and_errors():
    parts = dirichlet_label_partition(LABELS[:500], 20, alpha=0.5, seed=3, min_examples=5)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError, match="attempts"):
        dirichlet_label_partition(LABELS[:200], 20, alpha=0.01, seed=0, min_examples=10, max_attempts=5)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_partition(LABELS, 5, alpha=0.0, seed=0)


def test_shards_pathological_split():
    labels = np.repeat(np.arange(10), 100)  # shards of 50 never straddle two labels
    parts = shards_partition(labels, 10, shards_per_client=2, seed=0)
    assert_exact_cover(parts, 1000)
    assert all(len(p) == 100 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_determinism_in_seed():
    for fn in (lambda s: iid_partition(1000, 7, s), lambda s: dirichlet_label_partition(LABELS, 7, 0.5, s),
               lambda s: shards_partition(LABELS, 7, 3, s)):
        a, b, c = fn(0), fn(0), fn(1)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))
