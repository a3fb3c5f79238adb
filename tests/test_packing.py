"""Packing clients into bins: plan structure, never worse than longest-first, the bucket cliff, shapes.

References here are written independently of fedstream.data.packing: a
heap-based longest-first, brute force over every assignment of small
cohorts, and the issue's two set-ups rebuilt from their size laws.
"""

import heapq
import itertools
import math

import numpy as np
import pytest

from fedstream.data.cohort import ClientBatching, sample_cohort
from fedstream.data.packing import (bucket_steps, busiest_load_lower_bound, pack_clients, padding_waste,
                                    whole_client_waste_floor)
from fedstream.recipes import synthetic

ROUNDS = 200


def reference_longest_first_busiest(counts, num_bins):
    """Busiest load of plain longest-first (a heap of (load, bin); ties to the lower bin)."""
    heap = [(0, b) for b in range(num_bins)]
    for c in sorted(counts, reverse=True):
        load, b = heapq.heappop(heap)
        heapq.heappush(heap, (load + c, b))
    return max(load for load, _ in heap)


def brute_force_busiest(counts, num_bins):
    """The least busiest load over every assignment of the clients to bins."""
    best = math.inf
    for assignment in itertools.product(range(num_bins), repeat=len(counts)):
        loads = [0] * num_bins
        for c, b in zip(counts, assignment):
            loads[b] += c
        best = min(best, max(loads))
    return best


def random_cohorts(count, seed=0, max_clients=40, max_bins=9):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(0, max_clients))
        counts = rng.lognormal(2.0, 1.3, n).astype(np.int64)
        if rng.random() < 0.2:  # some cohorts hold empty clients (Poisson padding slots)
            counts[rng.random(n) < 0.3] = 0
        yield counts, int(rng.integers(1, max_bins))


def synthetic_steps():
    """The issue's set-up: Synthetic(1, 1) over 1,000 clients, train split (90%), batch 10, 20 epochs."""
    config = synthetic.get_config()
    config.num_devices = 1000
    train = [int(config.train_fraction * int(n)) for n in synthetic.device_sizes(config)]
    batching = ClientBatching(batch_size=10, epochs=20)
    return np.array([batching.num_steps(n) for n in train], np.int64)


def stackoverflow_steps():
    """docs/performance.md part c: 342,477 clients, max(1, floor(LogNormal(4, 2))) examples, cap 1,000, batch 16."""
    sizes = np.maximum(1, np.random.default_rng(0).lognormal(4.0, 2.0, 342_477).astype(np.int64))
    return -(-np.minimum(sizes, 1000) // 16)


SETUPS = {"synthetic_100": (synthetic_steps, 100), "stackoverflow_50": (stackoverflow_steps, 50)}


def setup_rounds(name):
    steps_fn, cohort = SETUPS[name]
    steps = steps_fn()
    return [steps[sample_cohort(0, r, steps.size, cohort)] for r in range(ROUNDS)]


@pytest.mark.parametrize("counts, num_bins", list(random_cohorts(150)))
def test_plan_assigns_each_client_once_with_contiguous_streams(counts, num_bins):
    bins, offset, load = pack_clients(counts, num_bins)
    assert bins.shape == offset.shape == counts.shape and load.shape == (num_bins,)
    assert ((0 <= bins) & (bins < num_bins)).all()
    for b in range(num_bins):
        mine = np.flatnonzero(bins == b)
        ends = 0
        for i in mine[np.argsort(offset[mine], kind="stable")]:
            assert offset[i] == ends  # the next client starts where the previous one ended
            ends += counts[i]
        assert load[b] == ends == counts[mine].sum()
    again = pack_clients(list(counts), num_bins)
    for a, b in zip((bins, offset, load), again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("counts, num_bins", list(random_cohorts(300, seed=1, max_clients=120)))
def test_never_busier_than_plain_longest_first(counts, num_bins):
    _, _, load = pack_clients(counts, num_bins)
    assert load.max(initial=0) <= reference_longest_first_busiest(counts.tolist(), num_bins)


@pytest.mark.parametrize("counts, num_bins", list(random_cohorts(60, seed=2, max_clients=8, max_bins=4)))
def test_lower_bound_and_plan_bracket_the_brute_force_optimum(counts, num_bins):
    best = brute_force_busiest(counts.tolist(), num_bins)
    _, _, load = pack_clients(counts, num_bins)
    assert busiest_load_lower_bound(counts, num_bins) <= best <= load.max(initial=0)
    if best:
        assert whole_client_waste_floor(counts, num_bins) <= 1 - counts.sum() / (num_bins * best) + 1e-12


@pytest.mark.parametrize("counts, num_bins", list(random_cohorts(100, seed=3, max_clients=30, max_bins=6)))
def test_no_single_move_or_swap_shortens_the_busiest_bin(counts, num_bins):
    bins, _, load = pack_clients(counts, num_bins)
    busiest = int(np.argmax(load))
    for i in np.flatnonzero(bins == busiest):
        for other in set(range(num_bins)) - {busiest}:
            partners = [0] + [int(counts[j]) for j in np.flatnonzero(bins == other)]
            for p in partners:
                moved = int(counts[i]) - p
                assert not (load[busiest] - moved < load[busiest] and load[other] + moved < load[busiest])


def test_rebalancing_fits_a_cliff_case_under_the_lower_bucket():
    """Longest-first puts 70 steps on one bin (bucket 96); whole clients fit in 60 (bucket 64)."""
    counts = [30, 30, 20, 20, 20]
    plain = reference_longest_first_busiest(counts, 2)
    best = brute_force_busiest(counts, 2)
    assert bucket_steps(best) < bucket_steps(plain)  # the case is a cliff: the optimum is a bucket lower
    _, _, load = pack_clients(counts, 2)
    assert bucket_steps(int(load.max())) <= bucket_steps(best)
    assert padding_waste(load) <= 0.10 < 1 - sum(counts) / (2 * plain)


@pytest.mark.parametrize("num_bins", [4, 8])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_waste_over_ten_percent_only_where_whole_clients_force_it(setup, num_bins):
    """Each round: waste <= 10%, or the busiest bin is at the whole-client lower bound (rebuilt here)."""
    for counts in setup_rounds(setup):
        _, _, load = pack_clients(counts, num_bins)
        ordered = np.sort(counts)[::-1]
        forced = max([int(ordered[0]), -(-int(counts.sum()) // num_bins)] +
                     [int(ordered[k * num_bins - k:k * num_bins + 1].sum())
                      for k in range(1, (counts.size - 1) // num_bins + 1)])
        assert padding_waste(load) <= 0.10 or load.max() == forced


def test_the_issue_round_is_one_unsplittable_client():
    """Synthetic(1, 1), 100 clients on 4 devices, the sixth round (index 5): its busiest device runs one client alone."""
    counts = setup_rounds("synthetic_100")[5]
    bins, _, load = pack_clients(counts, 4)
    longest = int(np.argmax(counts))
    assert counts[longest] > counts.sum() / 4
    assert np.flatnonzero(bins == bins[longest]).tolist() == [longest]
    assert padding_waste(load) == pytest.approx(1 - counts.sum() / (4 * counts[longest]))
    assert padding_waste(load) == pytest.approx(whole_client_waste_floor(counts, 4))


@pytest.mark.parametrize("num_bins", [4, 8])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_at_most_eight_stream_lengths_over_200_rounds(setup, num_bins):
    lengths = {bucket_steps(int(pack_clients(counts, num_bins)[2].max())) for counts in setup_rounds(setup)}
    assert len(lengths) <= 8
