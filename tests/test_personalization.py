"""Personalization: "FedAvg + fine-tune" evaluation and Ditto, against plain-NumPy references.

The references re-derive the equations in float64 on softmax regression
(gradients by hand, SGD / SGD-with-momentum written out, cross-entropy and
accuracy per example) and share only the data order with the library:
which clients a round samples and the order of each client's examples
(`sample_cohort`, `client_example_order`), and, for fine-tuning, the
batching that yields exactly k full batches (`finetune_batching`, checked
here to be k full batches).
"""

import math

import jax
import ml_collections
import numpy as np
import pytest

from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.algorithms.ditto import Ditto
from fedstream.data.cohort import ClientBatching, CohortPipeline, client_example_order, sample_cohort
from fedstream.models import get_model
from fedstream.training.client_store import ClientStateStore
from fedstream.training.personalized_eval import evaluate_finetuned, evaluate_personal, personalized_pipeline
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from fedstream.training.train import evaluate
from support import SplitSource, softmax

# Train clients: an empty one (b) and one smaller than a batch. Test clients: one absent from train (x), one
# whose train data is empty (b), one without test data (d), in an order unlike train's.
TRAIN = {"a": 12, "b": 0, "c": 30, "d": 7, "e": 3, "f": 20, "g": 1, "h": 16}
TEST = {"c": 9, "x": 5, "a": 4, "b": 6, "d": 0, "f": 11, "g": 3, "h": 2, "e": 8}
INPUT_SHAPE, NUM_CLASSES = (3, 2, 1), 4
SEED, COHORT, ROUNDS, BATCH, LR, SERVER_LR = 5, 4, 3, 5, 0.2, 0.9
TOL = dict(rtol=2e-4, atol=2e-5)


def source():
    return SplitSource({"train": TRAIN, "test": TEST}, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=7)


def make_config(momentum=0.0, max_examples=0, chunk_clients=4, eval_batch=4):
    c = ml_collections.ConfigDict()
    c.seed = SEED
    c.data_threads = 1
    c.data = ml_collections.ConfigDict({"train_split": "train", "test_split": "test", "augment": ""})
    c.client = ml_collections.ConfigDict({"batch_size": BATCH, "max_examples": max_examples, "momentum": momentum})
    c.eval = ml_collections.ConfigDict({"batch_size": eval_batch, "chunk_clients": chunk_clients})
    return c


def model():
    return get_model("logistic", INPUT_SHAPE, NUM_CLASSES)


def flat(params):
    return np.concatenate([np.asarray(params["Dense_0"]["kernel"], np.float64).ravel(),
                           np.asarray(params["Dense_0"]["bias"], np.float64)])


SHAPE = (int(np.prod(INPUT_SHAPE)), NUM_CLASSES)


def grad(theta, x, y):
    """Gradient of the mean softmax cross-entropy over the batch."""
    k = SHAPE[0] * SHAPE[1]
    p = softmax(x @ theta[:k].reshape(SHAPE) + theta[k:])
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return np.concatenate([(x.T @ p).ravel(), p.sum(0)])


def client_data(data, split, position):
    d = data.get_client(split, position)
    return d["x"].reshape(len(d["y"]), SHAPE[0]).astype(np.float64), d["y"]


def reference_summary(data, theta_of):
    """summarize_eval's numbers with client c scored by theta_of(test position, id)."""
    losses, corrects, per_client = [], [], []
    for position, cid in enumerate(data.client_ids("test").tolist()):
        x, y = client_data(data, "test", position)
        if not len(y):
            continue
        theta = theta_of(position, cid)
        k = SHAPE[0] * SHAPE[1]
        p = softmax(x @ theta[:k].reshape(SHAPE) + theta[k:])
        loss = -np.log(p[np.arange(len(y)), y])
        correct = (p.argmax(1) == y).astype(np.float64)
        losses.append(loss)
        corrects.append(correct)
        per_client.append((loss.mean(), correct.mean()))
    return {"loss": np.concatenate(losses).mean(), "accuracy": np.concatenate(corrects).mean(),
            "client_mean_loss": np.mean([a for a, _ in per_client]),
            "client_mean_accuracy": np.mean([b for _, b in per_client]),
            "num_clients": len(per_client), "num_examples": sum(len(v) for v in losses)}


def reference_finetune(data, theta0, steps, lr, momentum, round_index, max_examples=0):
    """Each test client: `steps` SGD(momentum) steps on its train data from theta0, then scored on its test data."""
    train_ids = data.client_ids("train").tolist()
    sizes = data.client_sizes("train")

    def theta_of(position, cid):
        theta = theta0.copy()
        if cid not in train_ids or sizes[train_ids.index(cid)] == 0 or steps == 0:
            return theta
        t = train_ids.index(cid)
        x, y = client_data(data, "train", t)
        used = min(len(y), max_examples) if max_examples else len(y)
        batching = ClientBatching(BATCH, epochs=math.ceil(steps * BATCH / used), max_examples=max_examples,
                                  max_steps=steps)
        order = client_example_order(SEED, round_index, t, len(y), batching)
        assert order.size == steps * BATCH and (order >= 0).all()  # exactly k full batches
        trace = np.zeros_like(theta)
        for idx in order.reshape(steps, BATCH):
            g = grad(theta, x[idx], y[idx])
            trace = g + momentum * trace  # optax.sgd(momentum=m): trace = g + m * trace
            theta = theta - lr * trace
        return theta

    return reference_summary(data, theta_of)


def assert_summary(got, ref, prefix):
    for key in ("loss", "accuracy", "client_mean_loss", "client_mean_accuracy"):
        np.testing.assert_allclose(got[prefix + key], ref[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert got[prefix + "num_clients"] == ref["num_clients"]
    assert got[prefix + "num_examples"] == ref["num_examples"]


def run_finetune(num_devices, cases):
    """evaluate_finetuned for each (steps, momentum, max_examples, round) case, from the initial model; and theta0."""
    data = source()
    mesh = make_mesh(num_devices)
    out = []
    for steps, momentum, max_examples, round_index in cases:
        algorithm = build_algorithm("fedavg", model(), make_optimizer("sgd", LR, momentum=momentum),
                                    make_optimizer("sgd", 1.0))
        params = algorithm.init(jax.random.PRNGKey(1)).params
        config = make_config(momentum, max_examples)
        out.append(evaluate_finetuned(algorithm, params, data, config, mesh, steps, round_index=round_index))
    return out, flat(params)


FINETUNE_CASES = [(3, 0.0, 0, 2), (7, 0.5, 5, 4)]


def test_finetune_eval_matches_numpy_reference_on_one_device():
    got, theta0 = run_finetune(1, FINETUNE_CASES)
    data = source()
    for (steps, momentum, max_examples, round_index), result in zip(FINETUNE_CASES, got):
        ref = reference_finetune(data, theta0, steps, LR, momentum, round_index, max_examples)
        assert_summary(result, ref, "finetuned_")
        # x is not in train, b's train data is empty (d has no test data and is not scored).
        assert result["finetuned_clients_without_train_data"] == 2 and result["finetuned_steps"] == steps
        # Fine-tuning changed the numbers.
        plain = reference_finetune(data, theta0, 0, LR, momentum, round_index)
        assert abs(plain["client_mean_loss"] - ref["client_mean_loss"]) > 1e-2


def test_zero_finetune_steps_equal_plain_evaluation():
    data = source()
    mesh = make_mesh(1)
    algorithm = build_algorithm("fedavg", model(), make_optimizer("sgd", LR), make_optimizer("sgd", 1.0))
    params = algorithm.init(jax.random.PRNGKey(2)).params
    config = make_config(chunk_clients=3, eval_batch=2)
    plain = evaluate(algorithm, params, data, config, mesh)
    tuned = evaluate_finetuned(algorithm, params, data, config, mesh, 0, round_index=9)
    for key, value in plain.items():
        np.testing.assert_allclose(tuned["finetuned_" + key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_finetune_pipeline_packs_clients_onto_devices():
    """Chunks spread clients over devices with their own train and test steps; slots are bucketed."""
    data = source()
    algorithm = build_algorithm("fedavg", model(), make_optimizer("sgd", LR), make_optimizer("sgd", 1.0))

    class FourDevices:
        size = 4

    pipeline = personalized_pipeline(algorithm, data, make_config(chunk_clients=9), FourDevices(), 3, 0)
    (part,) = list(pipeline.chunks())
    batch = part["batch"]
    assert batch["x"].shape[0] == 4 and batch["train_x"].shape[:3] == (4, batch["train_x"].shape[1], BATCH)
    scored = part["slot_test_client"] >= 0
    assert sorted(part["slot_test_client"][scored].tolist()) == [i for i, n in enumerate(TEST.values()) if n]
    assert (scored.sum(1) > 0).sum() >= 3  # clients do spread over devices
    steps = batch["slot_train_steps"][scored]
    ids = data.client_ids("test")[part["slot_test_client"][scored]]
    assert all((s == 0) == (i in ("x", "b")) for s, i in zip(steps, ids))
    assert batch["train_mask"].sum() == 3 * BATCH * int((steps > 0).sum())


# ---------------------------------------------------------------------------------------------------------------
# Ditto
# ---------------------------------------------------------------------------------------------------------------

DITTO_CASES = {"client_lr": dict(ditto_lambda=0.5), "own_lr": dict(ditto_lambda=2.0, personal_learning_rate=0.05)}


def store_rounds(algorithm, data, num_devices, store_dir, rounds):
    """`rounds` rounds of a stateful algorithm through the sharded runner and the on-disk client-state store.

    Returns (server state, store, mesh, the initial parameters flattened).
    """
    mesh = make_mesh(num_devices)
    pipeline = CohortPipeline(data, "train", ("x", "y"), seed=SEED, cohort_size=COHORT,
                              batching=ClientBatching(BATCH), num_devices=num_devices, data_threads=0)
    state = algorithm.init(jax.random.PRNGKey(0))
    theta0 = flat(state.params)
    template = jax.tree.map(np.asarray, algorithm.client_state_template(state.params))
    store = ClientStateStore(store_dir, template, data.client_sizes("train").size)
    state = replicate(state, mesh)
    round_fn = build_train_round(algorithm, mesh, seed=SEED)
    iterator = pipeline.iterator(rounds)
    for r in range(rounds):
        batch = next(iterator)["batch"]
        clients = np.where(batch["slot_steps"] > 0, batch["slot_client"], -1)
        state, _, new = round_fn(state, shard_batch(batch, mesh), shard_batch(store.read(clients), mesh))
        store.write(r + 1, clients, clients >= 0, jax.device_get(new))
    return state, store, mesh, theta0


def run_ditto(num_devices, store_dir, options, rounds=ROUNDS, evals=True):
    """Ditto rounds through the sharded runner and the on-disk store; params, stored states and personal evals."""
    data = source()
    algorithm = build_algorithm("ditto", model(), make_optimizer("sgd", LR), make_optimizer("sgd", SERVER_LR),
                                context={"client_learning_rate": LR}, **options)
    assert isinstance(algorithm, Ditto)
    state, store, mesh, theta0 = store_rounds(algorithm, data, num_devices, store_dir, rounds)
    stored = store.read(np.arange(len(TRAIN)))
    personal = finetuned = {}
    if evals:  # two chunks of test clients
        config = make_config(chunk_clients=5)
        personal = evaluate_personal(algorithm, state.params, store, data, config, mesh)
        finetuned = evaluate_finetuned(algorithm, state.params, data, config, mesh, 2, round_index=rounds)
    return {"theta": flat(state.params), "theta0": theta0, "initialized": np.asarray(stored["initialized"]),
            "v": np.stack([flat(jax.tree.map(lambda a: a[i], stored["v"])) for i in range(len(TRAIN))])}, \
        {**personal, **finetuned}


def reference_ditto(theta0, ditto_lambda, personal_learning_rate=0.0, rounds=ROUNDS):
    """The paper's Algorithm 1 in float64: FedAvg for w; v_i <- v_i - eta_p (grad f_i(v_i) + lambda (v_i - w^t))."""
    data = source()
    sizes = data.client_sizes("train")
    eta_p = personal_learning_rate or LR
    theta, v = theta0.copy(), {}
    for r in range(rounds):
        deltas, weights = [], []
        for client in sample_cohort(SEED, r, len(sizes), COHORT):
            client, n = int(client), int(sizes[client])
            if n == 0:
                continue
            x, y = client_data(data, "train", client)
            w, vi = theta.copy(), v.get(client, theta.copy())
            for idx in client_example_order(SEED, r, client, n, ClientBatching(BATCH)).reshape(-1, BATCH):
                idx = idx[idx >= 0]
                g_w, g_v = grad(w, x[idx], y[idx]), grad(vi, x[idx], y[idx])
                w = w - LR * g_w
                vi = vi - eta_p * (g_v + ditto_lambda * (vi - theta))
            deltas.append(w - theta)
            weights.append(n)
            v[client] = vi
        weights = np.array(weights, np.float64)
        theta = theta + SERVER_LR * (weights[:, None] * np.array(deltas)).sum(0) / weights.sum()
    return theta, v


def check_ditto(got, evals, options):
    theta, v = reference_ditto(got["theta0"], **options)
    np.testing.assert_allclose(got["theta"], theta, **TOL)
    assert sorted(np.flatnonzero(got["initialized"]).tolist()) == sorted(v)
    assert len(v) < len(TRAIN) - 1  # some client with data was never sampled: it stays on the global model
    for client, vi in v.items():
        np.testing.assert_allclose(got["v"][client], vi, **TOL)
        assert np.abs(vi - theta).max() > 1e-3  # personal models differ from the global one
    data = source()
    train_ids = data.client_ids("train").tolist()
    ref = reference_summary(data, lambda _, cid: v.get(train_ids.index(cid), theta) if cid in train_ids else theta)
    assert_summary(evals, ref, "personal_")
    scored_ids = [cid for cid, n in TEST.items() if n]
    on_global = sum(1 for cid in scored_ids if cid not in train_ids or train_ids.index(cid) not in v)
    assert evals["personal_clients_on_global_model"] == on_global
    assert_summary(evals, reference_finetune(data, theta, 2, LR, 0.0, ROUNDS), "finetuned_")


@pytest.mark.parametrize("case", sorted(DITTO_CASES))
def test_ditto_matches_numpy_reference_on_one_device(tmp_path, case):
    got, evals = run_ditto(1, str(tmp_path / "store"), DITTO_CASES[case])
    check_ditto(got, evals, DITTO_CASES[case])


def test_ditto_and_finetune_match_numpy_reference_on_four_devices(tmp_path):
    got, evals = run_ditto(4, str(tmp_path / "store"), DITTO_CASES["client_lr"])
    check_ditto(got, evals, DITTO_CASES["client_lr"])
    tuned, theta0 = run_finetune(4, FINETUNE_CASES[1:])
    steps, momentum, max_examples, round_index = FINETUNE_CASES[1]
    ref = reference_finetune(source(), theta0, steps, LR, momentum, round_index, max_examples)
    assert_summary(tuned[0], ref, "finetuned_")


def test_ditto_with_large_lambda_keeps_personal_models_at_the_global_model(tmp_path):
    """lambda -> infinity pins v_i to w^t: with eta_p = 1/lambda, v_i = w^t - grad f_i / lambda after each step."""
    lam = 1e4
    got, _ = run_ditto(1, str(tmp_path / "store"), {"ditto_lambda": lam, "personal_learning_rate": 1 / lam},
                       rounds=1, evals=False)
    trained = np.flatnonzero(got["initialized"])
    assert trained.size
    assert np.abs(got["v"][trained] - got["theta0"]).max() < 1e-3
    assert np.abs(got["theta"] - got["theta0"]).max() > 1e-2  # while the global model moved


def test_ditto_options_are_checked():
    with pytest.raises(ValueError):
        build_algorithm("ditto", model(), make_optimizer("sgd", LR), make_optimizer("sgd", 1.0), ditto_lambda=-1.0)
    with pytest.warns(UserWarning, match="diverge"):
        build_algorithm("ditto", model(), make_optimizer("sgd", LR), make_optimizer("sgd", 1.0),
                        context={"client_learning_rate": LR}, ditto_lambda=20.0)
