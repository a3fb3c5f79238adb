"""APFL against a plain-NumPy implementation of the paper's equations, its mixed personal models, and resume.

The reference re-derives APFL's Algorithm 1 with the adaptive alpha_i in
float64 on softmax regression (gradients by hand, the chain rule through the
mix written out: grad_v = alpha g, grad_alpha = <v - w, g>, the projection a
clip to [0, 1]) and shares only the data order with the library (which
clients a round samples and the order of each client's examples).
"""

import jax
import numpy as np
import optax
import pytest

import fedstream as fs
from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.algorithms.apfl import APFL
from fedstream.data.cohort import ClientBatching, client_example_order, sample_cohort
from fedstream.training.personalized_eval import evaluate_personal
from support import SplitSource, assert_bit_identical, train_records
from test_personalization import (BATCH, COHORT, INPUT_SHAPE, LR, NUM_CLASSES, ROUNDS, SEED, SERVER_LR,
                                  TEST, TOL, TRAIN, client_data, flat, grad, model, reference_summary, store_rounds)

# The clients, constants and NumPy helpers of the Ditto tests (test_personalization), with a source of its own
# (seed 11): train clients with an empty one (b) and some smaller than a batch; test clients with one absent from
# train (x), one whose train data is empty (b), one without test data (d).

CASES = {
    # the paper's single step size: SGD at LR for w_i, v_i and alpha_i
    "paper": dict(alpha_init=0.5),
    # own rates; alpha_i's steps are large enough to hit the projection at 0 or 1
    "projected": dict(alpha_init=0.8, alpha_learning_rate=40.0, personal_learning_rate=0.3),
    "fixed_alpha": dict(alpha_init=0.3, adaptive_alpha=False),
}


def source():
    return SplitSource({"train": TRAIN, "test": TEST}, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=11)


def eval_config(chunk_clients=5):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.seed = SEED
    c.data_threads = 1
    c.data = ml_collections.ConfigDict({"train_split": "train", "test_split": "test", "augment": ""})
    c.client = ml_collections.ConfigDict({"batch_size": BATCH, "max_examples": 0, "momentum": 0.0})
    c.eval = ml_collections.ConfigDict({"batch_size": 4, "chunk_clients": chunk_clients})
    return c


def run_apfl(num_devices, store_dir, options, rounds=ROUNDS):
    """APFL rounds through the sharded runner and the on-disk store; the global model, stored states, personal eval."""
    data = source()
    algorithm = build_algorithm("apfl", model(), make_optimizer("sgd", LR), make_optimizer("sgd", SERVER_LR),
                                context={"client_learning_rate": LR}, **options)
    assert isinstance(algorithm, APFL)
    state, store, mesh, theta0 = store_rounds(algorithm, data, num_devices, store_dir, rounds)  # the same seed, cohort, batch
    stored = store.read(np.arange(len(TRAIN)))
    personal = evaluate_personal(algorithm, state.params, store, data, eval_config(), mesh)  # two chunks
    return {"theta": flat(state.params), "theta0": theta0, "initialized": np.asarray(stored["initialized"]),
            "alpha": np.asarray(stored["alpha"]),
            "v": np.stack([flat(jax.tree.map(lambda a: a[i], stored["v"])) for i in range(len(TRAIN))])}, personal


def reference_apfl(theta0, alpha_init, adaptive_alpha=True, alpha_learning_rate=0.0, personal_learning_rate=0.0,
                   rounds=ROUNDS):
    """The paper's Algorithm 1 with adaptive alpha, in float64; returns (w, {client: (v_i, alpha_i)}, clipped steps)."""
    data = source()
    sizes = data.client_sizes("train")
    eta_v = personal_learning_rate or LR
    eta_alpha = alpha_learning_rate or LR
    theta, personal, clipped = theta0.copy(), {}, 0
    for r in range(rounds):
        deltas, weights = [], []
        for client in sample_cohort(SEED, r, len(sizes), COHORT):
            client, n = int(client), int(sizes[client])
            if n == 0:
                continue
            x, y = client_data(data, "train", client)
            w = theta.copy()
            v, alpha = personal.get(client, (theta.copy(), alpha_init))
            for idx in client_example_order(SEED, r, client, n, ClientBatching(BATCH)).reshape(-1, BATCH):
                idx = idx[idx >= 0]
                vbar = alpha * v + (1 - alpha) * w
                g_w, g = grad(w, x[idx], y[idx]), grad(vbar, x[idx], y[idx])
                new_alpha = alpha - eta_alpha * float(np.dot(v - w, g)) if adaptive_alpha else alpha
                clipped += not 0.0 <= new_alpha <= 1.0
                w, v, alpha = w - LR * g_w, v - eta_v * alpha * g, min(max(new_alpha, 0.0), 1.0)
            deltas.append(w - theta)
            weights.append(n)
            personal[client] = (v, alpha)
        weights = np.array(weights, np.float64)
        theta = theta + SERVER_LR * (weights[:, None] * np.array(deltas)).sum(0) / weights.sum()
    return theta, personal, clipped


def check_apfl(got, personal_eval, options):
    theta, personal, clipped = reference_apfl(got["theta0"], **options)
    np.testing.assert_allclose(got["theta"], theta, **TOL)
    assert sorted(np.flatnonzero(got["initialized"]).tolist()) == sorted(personal)
    assert len(personal) < len(TRAIN) - 1  # some client with data was never sampled: it stays on the global model
    for client, (v, alpha) in personal.items():
        np.testing.assert_allclose(got["v"][client], v, **TOL)
        np.testing.assert_allclose(got["alpha"][client], alpha, **TOL)
        assert np.abs(v - theta).max() > 1e-3  # personal models differ from the global one
    assert ((got["alpha"] >= 0) & (got["alpha"] <= 1)).all()
    if options.get("adaptive_alpha", True):
        assert any(abs(alpha - options["alpha_init"]) > 1e-3 for _, alpha in personal.values())  # alpha learned
    else:
        assert all(alpha == options["alpha_init"] for _, alpha in personal.values())
    # personal_*: alpha_i v_i + (1 - alpha_i) w with w the final global model; w for clients never trained
    data = source()
    train_ids = data.client_ids("train").tolist()

    def theta_of(cid):
        if cid not in train_ids or train_ids.index(cid) not in personal:
            return theta
        v, alpha = personal[train_ids.index(cid)]
        return alpha * v + (1 - alpha) * theta

    ref = reference_summary(data, lambda _, cid: theta_of(cid))
    for key in ("loss", "accuracy", "client_mean_loss", "client_mean_accuracy"):
        np.testing.assert_allclose(personal_eval["personal_" + key], ref[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert personal_eval["personal_num_clients"] == ref["num_clients"]
    scored = [cid for cid, n in TEST.items() if n]
    on_global = sum(1 for cid in scored if cid not in train_ids or train_ids.index(cid) not in personal)
    assert personal_eval["personal_clients_on_global_model"] == on_global
    return clipped


def test_apfl_matches_numpy_reference_on_one_device(tmp_path):
    got, personal_eval = run_apfl(1, str(tmp_path / "store"), CASES["paper"])
    check_apfl(got, personal_eval, CASES["paper"])


def test_apfl_with_projected_alpha_matches_numpy_reference_on_four_devices(tmp_path):
    got, personal_eval = run_apfl(4, str(tmp_path / "store"), CASES["projected"])
    clipped = check_apfl(got, personal_eval, CASES["projected"])
    assert clipped > 0  # the projection onto [0, 1] was exercised
    assert {0.0, 1.0} & set(got["alpha"][got["initialized"] > 0].tolist())


@pytest.mark.slow
def test_apfl_with_fixed_alpha_matches_numpy_reference(tmp_path):
    got, personal_eval = run_apfl(1, str(tmp_path / "store"), CASES["fixed_alpha"])
    check_apfl(got, personal_eval, CASES["fixed_alpha"])


def test_personal_model_is_the_mix_with_the_global_model_also_inside_an_aggregator_chain():
    """personal_model(stored, w) = alpha_i v_i + (1 - alpha_i) w per client, for APFL and for top-k around it."""
    sgd = make_optimizer("sgd", LR)
    rng = np.random.default_rng(0)
    w = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), model().init(jax.random.PRNGKey(0)))
    v = jax.tree.map(lambda a: rng.normal(size=(3, *a.shape)).astype(np.float32), w)
    stored = {"v": v, "alpha": np.array([0.0, 0.25, 1.0], np.float32), "initialized": np.array([1, 1, 0], np.int32)}
    apfl = build_algorithm("apfl", model(), sgd, sgd, context={"client_learning_rate": LR})
    topk = build_algorithm("compressed_fedavg", model(), sgd, sgd, context={"client_learning_rate": LR},
                           compression="topk", base="apfl")
    assert topk.has_personal_models and set(topk.client_state_template(w)) == {"inner", "residual"}
    for algorithm, states in ((apfl, stored), (topk, {"inner": stored, "residual": np.zeros((3, 28), np.float32)})):
        mixed, has = algorithm.personal_model(states, w)
        assert has.tolist() == [True, True, False]
        for m, vi, wi in zip(jax.tree.leaves(mixed), jax.tree.leaves(v), jax.tree.leaves(w)):
            np.testing.assert_array_equal(m[0], wi)
            np.testing.assert_allclose(m[1], 0.25 * vi[1] + 0.75 * wi, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(m[2], vi[2])
    with pytest.raises(ValueError, match="global model"):
        apfl.personal_model(stored)


def test_apfl_options_are_checked():
    sgd = make_optimizer("sgd", LR)
    for options in ({"alpha_init": 1.5}, {"alpha_learning_rate": -1.0}, {"personal_learning_rate": -0.1}):
        with pytest.raises(ValueError, match=next(iter(options))):
            build_algorithm("apfl", model(), sgd, sgd, context={"client_learning_rate": LR}, **options)
    with pytest.raises(ValueError, match="alpha_learning_rate"):  # no rate for alpha: neither option nor client's
        APFL(model(), sgd, sgd)
    assert APFL(model(), sgd, sgd, adaptive_alpha=False).alpha_step_size == 0.0
    assert APFL(model(), sgd, sgd, alpha_learning_rate=0.05, client_learning_rate=LR).alpha_step_size == 0.05


@pytest.mark.slow
def test_apfl_resume_is_bit_identical_with_its_client_states(tmp_path):
    """4 rounds straight, and 2 + 2 with the Simulation reopened from its workdir: the same checkpoint, the same
    metrics lines (personal_* and apfl_alpha_mean included), the same v_i and alpha_i in the store."""
    data_source = source()
    clients = {cid: data_source.get_client("train", i) for i, cid in enumerate(TRAIN) if TRAIN[cid]}
    tests = {cid: data_source.get_client("test", i) for i, cid in enumerate(TEST) if TEST[cid]}
    data = fs.InMemoryDataset({"train": clients, "test": tests})

    def simulation(workdir):
        algorithm = fs.APFL(model(), optax.sgd(LR), optax.sgd(SERVER_LR), alpha_learning_rate=2.0)
        return fs.Simulation(data, algorithm, clients_per_round=COHORT, batch_size=BATCH, seed=SEED, eval_every=2,
                             workdir=workdir, log=lambda _: None)

    simulation(tmp_path / "full").run(4)
    simulation(tmp_path / "resumed").run(2)
    simulation(tmp_path / "resumed").run(4)
    assert_bit_identical(tmp_path / "full", tmp_path / "resumed", 4)
    rows = train_records(tmp_path / "resumed")
    assert all(0 <= r["apfl_alpha_mean"] <= 1 for r in rows if r["kind"] == "train") and len(rows) > 4
    assert any("personal_accuracy" in r for r in rows)
    stored = []
    for name in ("full", "resumed"):
        sim = simulation(tmp_path / name)
        assert sim.rounds_done == 4
        stored.append(sim._store.read(np.arange(len(clients))))
        sim.close()
    for key in ("alpha", "initialized"):
        np.testing.assert_array_equal(stored[0][key], stored[1][key])
    for a, b in zip(jax.tree.leaves(stored[0]["v"]), jax.tree.leaves(stored[1]["v"])):
        np.testing.assert_array_equal(a, b)
    trained = stored[0]["initialized"] > 0
    assert trained.any() and (stored[0]["alpha"][trained] != 0.5).any()  # alpha moved from alpha_init
