"""FedAvg / FedOpt rounds against an independent plain-NumPy implementation.

The reference re-derives everything from the papers' equations (softmax
regression gradients by hand, client SGD, weighted delta average, optax's
Adam/Yogi update rules written out) and shares only the data order with the
library: which clients a round samples and in which order each client sees
its examples (`sample_cohort`, `client_example_order`), which is the
pipeline's definition rather than arithmetic under test.
"""


import jax
import numpy as np
import pytest

from fedstream.algorithms.fedavg import FedAvg, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline, client_example_order, sample_cohort
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, shard_batch
from support import InMemorySource, softmax


class NumpyServerOpt:
    """Server optimizers as optax defines them (bias-corrected moments)."""

    def __init__(self, name, lr, b1=0.9, b2=0.999, eps=1e-3, momentum=0.0):
        self.name, self.lr, self.b1, self.b2, self.eps, self.momentum = name, lr, b1, b2, eps, momentum
        self.t = 0
        self.m = self.v = self.trace = None

    def step(self, w, g):
        self.t += 1
        if self.name == "sgd":
            if self.momentum:
                self.trace = g if self.trace is None else g + self.momentum * self.trace
                g = self.trace
            return w - self.lr * g
        if self.m is None:
            init = 1e-6 if self.name == "yogi" else 0.0
            self.m, self.v = np.full_like(w, init), np.full_like(w, init)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        if self.name == "adam":
            self.v = self.b2 * self.v + (1 - self.b2) * g * g
        else:  # yogi
            self.v = self.v - (1 - self.b2) * np.sign(self.v - g * g) * g * g
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        return w - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def reference_fedavg(source, *, seed, rounds, cohort, batching, client_lr, server, uniform, w0, b0):
    """Plain-NumPy FedAvg on softmax regression; returns (W, b)."""
    W, b = w0.astype(np.float64), b0.astype(np.float64)
    sizes = source.client_sizes("train")
    theta = np.concatenate([W.ravel(), b])
    for r in range(rounds):
        deltas, weights = [], []
        for c in sample_cohort(seed, r, len(sizes), cohort):
            n = int(sizes[c])
            if n == 0:
                continue
            data = source.get_client("train", c)
            x = data["x"].reshape(n, -1).astype(np.float64)
            y = data["y"]
            order = client_example_order(seed, r, int(c), n, batching).reshape(-1, batching.batch_size)
            Wc, bc = W.copy(), b.copy()
            for batch in order:
                idx = batch[batch >= 0]
                p = softmax(x[idx] @ Wc + bc)
                p[np.arange(len(idx)), y[idx]] -= 1.0
                p /= len(idx)
                Wc -= client_lr * x[idx].T @ p
                bc -= client_lr * p.sum(0)
            deltas.append(np.concatenate([(Wc - W).ravel(), bc - b]))
            weights.append(1.0 if uniform else batching.examples_used(n))
        weights = np.array(weights)
        mean_delta = (weights[:, None] * np.array(deltas)).sum(0) / weights.sum()
        theta = server.step(theta, -mean_delta)
        W, b = theta[: W.size].reshape(W.shape), theta[W.size:]
    return W, b


CASES = {
    "fedavg": dict(server=("sgd", 1.0, {}), batching=ClientBatching(5), uniform=False),
    "fedavgm_uniform_epochs": dict(server=("sgd", 0.7, {"momentum": 0.9}), batching=ClientBatching(4, epochs=2),
                                   uniform=True),
    "fedadam_capped": dict(server=("adam", 0.05, {"eps": 1e-3}),
                           batching=ClientBatching(3, epochs=3, max_examples=7, max_steps=5), uniform=False),
    "fedyogi": dict(server=("yogi", 0.05, {"eps": 1e-3}), batching=ClientBatching(6), uniform=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rounds_match_numpy_reference(case):
    spec = CASES[case]
    # Sizes include an empty client, clients smaller than one batch, and a large one.
    sizes = [0, 1, 3, 12, 25, 7, 40, 2, 9, 16, 5, 30]
    source = InMemorySource(sizes, input_shape=(4, 3, 1), num_classes=5, seed=1)
    name, lr, extra = spec["server"]
    model = get_model("logistic", (4, 3, 1), 5)
    algorithm = FedAvg(model, make_optimizer("sgd", 0.3), make_optimizer(name, lr, **extra))
    mesh = make_mesh(1)
    pipeline = CohortPipeline(source, "train", ("x", "y"), seed=3, cohort_size=5, batching=spec["batching"],
                              num_devices=1, uniform_weights=spec["uniform"], data_threads=0)
    round_fn = build_train_round(algorithm, mesh, seed=3)
    state = algorithm.init(jax.random.PRNGKey(0))
    w0 = np.asarray(state.params["Dense_0"]["kernel"])
    b0 = np.asarray(state.params["Dense_0"]["bias"])
    rounds = 4
    iterator = pipeline.iterator(rounds)
    for _ in range(rounds):
        state, _ = round_fn(state, shard_batch(next(iterator)["batch"], mesh))

    server = NumpyServerOpt(name, lr, **extra)
    W, b = reference_fedavg(source, seed=3, rounds=rounds, cohort=5, batching=spec["batching"], client_lr=0.3,
                            server=server, uniform=spec["uniform"], w0=w0, b0=b0)
    np.testing.assert_allclose(np.asarray(state.params["Dense_0"]["kernel"]), W, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(state.params["Dense_0"]["bias"]), b, rtol=2e-4, atol=2e-5)
    assert int(state.round) == rounds
    # The model moved: the comparison is not between two untouched inits.
    assert np.abs(W - w0).max() > 1e-2


@pytest.mark.parametrize("num_devices", [1, 4])
def test_packed_clients_of_very_different_sizes_match_one_at_a_time_reference(tmp_path, num_devices):
    """Clients from 1 to 310 examples, several per device stream, against the client-by-client reference."""
    import run_packed

    got = run_packed.run(num_devices)
    source = InMemorySource(run_packed.SIZES, input_shape=(4, 3, 1), num_classes=5, seed=2)
    W, b = reference_fedavg(source, seed=run_packed.SEED, rounds=run_packed.ROUNDS, cohort=run_packed.COHORT,
                            batching=ClientBatching(run_packed.BATCH), client_lr=run_packed.CLIENT_LR,
                            server=NumpyServerOpt("sgd", 1.0), uniform=False, w0=got["w0"], b0=got["b0"])
    np.testing.assert_allclose(got["W"], W, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got["b"], b, rtol=2e-4, atol=2e-5)
    assert np.abs(W - got["w0"]).max() > 1e-2
    if num_devices > 1:  # the 310-example client dominates: devices do wait for it
        assert (got["waste"] > 0).all()
