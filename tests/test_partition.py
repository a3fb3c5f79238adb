"""Statistical and structural properties of the partitioners."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.data.partition import (dirichlet_label_partition, iid_partition, quantity_skew_partition,
                                      shards_partition)

LABELS = np.random.default_rng(123).integers(0, 10, 20000)


def assert_exact_cover(parts, n):
    flat = np.concatenate(parts)
    assert flat.dtype == np.int64
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))  # nothing lost, nothing duplicated


def label_hist(parts, labels, k=10):
    return np.array([np.bincount(labels[p], minlength=k) for p in parts], float)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), k=st.integers(1, 12), classes=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       s=st.integers(1, 3), alpha=st.sampled_from([0.05, 0.5, 5.0]))
def test_exact_cover_all_partitioners(n, k, classes, seed, s, alpha):
    labels = np.random.default_rng(seed).integers(0, classes, n)
    if n >= k:
        parts = iid_partition(n, k, seed)
        assert len(parts) == k
        assert_exact_cover(parts, n)
    parts = dirichlet_label_partition(labels, k, alpha, seed, min_examples=0)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    if n >= k * s:
        parts = shards_partition(labels, k, s, seed)
        assert len(parts) == k
        assert_exact_cover(parts, n)


def test_iid_sizes_and_labels():
    parts = iid_partition(len(LABELS), 20, seed=0)
    assert_exact_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    hist = label_hist(parts, LABELS)
    expected = np.bincount(LABELS, minlength=10) / len(LABELS) * hist.sum(1, keepdims=True)
    chi2 = ((hist - expected) ** 2 / expected).sum(1)  # ~ chi2(9) per client: mean 9, p(> 35) ~ 1e-4
    assert chi2.max() < 35
    assert 5 < chi2.mean() < 14  # and not suspiciously uniform either (e.g. a stratified split)
    assert all((np.diff(p) > 0).all() for p in parts)  # sorted within a client


def test_iid_is_not_contiguous_blocks():
    parts = iid_partition(1000, 10, seed=0)
    assert all(p.max() - p.min() > 900 for p in parts)  # a random permutation, not np.array_split(arange)


def test_dirichlet_large_alpha_is_near_iid_small_alpha_is_skewed():
    wide = dirichlet_label_partition(LABELS, 20, alpha=1000.0, seed=0)
    skew = dirichlet_label_partition(LABELS, 20, alpha=0.1, seed=0)
    for parts in (wide, skew):
        assert_exact_cover(parts, len(LABELS))

    hist_wide = label_hist(wide, LABELS)
    global_dist = np.bincount(LABELS, minlength=10) / len(LABELS)
    assert np.abs(hist_wide / hist_wide.sum(1, keepdims=True) - global_dist).max() < 0.03

    def max_class_share(parts):
        hist = label_hist(parts, LABELS)
        return (hist.max(1) / np.maximum(hist.sum(1), 1)).mean()

    assert max_class_share(wide) < 0.12  # the global max share is ~0.10
    assert max_class_share(skew) > 0.5


@pytest.mark.parametrize("alpha", [0.1, 1.0, 5.0])
def test_dirichlet_shares_match_dirichlet_moments(alpha):
    # For each class, the K clients' shares of it are one Dirichlet(alpha * 1_K) draw:
    # each share has mean 1/K and variance (1/K)(1 - 1/K) / (K alpha + 1).
    k, num_classes, per_class = 10, 200, 500
    labels = np.repeat(np.arange(num_classes), per_class)
    mean, var = 1 / k, (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    variances = []
    for seed in range(3):
        parts = dirichlet_label_partition(labels, k, alpha=alpha, seed=seed, min_examples=0)
        assert_exact_cover(parts, len(labels))
        shares = label_hist(parts, labels, num_classes) / per_class  # [clients, classes]
        # No client is favoured: each client's mean share over the classes is 1/K.
        assert np.abs(shares.mean(1) - mean).max() < 5 * np.sqrt(var / num_classes)
        variances.append(shares.var())
    # Wrong concentrations (alpha / K, alpha * K, alpha = 1) miss this by a factor of 1.8 or more.
    assert abs(np.mean(variances) / var - 1) < 0.08


def test_dirichlet_cuts_are_unbiased():
    # Floor-rounded cuts would give the last client ~0.5 example more per class
    # (1,000 more here); rounded cuts keep clients balanced when alpha is large.
    labels = np.repeat(np.arange(2000), 50)
    sizes = np.array([len(p) for p in dirichlet_label_partition(labels, 10, alpha=1000.0, seed=0)])
    assert np.abs(sizes - 10000).max() < 100


def test_dirichlet_min_examples_and_errors():
    parts = dirichlet_label_partition(LABELS[:500], 20, alpha=0.5, seed=3, min_examples=5)
    assert_exact_cover(parts, 500)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError, match="in 5 attempts"):
        dirichlet_label_partition(LABELS[:200], 20, alpha=0.01, seed=0, min_examples=10, max_attempts=5)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_partition(LABELS, 5, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        dirichlet_label_partition(LABELS[:50], 10, alpha=1.0, seed=0, min_examples=6)
    with pytest.raises(ValueError, match="1-D"):
        dirichlet_label_partition(LABELS.reshape(-1, 2), 5, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_label_partition(LABELS, 0, alpha=1.0, seed=0)


def test_shards_pathological_split():
    labels = np.repeat(np.arange(10), 100)  # shards of 50 never straddle two labels
    parts = shards_partition(labels, 10, shards_per_client=2, seed=0)
    assert_exact_cover(parts, 1000)
    assert all(len(p) == 100 for p in parts)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert max(distinct) <= 2
    assert np.mean(distinct) > 1.2  # shards are dealt at random, not (mostly) two halves of one label
    # Each shard is a pure-label run of 50: every (client, label) count is a multiple of 50.
    assert (label_hist(parts, labels) % 50 == 0).all()


def test_shards_uneven_and_errors():
    parts = shards_partition(LABELS[:1003], 7, shards_per_client=3, seed=1)
    assert_exact_cover(parts, 1003)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 3  # shards differ by at most one example
    with pytest.raises(ValueError, match="shards"):
        shards_partition(LABELS[:10], 6, shards_per_client=2, seed=0)
    with pytest.raises(ValueError, match="shards_per_client"):
        shards_partition(LABELS, 5, shards_per_client=0, seed=0)


def test_iid_errors():
    with pytest.raises(ValueError, match="num_clients"):
        iid_partition(10, 0, seed=0)
    with pytest.raises(ValueError, match="empty clients"):
        iid_partition(3, 5, seed=0)
    with pytest.raises(ValueError, match="integer"):
        iid_partition(10.5, 2, seed=0)


def test_determinism_in_seed():
    for fn in (lambda s: iid_partition(1000, 7, s), lambda s: dirichlet_label_partition(LABELS, 7, 0.5, s),
               lambda s: shards_partition(LABELS, 7, 3, s)):
        a, b, c = fn(0), fn(0), fn(1)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


# ---------------------------------------------------------------------------------------------- quantity skew


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), k=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), m=st.integers(0, 3),
       distribution=st.sampled_from(["lognormal", "powerlaw"]), spread=st.sampled_from([0.0, 0.5, 3.0]))
def test_quantity_skew_exact_cover(n, k, seed, m, distribution, spread):
    if m * k > n:
        with pytest.raises(ValueError, match="exceeds"):
            quantity_skew_partition(n, k, seed, min_examples=m)
        return
    parts = quantity_skew_partition(n, k, seed, distribution=distribution, sigma=spread, exponent=spread + 0.5,
                                    min_examples=m)
    assert len(parts) == k
    assert min(len(p) for p in parts) >= m
    if n:
        assert_exact_cover(parts, n)
    assert all((np.diff(p) > 0).all() for p in parts)


def test_quantity_skew_lognormal_sizes():
    # Size_i ~ n w_i / sum(w) with log w_i ~ N(0, sigma^2) and sum(w) ~ K exp(sigma^2 / 2), so
    # log(size_i K / n) is normal with standard deviation sigma and mean -sigma^2 / 2.
    k, per_client, sigma = 1000, 500, 1.0
    sizes = np.array([len(p) for p in quantity_skew_partition(k * per_client, k, seed=0, sigma=sigma,
                                                              min_examples=0)])
    assert sizes.sum() == k * per_client
    logs = np.log(np.maximum(sizes, 1) / per_client)
    assert abs(logs.std() / sigma - 1) < 0.08  # sampling error of the std over 1,000 clients: ~2%
    assert abs(logs.mean() + sigma**2 / 2) < 0.15
    skew = ((logs - logs.mean()) ** 3).mean() / logs.std() ** 3
    assert abs(skew) < 0.3  # symmetric in log space (a power law is strongly right-skewed here)
    # sigma = 0: equal sizes; a larger sigma: a larger spread.
    equal = [len(p) for p in quantity_skew_partition(1003, 10, seed=0, sigma=0.0)]
    assert max(equal) - min(equal) <= 1
    wide = np.array([len(p) for p in quantity_skew_partition(k * per_client, k, seed=0, sigma=2.0, min_examples=0)])
    assert np.log(np.maximum(wide, 1)).std() > 1.5


def test_quantity_skew_powerlaw_tail():
    # Pareto(exponent) weights with x_min 1: the Hill estimator K / sum(log(w / w_min)) recovers the
    # exponent; sizes are proportional to the weights (up to rounding), so it works on the sizes.
    k, per_client = 2000, 400
    for exponent in (1.2, 2.5):
        sizes = np.array([len(p) for p in quantity_skew_partition(k * per_client, k, seed=1,
                                                                  distribution="powerlaw", exponent=exponent,
                                                                  min_examples=0)])
        assert sizes.sum() == k * per_client
        hill = k / np.log(sizes / sizes.min()).sum()
        assert abs(hill / exponent - 1) < 0.1  # relative error ~ 1/sqrt(K) ~ 2%
        # P(w > t) = t^-exponent: the share of clients more than 4x the smallest.
        tail = (sizes > 4 * sizes.min()).mean()
        assert abs(tail - 4.0**-exponent) < 0.03


def test_quantity_skew_examples_are_iid_and_seeded():
    parts = quantity_skew_partition(len(LABELS), 20, seed=0, sigma=0.8)
    assert_exact_cover(parts, len(LABELS))
    hist = label_hist(parts, LABELS)
    expected = np.bincount(LABELS, minlength=10) / len(LABELS) * hist.sum(1, keepdims=True)
    chi2 = ((hist - expected) ** 2 / expected).sum(1)  # ~ chi2(9) per client, as for iid_partition
    assert chi2.max() < 35
    assert all(p.max() - p.min() > 0.8 * len(LABELS) for p in parts if len(p) > 50)  # not contiguous blocks
    again = quantity_skew_partition(len(LABELS), 20, seed=0, sigma=0.8)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = quantity_skew_partition(len(LABELS), 20, seed=1, sigma=0.8)
    assert [len(p) for p in other] != [len(p) for p in parts]


def test_quantity_skew_errors():
    with pytest.raises(ValueError, match="distribution"):
        quantity_skew_partition(100, 5, 0, distribution="zipf")
    with pytest.raises(ValueError, match="sigma"):
        quantity_skew_partition(100, 5, 0, sigma=-1.0)
    with pytest.raises(ValueError, match="exponent"):
        quantity_skew_partition(100, 5, 0, distribution="powerlaw", exponent=0.0)
    with pytest.raises(ValueError, match="exceeds"):
        quantity_skew_partition(10, 5, 0, min_examples=3)
    with pytest.raises(ValueError, match="num_clients"):
        quantity_skew_partition(10, 0, 0)
