"""The cohort pipeline: purity in (seed, round), packing, caps, masks, resume."""

import numpy as np
import pytest

from fedstream.data.cohort import (ClientBatching, CohortPipeline, bucket_steps, client_example_order,
                                   pack_clients, padding_waste, sample_cohort)
from fedstream.data.packed import unpack_clients
from support import InMemorySource

SIZES = [0, 1, 3, 12, 25, 7, 40, 2, 9, 16, 5, 30, 0, 11, 19, 4]


def make_pipeline(num_devices=1, threads=0, batching=ClientBatching(4, epochs=2), cohort=6, seed=7, source=None):
    return CohortPipeline(source or InMemorySource(SIZES), "train", ("x", "y"), seed=seed, cohort_size=cohort,
                          batching=batching, num_devices=num_devices, data_threads=threads)


def unpack(element, source):
    """{client: (x, y, mask, weight)} of a packed chunk, checking that no example lies outside a client's steps."""
    b = element["batch"]
    rows, lanes, slots = b["slot_steps"].shape
    for r in range(rows):
        for lane in range(lanes):
            covered = np.zeros(b["index"].shape[2], bool)
            for k in range(slots):
                steps, offset = int(b["slot_steps"][r, lane, k]), int(b["slot_offset"][r, lane, k])
                if steps == 0:
                    assert b["slot_weight"][r, lane, k] == 0
                    continue
                assert not covered[offset:offset + steps].any(), "overlapping clients"
                covered[offset:offset + steps] = True
            assert (b["index"][r, lane, ~covered] < 0).all(), "examples outside any client's steps"
    return {c: (v["x"], v["y"], v["mask"], v["weight"]) for c, v in unpack_clients(b, ("x", "y")).items()}


def test_cohort_sampling_is_pure_and_uniform():
    a = sample_cohort(1, 5, 100, 10)
    assert (a == sample_cohort(1, 5, 100, 10)).all()
    assert len(set(a.tolist())) == 10
    assert not (a == sample_cohort(1, 6, 100, 10)).all()
    counts = np.bincount(np.concatenate([sample_cohort(0, r, 20, 5) for r in range(4000)]), minlength=20)
    # Each client is picked with probability 5/20 per round: 1000 +- 3 sigma (sigma ~ 27).
    assert np.abs(counts - 1000).max() < 100
    with pytest.raises(ValueError, match="exceeds"):
        sample_cohort(0, 0, 3, 4)


def test_client_order_epochs_and_caps():
    batching = ClientBatching(4, epochs=3)
    order = client_example_order(0, 0, 2, 10, batching)
    assert order.size == 8 * 4  # ceil(30/4) steps
    real = order[order >= 0]
    assert real.size == 30 and (np.bincount(real, minlength=10) == 3).all()
    for e in range(3):  # every epoch is a permutation
        assert sorted(real[e * 10:(e + 1) * 10]) == list(range(10))
    capped = ClientBatching(4, epochs=2, max_examples=5, max_steps=2)
    order = client_example_order(0, 0, 2, 10, capped)
    assert order.size == 8 and (order >= 0).all() and len(set(order.tolist())) == 5
    assert capped.num_steps(10) == 2 and capped.examples_used(10) == 5


@pytest.mark.parametrize("num_devices", [1, 3, 4])
def test_packed_round_holds_each_client_exactly(num_devices):
    source = InMemorySource(SIZES)
    batching = ClientBatching(4, epochs=2)
    element = next(make_pipeline(num_devices, source=source, batching=batching).iterator(1))
    cohort = sample_cohort(7, 0, len(SIZES), 6)
    clients = unpack(element, source)
    nonempty = [int(c) for c in cohort if SIZES[c] > 0]
    assert sorted(clients) == sorted(nonempty)
    assert element["num_clients_empty"] == sum(SIZES[c] == 0 for c in cohort)
    for c, (x, y, mask, weight) in clients.items():
        order = client_example_order(7, 0, c, SIZES[c], batching).reshape(-1, 4)
        assert mask.shape == order.shape and (mask == (order >= 0)).all()
        np.testing.assert_array_equal(x[mask], source.clients[c]["x"][order[order >= 0]])
        np.testing.assert_array_equal(y[mask], source.clients[c]["y"][order[order >= 0]])
        assert weight == SIZES[c]


def test_rounds_do_not_depend_on_threads_or_device_count():
    def client_data(num_devices, threads):
        it = make_pipeline(num_devices, threads).iterator(3)
        return [unpack(next(it), None) for _ in range(3)]

    base = client_data(1, 0)
    for num_devices, threads in [(1, 2), (4, 2), (2, 0)]:
        other = client_data(num_devices, threads)
        for a, b in zip(base, other):
            assert sorted(a) == sorted(b)
            for c in a:
                for u, v in zip(a[c], b[c]):
                    np.testing.assert_array_equal(u, v)


def test_an_iterator_started_at_a_round_continues_exactly():
    """The iterator's position is the round alone: rounds 2.. from a fresh iterator equal those of a full one."""
    it = make_pipeline(threads=2).iterator(5)
    rest = [next(it) for _ in range(5)][2:]
    fresh = make_pipeline(threads=2).iterator(5, start_round=2)
    for a in rest:
        b = next(fresh)
        assert a["round"] == b["round"]
        for k in a["batch"]:
            np.testing.assert_array_equal(a["batch"][k], b["batch"][k])


def test_bucketing_bounds_shapes_and_padding():
    lengths = {bucket_steps(s) for s in range(1, 2049)}
    assert len(lengths) <= 2 + 2 * 10  # 2 per power of two
    for s in range(1, 5000):
        assert s <= bucket_steps(s) <= max(s * 1.5, s + 1)


def test_pack_clients_balances_load():
    steps = [50, 3, 20, 20, 7, 1, 30, 12]
    device, offset, load = pack_clients(steps, 3)
    assert load.sum() == sum(steps) and load.max() <= 50
    for d in range(3):  # no overlap within a device's stream
        spans = sorted((offset[i], offset[i] + steps[i]) for i in range(len(steps)) if device[i] == d)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


class CountingSource(InMemorySource):
    """Records which clients were read."""

    def __init__(self, sizes):
        super().__init__(sizes)
        self.reads = []

    def get_client(self, split, client):
        self.reads.append(int(client))
        return super().get_client(split, client)


@pytest.mark.parametrize("local", [(0,), (1, 3), (2,)])
def test_a_process_reads_and_builds_only_its_own_devices(local):
    """Multi-process: rows of the local devices equal the full pack's rows; nothing else is read."""
    full_source, part_source = CountingSource(SIZES), CountingSource(SIZES)
    full = make_pipeline(4, source=full_source, cohort=10)
    part = CohortPipeline(part_source, "train", ("x", "y"), seed=7, cohort_size=10, batching=full.batching,
                          num_devices=4, data_threads=0, local_devices=local)
    it_full, it_part = full.iterator(3), part.iterator(3)
    expected_reads = []
    for r in range(3):
        a, b = next(it_full), next(it_part)
        for key, value in a["batch"].items():
            np.testing.assert_array_equal(value[list(local)], b["batch"][key], err_msg=key)
        assert {k: v for k, v in a.items() if k != "batch" and k != "clients"} == \
               {k: v for k, v in b.items() if k != "batch" and k != "clients"}
        device = part.round_layout(r).bin // part.lanes
        expected_reads += [int(c) for c, d in zip(part.cohort(r), device) if d in local and SIZES[c] > 0]
    assert sorted(part_source.reads) == sorted(expected_reads)
    assert len(part_source.reads) < len(full_source.reads)


def test_padding_waste_counts_idle_device_steps():
    steps = np.random.default_rng(3).lognormal(2.0, 1.2, 40).astype(int) + 1
    for devices in (1, 3, 8):
        _, _, load = pack_clients(steps, devices)
        executed = devices * load.max()
        assert padding_waste(load) == pytest.approx((executed - steps.sum()) / executed)
    assert padding_waste(np.array([5])) == 0.0


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    from fedstream.data.augment import random_crop_flip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(64, 8, 6, 3)).astype(np.uint8)
    out = random_crop_flip({"x": images, "y": np.arange(64)}, np.random.default_rng(1), pad=2)["x"]
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flips = 0
    for i in range(64):  # each output is one of the 5x5 windows, flipped or not
        windows = [(w, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   for w in [padded[i, dy:dy + 8, dx:dx + 6][:, ::-1 if f else 1]] if np.array_equal(w, out[i])]
        assert windows, f"example {i} is not a crop of its padded image"
        flips += windows[0][1]
    assert 10 < flips < 54  # about half are flipped


def test_augmentation_is_a_function_of_seed_round_and_client():
    from fedstream.data.augment import random_crop_flip

    source = InMemorySource(SIZES, input_shape=(6, 6, 1))
    make = lambda: CohortPipeline(source, "train", ("x", "y"), seed=7, cohort_size=6, batching=ClientBatching(4),  # noqa: E731
                                  num_devices=2, data_threads=0, augment=random_crop_flip)
    a, b = next(make().iterator(1)), next(make().iterator(1))
    plain = next(make_pipeline(2, source=source, batching=ClientBatching(4)).iterator(1))
    np.testing.assert_array_equal(a["batch"]["x"], b["batch"]["x"])
    assert not np.array_equal(a["batch"]["x"], plain["batch"]["x"])
    np.testing.assert_array_equal(a["batch"]["y"], plain["batch"]["y"])
