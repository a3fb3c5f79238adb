"""FedProx, FedNova, Mime, MimeLite, AgnosticFedAvg and HypCluster against plain-NumPy references.

Each reference re-derives its paper's update equations in float64 on
softmax regression (gradients by hand, optax's SGD/momentum/Adam rules
written out) and shares only the data order with the library: which
clients a round samples, the order in which each client sees its
examples, and which examples the prepass covers (a client's first epoch).
fedstream's params after 3 rounds (`run_algorithm.py`) must match on 1 and
on 4 devices. Properties tie each
algorithm to FedAvg (or to centralized SGD) where the papers say they meet.
"""

import dataclasses

import jax
import numpy as np
import pytest

import run_algorithm
from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.algorithms.hyp_cluster import combine_cluster_evals, kmeans_init
from fedstream.data.cohort import ClientBatching, client_example_order, sample_cohort
from fedstream.models import get_model
from run_algorithm import CASES, COHORT, ROUNDS, SEED, SIZES, DomainSource
from support import softmax

TOL = dict(rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# NumPy building blocks
# ---------------------------------------------------------------------------------------------------------------

def pack(W, b):
    return np.concatenate([np.asarray(W, np.float64).ravel(), np.asarray(b, np.float64)])


def unpack(theta, shape):
    k = int(np.prod(shape))
    return theta[:k].reshape(shape), theta[k:]


def per_example_losses(theta, x, y, shape):
    W, b = unpack(theta, shape)
    p = softmax(x @ W + b)
    return -np.log(p[np.arange(len(y)), y])


def grad_sum(theta, x, y, coef, shape):
    """sum_j coef_j * grad l_j(theta) for softmax cross-entropy."""
    W, b = unpack(theta, shape)
    p = softmax(x @ W + b)
    p[np.arange(len(y)), y] -= 1.0
    p *= np.asarray(coef, np.float64).reshape(-1, 1)
    return np.concatenate([(x.T @ p).ravel(), p.sum(0)])


def mean_grad(theta, x, y, shape):
    return grad_sum(theta, x, y, np.full(len(y), 1.0 / len(y)), shape)


class NumpyOpt:
    """optax.sgd (heavy-ball trace: v = g + m v, update -lr v) and optax.adam, as update(g, state) -> (u, state)."""

    def __init__(self, name, lr, momentum=0.0, b1=0.9, b2=0.999, eps=1e-8):
        self.name, self.lr, self.momentum, self.b1, self.b2, self.eps = name, lr, momentum, b1, b2, eps

    def init(self, theta):
        return {"t": 0, "m": np.zeros_like(theta), "v": np.zeros_like(theta)}

    def update(self, g, state):
        if self.name == "sgd":
            if not self.momentum:
                return -self.lr * g, state
            trace = g + self.momentum * state["m"]
            return -self.lr * trace, {**state, "m": trace}
        t = state["t"] + 1
        m = self.b1 * state["m"] + (1 - self.b1) * g
        v = self.b2 * state["v"] + (1 - self.b2) * g * g
        m_hat, v_hat = m / (1 - self.b1 ** t), v / (1 - self.b2 ** t)
        return -self.lr * m_hat / (np.sqrt(v_hat) + self.eps), {"t": t, "m": m, "v": v}


def numpy_opt(spec):
    name, lr, kw = spec
    return NumpyOpt(name, lr, **kw)


@dataclasses.dataclass
class Client:
    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray
    batches: list  # example indices of each local step
    first_epoch: np.ndarray  # the examples the prepass covers
    weight: float  # examples used


def round_clients(spec, r, sizes=SIZES):
    """The round's non-empty clients in cohort order, with their step batches (the pipeline's data order)."""
    source = DomainSource(sizes, domains=spec.get("domains", 2))
    batching = spec["batching"]
    counts = source.client_sizes("train")
    for c in sample_cohort(SEED, r, len(counts), COHORT):
        n = int(counts[c])
        if n == 0:
            continue
        data = source.get_client("train", c)
        order = client_example_order(SEED, r, int(c), n, batching)
        used = batching.examples_used(n)
        yield Client(data["x"].reshape(n, -1).astype(np.float64), data["y"], data["domain_id"],
                     [b[b >= 0] for b in order.reshape(-1, batching.batch_size)], order[:used], float(used))


def weighted_mean(vectors, weights):
    weights = np.asarray(weights, np.float64)
    return (weights[:, None] * np.array(vectors)).sum(0) / weights.sum()


# ---------------------------------------------------------------------------------------------------------------
# The papers' algorithms, client by client
# ---------------------------------------------------------------------------------------------------------------

def reference_fedprox(spec, W0, b0, rounds=ROUNDS, sizes=SIZES):
    """Li et al. (2020): local SGD on F_i(w) + mu/2 ||w - w_t||^2, weighted mean delta to ServerOpt."""
    shape, mu = W0.shape, spec["options"]["proximal_weight"]
    client_opt, server_opt = numpy_opt(spec["client"]), numpy_opt(spec["server"])
    theta = pack(W0, b0)
    server_state = server_opt.init(theta)
    for r in range(rounds):
        deltas, weights = [], []
        for cl in round_clients(spec, r, sizes):
            w, state = theta.copy(), client_opt.init(theta)
            for idx in cl.batches:
                u, state = client_opt.update(mean_grad(w, cl.x[idx], cl.y[idx], shape) + mu * (w - theta), state)
                w = w + u
            deltas.append(w - theta)
            weights.append(cl.weight)
        u, server_state = server_opt.update(-weighted_mean(deltas, weights), server_state)
        theta = theta + u
    return unpack(theta, shape)


def reference_fednova(spec, W0, b0, rounds=ROUNDS, sizes=SIZES):
    """Wang et al. (2020): d_i = Delta_i / ||a_i||_1, ServerOpt on -tau_eff sum_i p_i d_i.

    Momentum SGD (v <- rho v + g): ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho).
    """
    shape, rho = W0.shape, spec["client"][2].get("momentum", 0.0)
    client_opt, server_opt = numpy_opt(spec["client"]), numpy_opt(spec["server"])
    theta = pack(W0, b0)
    server_state = server_opt.init(theta)
    for r in range(rounds):
        normalized, a_norms, weights = [], [], []
        for cl in round_clients(spec, r, sizes):
            w, state = theta.copy(), client_opt.init(theta)
            for idx in cl.batches:
                u, state = client_opt.update(mean_grad(w, cl.x[idx], cl.y[idx], shape), state)
                w = w + u
            tau = len(cl.batches)
            a = tau if rho == 0 else (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)
            normalized.append((w - theta) / a)
            a_norms.append(a)
            weights.append(cl.weight)
        p = np.array(weights) / np.sum(weights)
        tau_eff = float(p @ np.array(a_norms))
        u, server_state = server_opt.update(-tau_eff * (p[:, None] * np.array(normalized)).sum(0), server_state)
        theta = theta + u
    return unpack(theta, shape)


def reference_mime(spec, W0, b0, rounds=ROUNDS, sizes=SIZES, lite=False):
    """Karimireddy et al. (2021) as FedJAX: base-optimizer state s frozen on clients;
    x += eta_s mean Delta; s <- B(c, s).

    Mime steps with grad f(y; b) - grad f(x; b) + c; MimeLite with grad f(y; b) (and optional delta clipping).
    """
    shape = W0.shape
    base = numpy_opt(spec["client"])
    eta_s = spec["options"]["server_learning_rate"]
    clip = spec["options"].get("client_delta_clip_norm", 0.0)
    theta = pack(W0, b0)
    s = base.init(theta)
    clipped = 0
    for r in range(rounds):
        clients = list(round_clients(spec, r, sizes))
        count = sum(len(cl.first_epoch) for cl in clients)
        c = sum(grad_sum(theta, cl.x[cl.first_epoch], cl.y[cl.first_epoch], np.ones(len(cl.first_epoch)), shape)
                for cl in clients) / count
        deltas, weights = [], []
        for cl in clients:
            y = theta.copy()
            for idx in cl.batches:
                g = mean_grad(y, cl.x[idx], cl.y[idx], shape)
                if not lite:
                    g = g - mean_grad(theta, cl.x[idx], cl.y[idx], shape) + c
                u, _ = base.update(g, s)  # the state is frozen
                y = y + u
            delta = y - theta
            if clip > 0 and np.linalg.norm(delta) > clip:
                delta, clipped = delta * clip / np.linalg.norm(delta), clipped + 1
            deltas.append(delta)
            weights.append(cl.weight)
        _, s = base.update(c, s)
        theta = theta + eta_s * weighted_mean(deltas, weights)
    if clip > 0:
        assert 0 < clipped < sum(1 for r in range(rounds) for _ in round_clients(spec, r, sizes))
    return unpack(theta, shape)


def reference_agnostic_fedavg(spec, W0, b0, rounds=ROUNDS, sizes=SIZES):
    """Ro et al. (2021) as FedJAX: alpha = lambda / mean window; beta_i = alpha . N_i; local loss
    sum_z alpha_dom(z) l(z) / beta_i; beta-weighted mean delta; lambda by exponentiated gradient."""
    shape, o = W0.shape, spec["options"]
    client_opt, server_opt = numpy_opt(spec["client"]), numpy_opt(spec["server"])
    K = len(o["init_domain_weights"])
    lam = np.array(o["init_domain_weights"], np.float64)
    window = np.tile(np.array(o.get("init_domain_window") or np.ones(K), np.float64), (o["domain_window_size"], 1))
    theta = pack(W0, b0)
    server_state = server_opt.init(theta)
    for r in range(rounds):
        alpha = lam / window.mean(0)
        deltas, betas, L, N = [], [], np.zeros(K), np.zeros(K)
        for cl in round_clients(spec, r, sizes):
            e = cl.first_epoch
            losses = per_example_losses(theta, cl.x[e], cl.y[e], shape)
            Li = np.bincount(cl.domain[e], losses, minlength=K)
            Ni = np.bincount(cl.domain[e], minlength=K).astype(np.float64)
            beta = float(alpha @ Ni)
            w, state = theta.copy(), client_opt.init(theta)
            for idx in cl.batches:
                g = grad_sum(w, cl.x[idx], cl.y[idx], alpha[cl.domain[idx]] / beta, shape)
                u, state = client_opt.update(g, state)
                w = w + u
            deltas.append(w - theta)
            betas.append(beta)
            L, N = L + Li, N + Ni
        u, server_state = server_opt.update(-weighted_mean(deltas, betas), server_state)
        theta = theta + u
        mean_loss = np.where(N > 0, L / np.maximum(N, 1), 0.0)
        if o.get("domain_algorithm", "eg") == "eg":
            lam = lam * np.exp(o["domain_learning_rate"] * mean_loss)
            lam = lam / lam.sum()
        window = np.vstack([window[1:], N[None]])
    W, b = unpack(theta, shape)
    return W, b, lam, window


def reference_hyp_cluster(spec, W0, b0, rounds=ROUNDS, sizes=SIZES):
    """Mansour et al. (2020): each client trains the cluster of lowest loss on its data; per-cluster mean deltas,
    one ServerOpt state per cluster; a cluster nobody chose is left alone. W0, b0 have a leading cluster axis."""
    k, shape = W0.shape[0], W0.shape[1:]
    client_opt, server_opt = numpy_opt(spec["client"]), numpy_opt(spec["server"])
    thetas = [pack(W0[j], b0[j]) for j in range(k)]
    states = [server_opt.init(t) for t in thetas]
    chosen, margin = np.zeros(k, int), np.inf
    for r in range(rounds):
        sums, weights = [np.zeros_like(t) for t in thetas], np.zeros(k)
        for cl in round_clients(spec, r, sizes):
            e = cl.first_epoch
            losses = np.array([per_example_losses(t, cl.x[e], cl.y[e], shape).sum() for t in thetas])
            j = int(np.argmin(losses))
            margin = min(margin, float(np.sort(losses)[1] - losses[j]) / len(e) if k > 1 else np.inf)
            chosen[j] += 1
            w, state = thetas[j].copy(), client_opt.init(thetas[j])
            for idx in cl.batches:
                u, state = client_opt.update(mean_grad(w, cl.x[idx], cl.y[idx], shape), state)
                w = w + u
            sums[j] += cl.weight * (w - thetas[j])
            weights[j] += cl.weight
        for j in range(k):
            if weights[j] > 0:
                u, states[j] = server_opt.update(-sums[j] / weights[j], states[j])
                thetas[j] = thetas[j] + u
    # The assignment is well conditioned (float32 agrees) and every cluster was trained.
    assert margin > 1e-4 and (chosen > 0).all(), (margin, chosen)
    W = np.stack([unpack(t, shape)[0] for t in thetas])
    b = np.stack([unpack(t, shape)[1] for t in thetas])
    return W, b


def reference(case, got):
    """The NumPy reference's (W, b[, extra arrays]) for a case, from fedstream's initial params."""
    spec = CASES[case]
    name = spec["algorithm"]
    if name == "fedprox":
        return reference_fedprox(spec, got["W0"], got["b0"])
    if name == "fednova":
        return reference_fednova(spec, got["W0"], got["b0"])
    if name in ("mime", "mimelite"):
        return reference_mime(spec, got["W0"], got["b0"], lite=name == "mimelite")
    if name == "agnostic_fedavg":
        return reference_agnostic_fedavg(spec, got["W0"], got["b0"])
    if name == "hyp_cluster":
        return reference_hyp_cluster(spec, got["W0"], got["b0"])
    raise KeyError(name)


def assert_matches_reference(case, got):
    expected = reference(case, got)
    np.testing.assert_allclose(got["W"], expected[0], **TOL)
    np.testing.assert_allclose(got["b"], expected[1], **TOL)
    if CASES[case]["algorithm"] == "agnostic_fedavg":
        np.testing.assert_allclose(got["domain_weights"], expected[2], **TOL)
        np.testing.assert_allclose(got["domain_window"], expected[3], **TOL)
        # Exponentiated gradient moved the weights.
        assert np.abs(got["domain_weights"] - CASES[case]["options"]["init_domain_weights"]).max() > 1e-3
    # The model moved: the comparison is not between two untouched inits.
    assert np.abs(got["W"] - got["W0"]).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# fedstream vs the references, on 1 and 4 devices
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_one_device_matches_numpy_reference(case):
    assert_matches_reference(case, run_algorithm.run(CASES[case], 1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_four_devices_match_numpy_reference(case):
    assert_matches_reference(case, run_algorithm.run(CASES[case], 4))


# ---------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------

BASELINE = dict(algorithm="fedavg", options={}, client=("sgd", 0.2, {}), server=("sgd", 0.8, {}),
                batching=ClientBatching(5, epochs=2))


@pytest.fixture(scope="module")
def fedavg_baseline():
    return run_algorithm.run(BASELINE, 1)


def test_fedprox_with_zero_mu_equals_fedavg(fedavg_baseline):
    got = run_algorithm.run({**BASELINE, "algorithm": "fedprox", "options": {"proximal_weight": 0.0}}, 1)
    np.testing.assert_array_equal(got["W"], fedavg_baseline["W"])
    np.testing.assert_array_equal(got["b"], fedavg_baseline["b"])


def test_hyp_cluster_with_one_cluster_equals_fedavg(fedavg_baseline):
    def same_init(algorithm):
        return algorithm.init_from([algorithm.model.init(jax.random.PRNGKey(0))])

    got = run_algorithm.run({**BASELINE, "algorithm": "hyp_cluster", "options": {"num_clusters": 1}}, 1,
                            init=same_init)
    np.testing.assert_allclose(got["W"][0], fedavg_baseline["W"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["b"][0], fedavg_baseline["b"], rtol=1e-6, atol=1e-7)


def test_mimelite_with_plain_sgd_base_equals_fedavg(fedavg_baseline):
    """SGD without momentum has no state to freeze: MimeLite is FedAvg with server SGD(server_learning_rate)."""
    got = run_algorithm.run({**BASELINE, "algorithm": "mimelite", "options": {"server_learning_rate": 0.8}}, 1)
    np.testing.assert_allclose(got["W"], fedavg_baseline["W"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["b"], fedavg_baseline["b"], rtol=1e-6, atol=1e-7)


def test_fednova_with_equal_local_steps_equals_fedavg():
    """Equal ||a_i||_1 (same sizes, same momentum SGD): tau_eff * mean(Delta_i / a) = mean Delta_i."""
    spec = {**BASELINE, "client": ("sgd", 0.1, {"momentum": 0.5})}
    sizes = [10] * 9
    fedavg = run_algorithm.run(spec, 1, sizes=sizes)
    fednova = run_algorithm.run({**spec, "algorithm": "fednova"}, 1, sizes=sizes)
    np.testing.assert_allclose(fednova["W"], fedavg["W"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fednova["b"], fedavg["b"], rtol=1e-5, atol=1e-6)


def test_agnostic_fedavg_with_one_domain_and_whole_client_batches_equals_fedavg():
    """One domain, one step on each client's whole data: alpha l / beta_i is the mean loss and beta_i ~ n_i."""
    spec = {**BASELINE, "batching": ClientBatching(64), "domains": 1}
    fedavg = run_algorithm.run(spec, 1)
    afl = run_algorithm.run({**spec, "algorithm": "agnostic_fedavg",
                             "options": {"init_domain_weights": (1.0,), "domain_learning_rate": 1.0}}, 1)
    np.testing.assert_allclose(afl["W"], fedavg["W"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(afl["b"], fedavg["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(afl["domain_weights"], [1.0])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mime_with_one_local_step_is_centralized_sgd(momentum):
    """One local step from y = x: g(y) - g(x) + c = c for every client, so with eta_s = 1 each round is one step
    of the base optimizer (SGD, heavy-ball momentum state kept by the server) on the full gradient of the
    round's sampled data. With momentum 0 that is full-batch gradient descent on the cohort."""
    spec = dict(algorithm="mime", options={"server_learning_rate": 1.0}, client=("sgd", 0.3, {"momentum": momentum}),
                server=("sgd", 1.0, {}), batching=ClientBatching(64))
    got = run_algorithm.run(spec, 1)
    shape = got["W0"].shape
    theta, m = pack(got["W0"], got["b0"]), None
    for r in range(ROUNDS):
        clients = list(round_clients(spec, r))
        assert all(len(cl.batches) == 1 for cl in clients)
        x = np.concatenate([cl.x[cl.first_epoch] for cl in clients])
        y = np.concatenate([cl.y[cl.first_epoch] for cl in clients])
        g = mean_grad(theta, x, y, shape)
        m = g if m is None else g + momentum * m
        theta = theta - 0.3 * m
    W, b = unpack(theta, shape)
    np.testing.assert_allclose(got["W"], W, **TOL)
    np.testing.assert_allclose(got["b"], b, **TOL)


def test_kmeans_init_picks_trained_clients_far_apart():
    """Two groups of clients with opposite labelings: k = 2 centers come one from each group."""
    rng = np.random.default_rng(0)
    model = get_model("logistic", (2,), 2)
    clients = []
    for i in range(6):
        x = rng.normal(size=(30, 2)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int32)
        clients.append({"x": x, "y": y if i % 2 == 0 else 1 - y})
    centers = kmeans_init(model, make_optimizer("sgd", 0.5), clients, 2, jax.random.PRNGKey(1), batch_size=10,
                          epochs=3)
    assert len(centers) == 2
    slopes = [float(c["Dense_0"]["kernel"][0, 1] - c["Dense_0"]["kernel"][0, 0]) for c in centers]
    assert slopes[0] * slopes[1] < 0, slopes  # one center predicts y = [x0 > 0], the other its opposite
    algorithm = build_algorithm("hyp_cluster", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                                num_clusters=2)
    state = algorithm.init_from(centers)
    assert state.params["Dense_0"]["kernel"].shape == (2, 2, 2)


def test_hyp_cluster_evaluation_uses_each_clients_train_loss():
    train = [{"loss": np.array([1.0, 8.0, 0.0]), "loss_count": np.array([1.0, 4.0, 0.0])},
             {"loss": np.array([3.0, 1.0, 0.0]), "loss_count": np.array([1.0, 4.0, 0.0])}]
    test = [{"loss": np.array([10.0, 20.0, 30.0]), "count": np.array([1, 2, 3])},
            {"loss": np.array([11.0, 21.0, 31.0]), "count": np.array([4, 5, 6])}]
    combined, assignment = combine_cluster_evals(train, test)
    assert assignment.tolist() == [0, 1, 0]  # a client without train data takes cluster 0
    assert combined["loss"].tolist() == [10.0, 21.0, 30.0] and combined["count"].tolist() == [1, 5, 3]


def test_bad_options_are_refused():
    model = get_model("logistic", (2,), 2)
    sgd = make_optimizer("sgd", 0.1)
    for name, options in [("agnostic_fedavg", {"init_domain_weights": (0.5, 0.6)}),
                          ("agnostic_fedavg", {"domain_algorithm": "mirror"}),
                          ("hyp_cluster", {"num_clusters": 0}), ("fedprox", {"proximal_weight": -1.0}),
                          ("mime", {"server_lr": 1.0})]:
        with pytest.raises(ValueError):
            build_algorithm(name, model, sgd, sgd, **options)
