"""The round engine: rounds cut into chunks, epochs as index orders, client lanes.

A round cut into chunks must give exactly (bit for bit) what the same round
in one call gives; lanes only change the order in which a device sums its
clients, so they agree with one lane to float rounding. The packed data is
checked against the plain gather of `client_example_order` (the reference
example order), and its bytes against the number of local epochs.
"""

import jax
import numpy as np
import optax
import pytest

import fedstream as fs
from fedstream.algorithms.privacy import DPMechanism, default_delta
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.data.packed import plan_round, unpack_clients
from fedstream.data.sampling import client_epoch_plan, client_example_order
import run_algorithm
from support import InMemorySource, flatten_tree

SIZES = [0, 3, 17, 40, 2, 25, 9, 1, 60, 12, 33, 5, 0, 21, 8, 14, 47, 6, 11, 29]
QUIET = dict(log=lambda _: None)


def dataset(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)

    def client(n):
        return {"x": rng.normal(size=(n, 3, 2, 1)).astype(np.float32), "y": rng.integers(0, 4, n).astype(np.int32)}

    return fs.InMemoryDataset({"train": {f"c{i:02d}": client(n) for i, n in enumerate(sizes)},
                               "test": {f"c{i:02d}": client(5) for i in range(len(sizes))}})


DATA = dataset()


def fedavg(**options):
    return fs.FedAvg(fs.get_model("logistic", (3, 2, 1), 4), optax.sgd(0.3), optax.sgd(1.0), **options)


def simulate(algorithm, *, devices=1, chunk_bytes=0, lanes=1, rounds=3, **kw):
    """`rounds` rounds in memory; the final params and each round's train metrics (timings dropped)."""
    settings = dict(clients_per_round=9, batch_size=4, epochs=2, seed=3)
    settings.update(kw)
    sim = fs.Simulation(DATA, algorithm, num_devices=devices, chunk_bytes=chunk_bytes, lanes=lanes, **settings, **QUIET)
    rows = []
    for metrics in sim.rounds(rounds):
        rows.append({k: v for k, v in metrics["train"].items() if not k.endswith(("seconds", "per_second"))})
    chunks = sim.pipeline.chunks_per_round
    sim.close()
    return {k: np.asarray(v) for k, v in flatten_tree(jax.device_get(sim.state.params))}, rows, chunks


def assert_identical(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert np.array_equal(a[key], b[key]), key


# --- examples stored once -------------------------------------------------------------------------------------

@pytest.mark.parametrize("batching", [ClientBatching(4), ClientBatching(4, epochs=3), ClientBatching(5, epochs=20),
                                      ClientBatching(4, epochs=3, max_examples=7),
                                      ClientBatching(3, epochs=4, max_steps=5), ClientBatching(16, epochs=2)])
def test_epoch_plan_reads_the_reference_order_and_keeps_each_example_once(batching):
    for n in (0, 1, 7, 12, 31):
        for client in range(4):
            reference = client_example_order(5, 2, client, n, batching)
            kept, order = client_epoch_plan(5, 2, client, n, batching)
            assert order.shape == reference.shape
            np.testing.assert_array_equal(np.where(order >= 0, kept[np.maximum(order, 0)], -1), reference)
            assert len(set(kept.tolist())) == kept.size  # each example once
            assert set(kept.tolist()) == set(reference[reference >= 0].tolist())  # and only those read


def test_packed_bytes_do_not_grow_with_local_epochs():
    source = InMemorySource(SIZES, input_shape=(3, 2, 1), num_classes=4)

    def chunk(epochs):
        pipeline = CohortPipeline(source, "train", ("x", "y"), seed=1, cohort_size=12,
                                  batching=ClientBatching(4, epochs=epochs), num_devices=2, data_threads=0)
        return next(pipeline.iterator(1))["batch"]

    one, twenty = chunk(1), chunk(20)
    assert twenty["x"].nbytes <= 1.5 * one["x"].nbytes  # the examples: once (up to bucket rounding), not 20 times
    assert twenty["index"].shape[2] > 10 * one["index"].shape[2]  # the steps: 20 epochs of them


@pytest.mark.parametrize("devices,lanes,chunk_bytes", [(1, 1, 0), (3, 1, 2500), (2, 3, 0), (4, 2, 3000)])
def test_chunks_hold_each_client_once_with_the_reference_batches(devices, lanes, chunk_bytes):
    source = InMemorySource(SIZES, input_shape=(3, 2, 1), num_classes=4)
    batching = ClientBatching(4, epochs=3, max_examples=30)
    pipeline = CohortPipeline(source, "train", ("x", "y"), seed=9, cohort_size=14, batching=batching,
                              num_devices=devices, data_threads=0, lanes=lanes, chunk_bytes=chunk_bytes)
    if chunk_bytes:
        assert pipeline.chunks_per_round > 2
    for r, chunks in enumerate(pipeline.rounds(2)):
        seen = {}
        for element in chunks:
            assert element["batch"]["x"].shape[:2] == (devices, lanes)
            for client, got in unpack_clients(element["batch"], ("x", "y")).items():
                assert client not in seen
                seen[client] = got
        cohort = pipeline.cohort(r)
        assert set(seen) == {int(c) for c in cohort if SIZES[c] > 0}
        assert sum(e["cohort_size"] for e in chunks) == len(cohort)
        for client, got in seen.items():
            n = SIZES[client]
            order = client_example_order(9, r, client, n, batching).reshape(-1, 4)
            data = source.get_client("train", client)
            np.testing.assert_array_equal(got["mask"], order >= 0)
            np.testing.assert_array_equal(got["x"][got["mask"]], data["x"][order[order >= 0]])
            np.testing.assert_array_equal(got["y"][got["mask"]], data["y"][order[order >= 0]])
            assert got["weight"] == batching.examples_used(n)


def test_round_plan_runs_each_bin_longest_first_and_chunks_rank_major():
    steps = [5, 0, 9, 2, 7, 7, 1, 3, 0, 4]
    layout = plan_round(steps, num_devices=2, lanes=2)
    assert sorted(layout.order.tolist()) == list(range(len(steps)))
    trained = [p for p in layout.order if steps[p] > 0]
    assert [steps[p] for p in layout.order[len(trained):]] == [0, 0]  # clients without steps last
    np.testing.assert_array_equal(np.bincount(layout.bin[layout.bin >= 0], weights=np.array(steps)[layout.bin >= 0],
                                              minlength=4), layout.load)
    for b in range(4):  # each bin meets its clients in stream order: longest first
        mine = [steps[p] for p in trained if layout.bin[p] == b]
        assert mine == sorted(mine, reverse=True)
    ranks = {}
    for p in trained:  # rank-major: a bin's k-th client comes after every bin's (k-1)-th
        ranks.setdefault(layout.bin[p], []).append(p)
    rank_of = {p: k for members in ranks.values() for k, p in enumerate(members)}
    assert [rank_of[p] for p in trained] == sorted(rank_of[p] for p in trained)


# --- chunked rounds equal whole rounds ------------------------------------------------------------------------

@pytest.mark.parametrize("devices", [1, 4])
def test_a_round_in_chunks_is_bit_identical_to_the_round_in_one_call(devices):
    whole, whole_rows, one = simulate(fedavg(), devices=devices, chunk_bytes=0)
    chunked, chunked_rows, many = simulate(fedavg(), devices=devices, chunk_bytes=5000)
    assert one == 1 and many >= 4
    assert_identical(whole, chunked)
    for a, b in zip(whole_rows, chunked_rows):
        assert a["round_chunks"] == 1 and b["round_chunks"] == many
        assert {k: v for k, v in a.items() if k not in ("round_chunks", "padding_waste")} == \
               {k: v for k, v in b.items() if k not in ("round_chunks", "padding_waste")}


def test_a_stateful_algorithm_in_chunks_is_bit_identical():
    def scaffold():
        return fs.Scaffold(fs.get_model("logistic", (3, 2, 1), 4), optax.sgd(0.2), optax.sgd(1.0),
                           client_learning_rate=0.2, population=len(SIZES))

    # 5 rounds of 9 of 20 clients: clients come back, so their stored control variates are used.
    whole, _, _ = simulate(scaffold(), devices=4, chunk_bytes=0, rounds=5)
    chunked, _, many = simulate(scaffold(), devices=4, chunk_bytes=5000, rounds=5)
    assert many >= 4
    assert_identical(whole, chunked)


def test_dp_with_poisson_cohorts_in_chunks_is_bit_identical():
    n, q = len(SIZES), 0.4
    mechanism = DPMechanism(0.8, "poisson", n, sampling_rate=q)

    def dp():
        return fs.Aggregated(fedavg(), [fs.Clip(0.5), fs.GaussianNoise(0.8, denominator=q * n, mechanism=mechanism,
                                                                       target_delta=default_delta(n))])

    kw = dict(sampling="poisson", sampling_rate=q, aggregation="uniform")
    whole, whole_rows, _ = simulate(dp(), devices=4, chunk_bytes=0, **kw)
    chunked, chunked_rows, many = simulate(dp(), devices=4, chunk_bytes=5000, **kw)
    assert many >= 3
    assert_identical(whole, chunked)
    assert [r["dp_epsilon"] for r in whole_rows] == [r["dp_epsilon"] for r in chunked_rows]


def test_resume_with_chunked_rounds_is_bit_identical(tmp_path):
    def run(workdir, stop):
        sim = fs.Simulation(DATA, fedavg(), clients_per_round=9, batch_size=4, epochs=2, seed=3, chunk_bytes=5000,
                            workdir=workdir, **QUIET)
        for metrics in sim.rounds(4):
            if metrics["round"] == stop:
                break
        sim.close()
        return sim

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert int(resumed.state.round) == 4
    assert_identical({k: np.asarray(v) for k, v in flatten_tree(jax.device_get(straight.state.params))},
                     {k: np.asarray(v) for k, v in flatten_tree(jax.device_get(resumed.state.params))})


# --- lanes ----------------------------------------------------------------------------------------------------

def assert_close(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        scale = max(float(np.abs(a[key]).max()), 1e-6)
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=2e-5 * scale, err_msg=f"{what}: {key}")


# 4 devices x 8 lanes runs on CI (slow); the default suite keeps 1 x 4 under its time budget.
@pytest.mark.parametrize("devices,lanes", [(1, 4), pytest.param(4, 8, marks=pytest.mark.slow)])
def test_lanes_equal_one_lane(devices, lanes):
    one, _, _ = simulate(fedavg(), devices=devices, lanes=1)
    many, _, _ = simulate(fedavg(), devices=devices, lanes=lanes, chunk_bytes=5000)
    assert_close(one, many, f"{lanes} lanes on {devices} devices")


def test_lanes_equal_one_lane_for_an_algorithm_with_a_prepass():
    spec = run_algorithm.CASES["mime"]  # the rest of the catalogue: the slow test below
    one = run_algorithm.run(spec, 4, lanes=1)
    assert_close(one, run_algorithm.run(spec, 4, lanes=4), "mime, 4 lanes")


@pytest.mark.slow  # about 3.5 s; lanes (test_lanes_equal_one_lane) and stateful chunks are checked by default
def test_lanes_equal_one_lane_for_stateful_algorithms():
    model = fs.get_model("logistic", (3, 2, 1), 4)
    for algorithm in (fs.Scaffold(model, optax.sgd(0.2), optax.sgd(1.0), client_learning_rate=0.2, population=len(SIZES)),
                      fs.Ditto(model, optax.sgd(0.2), optax.sgd(1.0), personal_learning_rate=0.1)):
        one, _, _ = simulate(algorithm, devices=4, lanes=1, rounds=4)
        assert_close(one, simulate(algorithm, devices=4, lanes=4, rounds=4)[0], type(algorithm).__name__)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("lanes", [4, 8])
@pytest.mark.parametrize("name", sorted(run_algorithm.CASES))
def test_lanes_equal_one_lane_for_every_catalogue_algorithm(name, devices, lanes):
    spec = run_algorithm.CASES[name]
    assert_close(run_algorithm.run(spec, devices, lanes=1), run_algorithm.run(spec, devices, lanes=lanes),
                 f"{name}, {lanes} lanes on {devices} devices")


def test_lanes_setting_resolves_auto_to_one_on_cpu_and_refuses_bad_values():
    from fedstream.training.rounds import make_mesh, resolve_lanes

    mesh = make_mesh(2)
    assert resolve_lanes("auto", mesh, param_bytes=4_000) == 1  # CPU: vmap over lanes measured slower
    assert resolve_lanes(6, mesh) == 6
    for bad in (0, -1, 2.5, True, "many"):
        with pytest.raises(ValueError, match="lanes"):
            resolve_lanes(bad, mesh)
