"""DP-FTRL (Kairouz et al. 2021): tree noise, the FTRL-momentum server, epochs, privacy accounting, resume.

The NumPy references re-derive the paper's equations in float64: the noise of
a prefix sum is built from the explicit binary tree (every node whose leaves
all lie in 1..t and whose parent's do not), the server runs
m_t = beta m_{t-1} + N_t / D, w_t = w_0 + eta m_t with restarts (N_t a prefix sum of
deltas, minus the paper's gradients), and the
clients' local SGD, clipping and the epochs' cohorts are recomputed. The
library and the references share only the data order and each tree node's
N(0, I) vector, drawn from the run's tree key (the definition of the
randomness).
"""

import json
import math

import dp_accounting as dpa
import jax
import numpy as np
import optax
import pytest

import fedstream as fs
import run_transforms as rt
from fedstream.algorithms import RoundTotal, build_algorithm, make_optimizer
from fedstream.algorithms.aggregators import TREE_SALT, tree_node_noise, tree_prefix_noise
from fedstream.algorithms.dp_ftrl import FTRL
from fedstream.algorithms.privacy import PrivacyLedger, PrivacyLedgerError, TreeMechanism, epsilon_of
from fedstream.config import ConfigError
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.data.sampling import client_example_order, rounds_per_epoch, sample_cohort
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from fedstream.training.simulation import open_privacy_ledger
from support import InMemorySource, assert_bit_identical, final_state, flatten_tree, run_cli, run_cli_process, \
    train_records

SHAPE = (int(np.prod(rt.INPUT_SHAPE)), rt.NUM_CLASSES)
SIZE = (SHAPE[0] + 1) * SHAPE[1]
COHORT, RESTART, ROUNDS = 3, 2, 7  # 12 clients: epochs of 4 rounds, trees of 2; rounds 4-7 are the 2nd epoch
TOL = dict(rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# The reference: the paper's tree, FTRL with momentum, local SGD
# ---------------------------------------------------------------------------------------------------------------

def covering_nodes(t: int, leaves: int) -> list[tuple[int, int]]:
    """(level, index) of the nodes of a binary tree over `leaves` leaves that the prefix 1..t is made of: every
    node whose leaves [j 2^l + 1, (j + 1) 2^l] all lie in 1..t while its parent's do not (the paper's construction)."""
    nodes = []
    for level in range(leaves.bit_length() + 1):
        for j in range(leaves >> level):
            last = (j + 1) * 2**level
            parent_last = (j // 2 + 1) * 2**(level + 1)
            if last <= t and parent_last > t:
                nodes.append((level, j))
    assert sum(2**level for level, _ in nodes) == t  # the nodes tile 1..t
    return nodes


def reference_noise(tree_key, tree: int, t: int, leaves: int) -> np.ndarray:
    """sum of the N(0, I) of the nodes covering leaves 1..t of tree number `tree`, in float64."""
    return sum(np.asarray(tree_node_noise(tree_key, tree, level, j, SIZE), np.float64)
               for level, j in covering_nodes(t, leaves))


def run_key():
    return jax.random.fold_in(jax.random.PRNGKey(0), TREE_SALT)


def local_updates(r: int, theta: np.ndarray, client_lr: float) -> list[np.ndarray]:
    """Delta_i of round r's clients (the epochs' cohorts) with data: local SGD on softmax regression, float64."""
    data = rt.source()
    out = []
    for c in sample_cohort(rt.SEED, r, len(rt.SIZES), COHORT, "epochs"):
        n = int(rt.SIZES[c])
        if n == 0:
            continue
        x = data.get_client("train", c)["x"].reshape(n, -1).astype(np.float64)
        y = data.get_client("train", c)["y"]
        t = theta.copy()
        for batch in client_example_order(rt.SEED, r, int(c), n, ClientBatching(rt.BATCH)).reshape(-1, rt.BATCH):
            idx = batch[batch >= 0]
            W, b = rt.unflat(t, SHAPE)
            p = rt.softmax(x[idx] @ W + b)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            p /= len(idx)
            t = t - client_lr * np.concatenate([p.sum(0), (x[idx].T @ p).ravel()])
        out.append(t - theta)
    return out


def reference_dp_ftrl(options: dict, theta0: np.ndarray, client_lr: float, rounds: int = ROUNDS):
    """theta after each round, and the clipped clients per round: DP-FTRLM with restarts every RESTART rounds."""
    C, z, eta, beta = (options[k] for k in ("clip_norm", "noise_multiplier", "server_learning_rate",
                                            "server_momentum"))
    D = float(COHORT)
    theta, thetas, clipped = theta0.copy(), [], []
    for r in range(rounds):
        tree, t = divmod(r, RESTART)
        t += 1
        if t == 1:  # restart: w_0 <- w, prefix and momentum from zero
            theta_start, prefix, m = theta.copy(), np.zeros_like(theta), np.zeros_like(theta)
        updates = local_updates(r, theta, client_lr)
        prefix = prefix + sum(d * min(1.0, C / np.linalg.norm(d)) for d in updates)
        noisy = prefix + z * C * reference_noise(run_key(), tree, t, RESTART)
        m = beta * m + noisy / D
        theta = theta_start + eta * m
        thetas.append(theta)
        clipped.append(sum(np.linalg.norm(d) > C for d in updates))
    return thetas, clipped


def run_dp_ftrl(options: dict, num_devices: int, client_lr: float, rounds: int = ROUNDS, source=None,
                resume_at: int = 0) -> dict:
    """`rounds` rounds of dp_ftrl through the sharded runner on the epochs' cohorts; theta after each round.

    `source`: the clients (default: run_transforms' twelve, of unequal sizes). `resume_at` > 0: after that many
    rounds the server state goes to host memory (NumPy, as a checkpoint holds it) and a new data iterator
    continues from it."""
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    context = {"population": len(rt.SIZES), "sampling": "epochs", "clients_per_round": COHORT, "num_rounds": rounds}
    algorithm = build_algorithm("dp_ftrl", model, make_optimizer("sgd", client_lr), make_optimizer("adam", 0.1),
                                context=context, restart_every=RESTART, **options)
    mesh = make_mesh(num_devices)
    pipeline = CohortPipeline(rt.source() if source is None else source, "train", ("x", "y"), seed=rt.SEED,
                              cohort_size=COHORT, batching=ClientBatching(rt.BATCH), num_devices=num_devices,
                              data_threads=0, sampling="epochs")
    state = algorithm.init(jax.random.PRNGKey(0))
    theta0 = rt.flat(state.params["Dense_0"]["kernel"], state.params["Dense_0"]["bias"])
    state = replicate(state, mesh)
    round_fn = build_train_round(algorithm, mesh, seed=rt.SEED)
    iterator = pipeline.iterator(rounds)
    thetas, clipped = [], []
    for r in range(rounds):
        if resume_at and r == resume_at:
            state = replicate(jax.tree.map(np.asarray, jax.device_get(state)), mesh)
            iterator = pipeline.iterator(rounds, start_round=r)
        state, stats = round_fn(state, shard_batch(next(iterator)["batch"], mesh))
        dense = jax.device_get(state.params["Dense_0"])
        thetas.append(rt.flat(dense["kernel"], dense["bias"]))
        clipped.append(float(jax.device_get(stats["logs"])["clipped"]))
    return {"theta0": theta0, "thetas": thetas, "clipped": clipped, "algorithm": algorithm}


# ---------------------------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------------------------

def test_prefix_noise_is_the_sum_of_the_covering_tree_nodes():
    key = run_key()
    for leaves in (1, 5, 8):
        levels = leaves.bit_length()
        for tree in (0, 3):
            for t in range(1, leaves + 1):
                got = np.asarray(tree_prefix_noise(key, np.int32(tree), np.int32(t), SIZE, levels), np.float64)
                np.testing.assert_allclose(got, reference_noise(key, tree, t, leaves), rtol=1e-6, atol=1e-6)
        # Sensitivity: a leaf lies in at most ceil(log2(k + 1)) of the nodes released over the tree (the depth the
        # accountant charges), and that many for some leaf.
        released = {node for t in range(1, leaves + 1) for node in covering_nodes(t, leaves)}
        depth = max(sum(1 for level, j in released if j * 2**level < leaf <= (j + 1) * 2**level)
                    for leaf in range(1, leaves + 1))
        assert depth == math.ceil(math.log2(leaves + 1))
    # Nodes are independent: another tree, level or index is another draw.
    a, b, c = (np.asarray(tree_node_noise(key, *node, SIZE)) for node in ((0, 1, 0), (1, 1, 0), (0, 1, 1)))
    assert not np.allclose(a, b) and not np.allclose(a, c)


def test_noise_on_each_prefix_sum_is_its_tree_nodes_on_one_and_four_devices_and_after_a_resume():
    """Clients that do not move (learning rate 0), so N_t is the tree noise alone: w_t = w_0 + eta m_t,
    m_t = beta m_{t-1} + z C xi_t / D, where xi_t must be the sum of the tree nodes covering the prefix 1..t,
    restarting every RESTART rounds; recovered from w_t. The zero sums are exact, so 1 and 4 devices, and a run
    resumed after round 3 (mid-tree) from its state in host memory, agree to the bit. Twelve clients of 4
    examples: every round has one shape (one compilation per device count)."""
    options = {"clip_norm": 0.4, "noise_multiplier": 0.7, "server_learning_rate": 0.5, "server_momentum": 0.5}
    source = InMemorySource([4] * 12, input_shape=rt.INPUT_SHAPE, num_classes=rt.NUM_CLASSES)
    runs = {n: run_dp_ftrl(options, n, client_lr=0.0, rounds=6, source=source) for n in (1, 4)}
    runs["resumed"] = run_dp_ftrl(options, 1, client_lr=0.0, rounds=6, source=source, resume_at=3)
    C, z, eta, beta, D = 0.4, 0.7, 0.5, 0.5, float(COHORT)
    for got in runs.values():
        previous = start = got["theta0"]
        for r, theta in enumerate(got["thetas"]):
            tree, t = divmod(r, RESTART)
            if t == 0:  # restart: w_0 is the model the tree starts from, m_0 = 0
                start, m = previous, np.zeros_like(theta)
            m, m_before = (theta - start) / eta, m
            xi = (m - beta * m_before) * D / (z * C)  # the prefix's noise in units of z C
            np.testing.assert_allclose(xi, reference_noise(run_key(), tree, t + 1, RESTART), rtol=1e-4, atol=1e-4)
            previous = theta
    for other in (runs[4], runs["resumed"]):
        assert all(np.array_equal(a, b) for a, b in zip(runs[1]["thetas"], other["thetas"]))


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 4])
def test_dp_ftrl_matches_the_numpy_reference(num_devices):
    """Local SGD, clipping, prefix sums with tree noise, FTRL with momentum and restarts, on the epochs' cohorts."""
    options = {"clip_norm": 0.35, "noise_multiplier": 0.6, "server_learning_rate": 0.8, "server_momentum": 0.5}
    got = run_dp_ftrl(options, num_devices, client_lr=rt.CLIENT_LR)
    thetas, clipped = reference_dp_ftrl(options, got["theta0"], rt.CLIENT_LR)
    for r, (a, b) in enumerate(zip(got["thetas"], thetas)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=f"round {r}")
    assert got["clipped"] == clipped
    assert 0 < sum(clipped) < COHORT * ROUNDS  # both branches of the clip


def test_ftrl_server_update_is_the_papers_momentum_form_with_restarts():
    """FTRL.server_update alone against m_t = beta m_{t-1} + N_t / D and w_t = w_0 + eta m_t (Nesterov:
    w_0 + eta (beta m_t + N_t / D)), w_0 and m restarted every k rounds."""
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    rng = np.random.default_rng(0)
    for nesterov in (False, True):
        eta, beta, k, D = 0.3, 0.9, 3, 4.0
        ftrl = FTRL(model, optax.sgd(0.1), optax.identity(), server_learning_rate=eta, server_momentum=beta,
                    nesterov=nesterov, restart_every=k)
        state = ftrl.init(jax.random.PRNGKey(1))
        w = np.asarray(state.params["Dense_0"]["bias"], np.float64)
        for r in range(7):
            noisy_prefix = rng.normal(size=w.shape)
            if r % k == 0:
                w0, m = w.copy(), np.zeros_like(w)
            m = beta * m + noisy_prefix / D
            w = w0 + eta * ((beta * m + noisy_prefix / D) if nesterov else m)
            total = RoundTotal(weighted={"Dense_0": {"bias": np.float32(noisy_prefix),
                                                     "kernel": np.zeros(SHAPE, np.float32)}},
                               weight=np.float32(D))
            state = jax.jit(ftrl.server_update)(state, total)
            np.testing.assert_allclose(np.asarray(state.params["Dense_0"]["bias"]), w, rtol=1e-5, atol=1e-6)
            assert int(state.round) == r + 1


# ---------------------------------------------------------------------------------------------------------------
# Epochs, options, refusals
# ---------------------------------------------------------------------------------------------------------------

def test_epoch_cohorts_take_each_client_at_most_once_per_epoch():
    n, m = 23, 5  # 4 rounds per epoch, 3 clients sit each epoch out
    assert rounds_per_epoch(n, m) == 4
    epochs = [[sample_cohort(7, e * 4 + r, n, m, "epochs") for r in range(4)] for e in range(3)]
    for cohorts in epochs:
        members = np.concatenate(cohorts)
        assert all(len(c) == m for c in cohorts) and len(set(members.tolist())) == 4 * m
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # a fresh shuffle per epoch
    assert np.array_equal(sample_cohort(7, 9, n, m, "epochs"), epochs[2][1])  # a pure function of (seed, round)
    with pytest.raises(ValueError, match="clients_per_round=30"):
        sample_cohort(7, 0, n, 30, "epochs")


def test_dp_ftrl_refuses_what_its_accounting_does_not_cover():
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    context = {"population": 12, "sampling": "epochs", "clients_per_round": 3, "num_rounds": 8}

    def build(name="dp_ftrl", ctx=context, **options):
        return build_algorithm(name, model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0), context=ctx,
                               **{"clip_norm": 1.0, "noise_multiplier": 1.0, **options})

    with pytest.raises(ValueError, match="sampling = 'epochs'"):
        build(ctx=dict(context, sampling="uniform"))
    with pytest.raises(ValueError, match="dividing the 4 rounds"):
        build(restart_every=3)
    with pytest.raises(ValueError, match="sampling 'epochs'.*dp_ftrl"):
        build("dp_fedavg")
    with pytest.raises(ConfigError, match="algorithm.options.clip_norm"):
        build_algorithm("dp_ftrl", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0), context=context)
    algorithm = build()
    assert algorithm.privacy_accounting().mechanism == TreeMechanism(1.0, 12, 4, 4)  # restart every epoch
    # The run's cohorts must be the accounted ones.
    data = fs.InMemoryDataset({"train": {str(c): rt.source().get_client("train", c) for c in range(12)}})
    model_data = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    for sampling, cohort in (("uniform", 3), ("epochs", 4)):
        with pytest.raises(ConfigError, match="'epochs'" if sampling == "uniform" else "epochs of 4 rounds"):
            fs.Simulation(data, build_algorithm("dp_ftrl", model_data, make_optimizer("sgd", 0.1),
                                                make_optimizer("sgd", 1.0), context=context, clip_norm=1.0),
                          clients_per_round=cohort, sampling=sampling, test_split="train", log=lambda _: None)
    assert algorithm.denominator == 3.0 and algorithm.target_delta == pytest.approx(12 ** -1.1)
    calibrated = build(noise_multiplier=0.0, target_epsilon=3.0, target_delta=1e-3)
    ledger = open_privacy_ledger(calibrated.privacy_accounting())
    ledger.record_round(8)
    assert 2.99 < ledger.epsilon() <= 3.0


# ---------------------------------------------------------------------------------------------------------------
# Privacy accounting
# ---------------------------------------------------------------------------------------------------------------

def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """epsilon(delta) from RDP: min over orders a of rdp + log1p(-1/a) - log(delta a) / (a - 1) (Canonne, Kamath,
    Steinke 2020, Proposition 12 / Asoodeh et al. 2020), the conversion dp-accounting uses."""
    eps = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
    return float(np.min(np.where(orders > 1.01, eps, np.inf)))


# The paper's Stack Overflow set-up (Section 5.3; google-research/federated dp_ftrl README): N = 342,477 training
# clients, 100 per round, 1,600 rounds (less than one epoch of 3,424 rounds, so one tree), delta = 1/N^1.1 here.
STACKOVERFLOW = dict(population=342_477, clients_per_round=100, rounds=1600)


@pytest.mark.parametrize("z", [1.0, 2.0])
def test_epsilon_of_the_stackoverflow_setup_equals_dp_accounting_and_the_closed_form(z):
    n, m, rounds = STACKOVERFLOW["population"], STACKOVERFLOW["clients_per_round"], STACKOVERFLOW["rounds"]
    delta = n ** -1.1
    mechanism = TreeMechanism(z, n, rounds_per_epoch(n, m), rounds_per_epoch(n, m))
    ledger = PrivacyLedger(mechanism, delta)
    ledger.record_round(rounds)
    # dp-accounting directly: one tree of 1600 leaves, replace-by-zero neighbours.
    direct = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_SPECIAL)
    direct.compose(dpa.SingleEpochTreeAggregationDpEvent(z, 1600))
    assert ledger.epsilon() == direct.get_epsilon(delta)
    # The closed form: a client is in at most ceil(log2(1601)) = 11 released nodes, each with noise z C, so the
    # tree is a Gaussian mechanism of multiplier z / sqrt(11): RDP(a) = 11 a / (2 z^2).
    orders = np.asarray(direct._orders, np.float64)
    assert ledger.epsilon() == pytest.approx(rdp_to_epsilon(orders, 11 * orders / (2 * z * z), delta), rel=1e-12)


def test_epsilon_with_restarts_composes_one_tree_per_epoch():
    """N = 1000, m = 10: epochs of 100 rounds; trees of 25; 230 rounds = 2 epochs + 30 rounds (trees 25, 5)."""
    z, delta = 1.3, 1e-5
    mechanism = TreeMechanism(z, 1000, 100, 25)
    assert mechanism.tree_lengths(230) == [[25] * 4, [25] * 4, [25, 5]]
    ledger = PrivacyLedger(mechanism, delta)
    for _ in range(230):
        ledger.record_round()
    orders = np.asarray(dpa.rdp.RdpAccountant()._orders, np.float64)
    depth = math.ceil(math.log2(26))  # 5: every epoch's deepest tree has 25 leaves
    assert ledger.epsilon() == pytest.approx(rdp_to_epsilon(orders, 3 * depth * orders / (2 * z * z), delta),
                                             rel=1e-12)
    # Resume: the ledger from its JSON reports the same epsilon, and continues the same.
    resumed = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert resumed.epsilon() == ledger.epsilon()
    resumed.record_round(70)
    assert resumed.epsilon() == epsilon_of([(mechanism, 300)], delta)
    with pytest.raises(PrivacyLedgerError, match="one mechanism"):
        PrivacyLedger.from_json(ledger.to_json(), mechanism.with_noise(2.0))
    with pytest.raises(ValueError, match="PLD"):
        PrivacyLedger(mechanism, delta, "pld")


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------

def dp_ftrl_simulation(digits, workdir):
    data = fs.FederatedDataset(digits)
    model = fs.get_model("logistic", (8, 8, 1), 10)
    context = {"population": 100, "sampling": "epochs", "clients_per_round": 20, "num_rounds": 4}
    algorithm = build_algorithm("dp_ftrl", model, optax.sgd(0.1), optax.sgd(1.0), context=context, clip_norm=0.5,
                                noise_multiplier=0.5, server_momentum=0.9, restart_every=5)
    return fs.Simulation(data, algorithm, clients_per_round=20, batch_size=10, sampling="epochs",
                         aggregation="uniform", workdir=workdir, log=lambda _: None)


@pytest.mark.slow
def test_resume_in_python_is_bit_identical_with_the_same_epsilon(tmp_path, digits):
    """Interrupted in the middle of a tree (after round 2 of 5): parameters, the FTRL state (w_0, momentum, prefix
    sum, tree key), the train metrics and the ledger's epsilon come out the same."""
    full = dp_ftrl_simulation(digits, tmp_path / "full").run(4)
    dp_ftrl_simulation(digits, tmp_path / "resumed").run(2)
    resumed = dp_ftrl_simulation(digits, tmp_path / "resumed").run(4)
    assert full.rounds_done == resumed.rounds_done == 4
    (step_a, a), (step_b, b) = final_state(tmp_path / "full"), final_state(tmp_path / "resumed")
    assert step_a == step_b == 4 and set(a["extra"]) == {"inner", "tree_key", "prefix_sum"}
    flat_a, flat_b = dict(flatten_tree(a)), dict(flatten_tree(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert np.array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key])), key

    def train_rows(workdir):  # the 2-round run also evaluated at its end
        return [r for r in train_records(workdir) if r["kind"] == "train"]

    assert train_rows(tmp_path / "full") == train_rows(tmp_path / "resumed")
    eps = [r["dp_epsilon"] for r in train_rows(tmp_path / "full")]
    # One tree of 5 leaves: the charged depth ceil(log2(t + 1)) is 1, 2, 2, 3 after rounds 1..4.
    assert eps[0] < eps[1] == eps[2] < eps[3]
    assert eps[-1] == epsilon_of([(TreeMechanism(0.5, 100, 5, 5), 4)], 100 ** -1.1)


@pytest.mark.slow
def test_kill_and_resume_of_the_digits_pipeline_is_bit_identical(tmp_path, digits):
    def args(workdir):
        return ["train", "digits_dp_ftrl", "--workdir", str(workdir), f"--config.data.path={digits}",
                "--config.num_rounds=6", "--config.eval.every=0", "--config.checkpoint.keep=2"]

    assert run_cli(*args(tmp_path / "full")).returncode == 0
    killed = tmp_path / "killed"
    assert run_cli_process(*args(killed), fault="kill_after_round:2").returncode == -9
    assert run_cli_process(*args(killed), fault="kill_during_save:4").returncode == -9
    assert run_cli(*args(killed)).returncode == 0
    assert_bit_identical(tmp_path / "full", killed, 6)
