"""SCAFFOLD against a plain-NumPy implementation of the paper's option-II equations, and its client-state store."""


import jax
import numpy as np
import pytest

from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline, client_example_order, sample_cohort
from fedstream.models import get_model
from fedstream.training.client_store import ClientStateStore
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource, assert_bit_identical, run_cli, run_cli_process, softmax

SIZES = [3, 40, 0, 7, 1, 25, 12, 2, 60, 9]
SEED, COHORT, ROUNDS, BATCH, LR, SERVER_LR = 4, 6, 3, 5, 0.2, 0.8


def source():
    return InMemorySource(SIZES, input_shape=(3, 2, 1), num_classes=4, seed=3)


def run_fedstream(num_devices: int, store_dir: str, rounds: int = ROUNDS, name: str = "scaffold"):
    """`rounds` SCAFFOLD rounds through the sharded runner and the on-disk store; returns (W, b, w0, b0)."""
    data = source()
    model = get_model("logistic", (3, 2, 1), 4)
    algorithm = build_algorithm(name, model, make_optimizer("sgd", LR), make_optimizer("sgd", SERVER_LR),
                                context={"population": len(SIZES), "client_learning_rate": LR})
    mesh = make_mesh(num_devices)
    pipeline = CohortPipeline(data, "train", ("x", "y"), seed=SEED, cohort_size=COHORT,
                              batching=ClientBatching(BATCH), num_devices=num_devices, data_threads=0)
    state = algorithm.init(jax.random.PRNGKey(0))
    w0, b0 = (np.asarray(state.params["Dense_0"][k]) for k in ("kernel", "bias"))
    template = algorithm.client_state_template(state.params)
    store = ClientStateStore(store_dir, jax.tree.map(np.asarray, template), len(SIZES)) if template else None
    state = replicate(state, mesh)
    round_fn = build_train_round(algorithm, mesh, seed=SEED)
    iterator = pipeline.iterator(rounds)
    for r in range(rounds):
        batch = next(iterator)["batch"]
        if store is None:
            state, _ = round_fn(state, shard_batch(batch, mesh))
        else:
            clients = np.where(batch["slot_steps"] > 0, batch["slot_client"], -1)
            state, _, new = round_fn(state, shard_batch(batch, mesh), shard_batch(store.read(clients), mesh))
            store.write(r + 1, clients, clients >= 0, jax.device_get(new))
    return (np.asarray(state.params["Dense_0"]["kernel"]), np.asarray(state.params["Dense_0"]["bias"]), w0, b0)


def reference_scaffold(w0, b0, rounds=ROUNDS):
    """The paper's SCAFFOLD (option II), client by client, in float64."""
    data = source()
    sizes = data.client_sizes("train")
    batching = ClientBatching(BATCH)
    theta = np.concatenate([w0.ravel(), b0]).astype(np.float64)
    c = np.zeros_like(theta)
    c_i = {}
    nw = w0.size
    for r in range(rounds):
        deltas, weights, delta_cs = [], [], []
        for client in sample_cohort(SEED, r, len(sizes), COHORT):
            n = int(sizes[client])
            if n == 0:
                continue
            x = data.get_client("train", client)["x"].reshape(n, -1).astype(np.float64)
            y = data.get_client("train", client)["y"]
            ci = c_i.get(int(client), np.zeros_like(theta))
            order = client_example_order(SEED, r, int(client), n, batching).reshape(-1, BATCH)
            yk = theta.copy()
            for batch in order:
                idx = batch[batch >= 0]
                W, b = yk[:nw].reshape(w0.shape), yk[nw:]
                p = softmax(x[idx] @ W + b)
                p[np.arange(len(idx)), y[idx]] -= 1.0
                p /= len(idx)
                grad = np.concatenate([(x[idx].T @ p).ravel(), p.sum(0)])
                yk = yk - LR * (grad - ci + c)
            new_ci = ci - c + (theta - yk) / (len(order) * LR)
            deltas.append(yk - theta)
            weights.append(n)
            delta_cs.append(new_ci - ci)
            c_i[int(client)] = new_ci
        weights = np.array(weights, np.float64)
        theta = theta + SERVER_LR * (weights[:, None] * np.array(deltas)).sum(0) / weights.sum()
        c = c + np.array(delta_cs).sum(0) / len(sizes)
    return theta[:nw].reshape(w0.shape), theta[nw:]


def test_scaffold_matches_numpy_reference_on_one_device(tmp_path):
    W, b, w0, b0 = run_fedstream(1, str(tmp_path / "store"))
    W_ref, b_ref = reference_scaffold(w0, b0)
    np.testing.assert_allclose(W, W_ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(b, b_ref, rtol=2e-4, atol=2e-5)
    # Control variates matter after round 1: plain FedAvg ends elsewhere.
    W_avg, _, _, _ = run_fedstream(1, str(tmp_path / "unused"), name="fedavg")
    assert np.abs(W_avg - W).max() > 1e-3


def test_scaffold_matches_numpy_reference_on_four_devices(tmp_path):
    W, b, w0, b0 = run_fedstream(4, str(tmp_path / "store"))
    W_ref, b_ref = reference_scaffold(w0, b0)
    np.testing.assert_allclose(W, W_ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(b, b_ref, rtol=2e-4, atol=2e-5)


def test_first_round_with_zero_control_variates_equals_fedavg(tmp_path):
    scaffold = run_fedstream(1, str(tmp_path / "s"), rounds=1)
    fedavg = run_fedstream(1, str(tmp_path / "f"), rounds=1, name="fedavg")
    np.testing.assert_allclose(scaffold[0], fedavg[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scaffold[1], fedavg[1], rtol=1e-6, atol=1e-7)


def test_store_reads_what_it_wrote_restores_and_collects_garbage(tmp_path):
    template = {"a": np.zeros((2, 3), np.float32), "n": np.zeros((), np.int32)}
    store = ClientStateStore(tmp_path, template, num_clients=6)
    fresh = store.read(np.array([[0, 5], [-1, 2]]))
    assert fresh["a"].shape == (2, 2, 2, 3) and not fresh["a"].any()

    def states(values):
        return {"a": np.stack([np.full((2, 3), v, np.float32) for v in values]), "n": np.array(values, np.int32)}

    store.write(1, np.array([1, 3, 4]), np.array([True, True, False]), states([1.0, 3.0, 4.0]))
    store.note_committed(1, store.index())
    store.write(2, np.array([3, 0]), np.array([True, True]), states([30.0, 10.0]))
    got = store.read(np.array([0, 1, 3, 4, -1]))
    assert got["n"].tolist() == [10, 1, 30, 0, 0] and got["a"][2].min() == 30.0
    # Resuming from checkpoint 1 forgets round 2's writes and deletes its file.
    index_1 = {"round": np.array([-1, 1, -1, 1, -1, -1], np.int32), "position": np.array([0, 0, 0, 1, 0, 0], np.int32)}
    store.restore(index_1, 1)
    assert not (tmp_path / "round-00000002.states").exists()
    assert store.read(np.array([0, 1, 3]))["n"].tolist() == [0, 1, 3]
    # A file stays while a committed checkpoint or the current index refers to it.
    store.write(2, np.array([1, 3]), np.array([True, True]), states([11.0, 33.0]))
    assert store.collect_garbage([1]) == 0
    store.note_committed(2, store.index())
    assert store.collect_garbage([2]) == 1 and not (tmp_path / "round-00000001.states").exists()
    assert store.read(np.array([1, 3]))["n"].tolist() == [11, 33]


@pytest.mark.slow
def test_scaffold_kill_and_resume_is_bit_identical(tmp_path, digits):
    rounds = 5

    def train_args(workdir, digits, *extra):
        return ["train", "digits_fedavg", "--workdir", str(workdir), f"--config.data.path={digits}",
                f"--config.num_rounds={rounds}", "--config.eval.every=2", "--config.checkpoint.keep=2", *extra]

    extra = ["--config.algorithm.name=scaffold"]
    full = run_cli(*train_args(tmp_path / "full", digits, *extra))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    assert run_cli_process(*train_args(killed, digits, *extra), fault="kill_after_round:2").returncode == -9
    assert run_cli_process(*train_args(killed, digits, *extra), fault="kill_during_save:3").returncode == -9
    resumed = run_cli(*train_args(killed, digits, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bit_identical(tmp_path / "full", killed, rounds)
    states = sorted(p.name for p in (killed / "client_state").iterdir())
    assert states and all(name.endswith(".states") for name in states)


def test_store_compaction_bounds_disk_and_keeps_latest_states(tmp_path):
    rng = np.random.default_rng(0)
    store = ClientStateStore(tmp_path, {"v": np.zeros(4, np.float32)}, num_clients=200)
    latest = {}
    committed = []
    for r in range(1, 61):
        clients = rng.choice(200, 15, replace=False)
        values = rng.normal(size=(15, 4)).astype(np.float32)
        store.write(r, clients, np.ones(15, bool), {"v": values})
        latest.update({int(c): v for c, v in zip(clients, values)})
        store.note_committed(r, store.index())
        committed = (committed + [r])[-3:]
        store.collect_garbage(committed)
    ids = np.array(sorted(latest))
    np.testing.assert_array_equal(store.read(ids)["v"], np.stack([latest[int(c)] for c in ids]))
    live_bytes = len(latest) * 16
    assert store.disk_bytes() <= 2 * live_bytes + 3 * 15 * 16 * 4  # ~2x live plus the kept checkpoints' recent files
