"""DP-FedAvg: NumPy reference on 1 and 4 devices, noise statistics, Poisson cohorts, privacy accounting.

The reference re-derives McMahan et al. (2018)'s update in float64 (clip
each client's delta to C, add N(0, (zC)^2) to the sum, divide by the fixed
denominator D) and shares with the library only the data order and the
noise vector, drawn from the same JAX key (the round's server key folded
with the DP salt), which is the definition of the randomness.
"""

import json
import math

import dp_accounting as dpa
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import run_transforms as rt
from fedstream.algorithms import RoundTotal, build_algorithm, make_optimizer
from fedstream.algorithms.dp_fedavg import NOISE_SALT, round_log
from fedstream.algorithms.privacy import DPMechanism, PrivacyLedger, calibrate_noise_multiplier, epsilon_of
from fedstream.data.cohort import ClientBatching, CohortPipeline, poisson_cap, sample_cohort
from fedstream.models import get_model
from fedstream.training.rounds import server_key
from fedstream.training.simulation import open_privacy_ledger
from support import InMemorySource

TOL = dict(rtol=2e-4, atol=2e-5)
DP_CASES = ("dp_poisson", "dp_uniform")
SHAPE = (int(np.prod(rt.INPUT_SHAPE)), rt.NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------------
# 3 rounds against the NumPy reference
# ---------------------------------------------------------------------------------------------------------------

def reference_dp(case: str, W0: np.ndarray, b0: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """w <- w + eta_g (sum_i clip_C(Delta_i) + z C xi) / D, xi ~ N(0, I) from the round's server key.

    Returns (W, b, clients per round, clipped clients per round). D is the
    configured expected cohort size (q N = clients_per_round under Poisson
    sampling); the aggregation weights are ignored.
    """
    spec = rt.CASES[case]
    C, z = spec["options"]["clip_norm"], spec["options"]["noise_multiplier"]
    D = float(spec["cohort"])
    theta = rt.flat(W0, b0)
    clients, clipped = [], []
    for r in range(rt.ROUNDS):
        updates = rt.client_updates(spec, r, theta, SHAPE)
        assert updates, "the runner skips a round without clients (no noise); pick another seed"
        total = np.zeros_like(theta)
        for _, delta, _ in updates:
            norm = np.linalg.norm(delta)
            total += delta * min(1.0, C / norm)
        xi = np.asarray(jax.random.normal(jax.random.fold_in(server_key(rt.SEED, r), NOISE_SALT), theta.shape,
                                          jnp.float32), np.float64)
        theta = theta + spec["server_lr"] * (total + z * C * xi) / D
        clients.append(len(updates))
        clipped.append(sum(np.linalg.norm(d) > C for _, d, _ in updates))
    W, b = rt.unflat(theta, SHAPE)
    return W, b, clients, clipped


def check_against_reference(case: str, got: dict) -> None:
    W, b, clients, clipped = reference_dp(case, got["W0"], got["b0"])
    np.testing.assert_allclose(got["W"], W, **TOL)
    np.testing.assert_allclose(got["b"], b, **TOL)
    assert got["logs/log_clients"].tolist() == clients
    assert got["logs/log_clipped"].tolist() == clipped
    # Some clients are clipped and some are not: both branches of the clip are exercised.
    assert 0 < sum(clipped) < sum(clients)


@pytest.mark.parametrize("case", DP_CASES)
def test_dp_fedavg_matches_numpy_reference_on_one_device(case, tmp_path):
    got = rt.run(rt.CASES[case], 1, str(tmp_path / "store"))
    check_against_reference(case, got)
    log = round_log({k[len("logs/log_"):]: v[0] for k, v in got.items() if k.startswith("logs/log_")})
    assert 0 <= log["dp_clipped_fraction"] <= 1 and log["bits_per_client"] == 32 * (SHAPE[0] + 1) * SHAPE[1]


@pytest.mark.parametrize("case", DP_CASES)
def test_dp_fedavg_matches_numpy_reference_on_four_devices(case, tmp_path):
    check_against_reference(case, rt.run(rt.CASES[case], 4, str(tmp_path / "store")))


def test_dp_with_no_noise_and_a_large_clip_is_uniform_fedavg_with_a_fixed_denominator(tmp_path):
    """z = 0, C = inf-ish: w + sum_i Delta_i / m, i.e. FedAvg with uniform weights when all m clients train."""
    spec = dict(rt.CASES["dp_uniform"], options={"clip_norm": 1e6, "noise_multiplier": 0.0}, uniform=True)
    got = rt.run(spec, 1, str(tmp_path / "a"))
    theta = rt.flat(got["W0"], got["b0"])
    for r in range(rt.ROUNDS):
        updates = rt.client_updates(spec, r, theta, SHAPE)
        theta = theta + spec["server_lr"] * sum(d for _, d, _ in updates) / spec["cohort"]
    W, b = rt.unflat(theta, SHAPE)
    np.testing.assert_allclose(got["W"], W, **TOL)
    np.testing.assert_allclose(got["b"], b, **TOL)
    assert got["logs/log_clipped"].sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# The noise
# ---------------------------------------------------------------------------------------------------------------

def test_noise_std_is_z_c_over_the_denominator():
    model = get_model("logistic", (32, 32, 1), 10)  # 10,250 parameters
    z, C, D = 1.3, 0.7, 12.5
    algorithm = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                                clip_norm=C, noise_multiplier=z, denominator=D)
    state = algorithm.init(jax.random.PRNGKey(0))
    zero = jax.tree.map(jnp.zeros_like, state.params)
    key = jax.random.PRNGKey(42)
    new = algorithm.server_update(state, RoundTotal(weighted=zero, weight=jnp.float32(3)), key)
    moved = np.concatenate([np.asarray(a - b).ravel() for a, b in zip(jax.tree.leaves(new.params),
                                                                       jax.tree.leaves(state.params))])
    assert moved.size == 10250
    np.testing.assert_allclose(moved.std(), z * C / D, rtol=0.03)
    assert abs(moved.mean()) < 4 * z * C / D / math.sqrt(moved.size)
    # Exactly z C / D times the standard normal drawn from the server key folded with the DP salt.
    xi = np.asarray(jax.random.normal(jax.random.fold_in(key, NOISE_SALT), (moved.size,), jnp.float32))
    flat_order = np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(
        jax.flatten_util.ravel_pytree(state.params)[1](jnp.asarray(xi)))])
    np.testing.assert_allclose(moved, z * C / D * flat_order, rtol=1e-4, atol=1e-6)
    # Another round's key gives other noise.
    other = algorithm.server_update(state, RoundTotal(weighted=zero, weight=jnp.float32(3)), jax.random.PRNGKey(43))
    assert not np.allclose(np.asarray(other.params["Dense_0"]["bias"]), np.asarray(new.params["Dense_0"]["bias"]))


def test_dp_refuses_algorithms_whose_clients_send_more_than_the_delta():
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    with pytest.raises(ValueError, match="clip_norm"):
        build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0), denominator=3.0)
    with pytest.raises(ValueError, match="prepass"):
        build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0), clip_norm=1.0,
                        denominator=3.0, base="mime", base_options={"server_learning_rate": 1.0})
    scaffold = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                               context={"population": 12, "client_learning_rate": 0.1}, clip_norm=1.0,
                               denominator=3.0, base="scaffold")
    state = scaffold.init(jax.random.PRNGKey(0))
    broadcast = scaffold.broadcast(state)
    stored = scaffold.client_state_template(state.params)
    client = scaffold.client_init(broadcast, stored)
    with pytest.raises(ValueError, match="delta_c"):
        scaffold.client_contribution(client, broadcast, jnp.float32(1), stored, None, jax.random.PRNGKey(1))


# ---------------------------------------------------------------------------------------------------------------
# Poisson sampling
# ---------------------------------------------------------------------------------------------------------------

def test_poisson_cohort_sizes_have_mean_qn_and_are_pure():
    N, q, rounds = 200, 0.05, 3000
    sizes = np.array([len(sample_cohort(1, r, N, 0, "poisson", q)) for r in range(rounds)])
    # E = qN = 10, Var = qN(1 - q): the mean of 3000 rounds is within 4 standard errors.
    assert abs(sizes.mean() - q * N) < 4 * math.sqrt(q * N * (1 - q) / rounds)
    np.testing.assert_allclose(sizes.var(), q * N * (1 - q), rtol=0.1)
    counts = np.bincount(np.concatenate([sample_cohort(1, r, N, 0, "poisson", q) for r in range(rounds)]),
                         minlength=N)
    assert np.abs(counts - q * rounds).max() < 5 * math.sqrt(q * (1 - q) * rounds)  # each client with rate q
    a = sample_cohort(1, 7, N, 0, "poisson", q)
    assert (a == sample_cohort(1, 7, N, 0, "poisson", q)).all() and (np.diff(a) > 0).all()
    with pytest.raises(ValueError, match="rate"):
        sample_cohort(1, 0, N, 0, "poisson", 0.0)


def test_poisson_pipeline_pads_to_the_cap_and_refuses_an_overfull_round():
    sizes = [0, 1, 3, 12, 25, 7, 40, 2, 9, 16, 5, 30, 0, 11, 19, 4] * 4
    source = InMemorySource(sizes)
    pipeline = CohortPipeline(source, "train", ("x", "y"), seed=7, cohort_size=8, batching=ClientBatching(4),
                              num_devices=3, data_threads=0, sampling="poisson")
    assert pipeline.rate == 8 / 64 and pipeline.expected_cohort_size == 8.0
    assert pipeline.slots == poisson_cap(64, 8 / 64) and pipeline.slots > 8
    iterator = pipeline.iterator(4)
    for r in range(4):
        element = next(iterator)
        batch = element["batch"]
        cohort = sample_cohort(7, r, 64, 0, "poisson", 8 / 64)
        assert element["cohort_size"] == len(cohort) and sorted(element["clients"].tolist()) == sorted(cohort.tolist())
        assert batch["slot_steps"].shape[:2] == (3, 1)  # devices x lanes
        trained = {int(c) for c, s in zip(batch["slot_client"].ravel(), batch["slot_steps"].ravel()) if s > 0}
        assert trained == {int(c) for c in cohort if sizes[c] > 0}
        assert (batch["slot_weight"][batch["slot_steps"] == 0] == 0).all()
        assert element["num_clients_empty"] == sum(sizes[c] == 0 for c in cohort)
    capped = CohortPipeline(source, "train", ("x", "y"), seed=7, cohort_size=32, batching=ClientBatching(4),
                            num_devices=1, data_threads=0, sampling="poisson", max_cohort_size=20)
    with pytest.raises(RuntimeError, match="max_clients_per_round"):
        capped.iterator(3)  # checked before the first round: E = 32 clients > 20 slots


# ---------------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------------

POISSON = DPMechanism(1.1, "poisson", 1000, sampling_rate=0.01)
UNIFORM = DPMechanism(1.1, "uniform", 1000, cohort_size=10)


def direct_epsilon(accountant, event, count, delta):
    accountant.compose(event, count)
    return accountant.get_epsilon(delta)


def test_ledger_epsilon_equals_dp_accounting_for_the_same_events():
    delta = 1e-5
    ledger = PrivacyLedger(POISSON, delta, "rdp")
    ledger.record_round(40)
    event = dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1))
    assert ledger.epsilon() == direct_epsilon(dpa.rdp.RdpAccountant(), event, 40, delta)
    pld = PrivacyLedger(POISSON, delta, "pld")
    pld.record_round(40)
    assert pld.epsilon() == direct_epsilon(dpa.pld.PLDAccountant(), event, 40, delta)
    assert pld.epsilon() < ledger.epsilon()  # PLD is the tighter accountant
    # Fixed-size cohorts: sampling without replacement, replace-one neighbours, sensitivity 2C.
    uniform = PrivacyLedger(UNIFORM, delta, "rdp")
    uniform.record_round(40)
    wor = dpa.SampledWithoutReplacementDpEvent(1000, 10, dpa.GaussianDpEvent(1.1 / 2))
    replace = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    assert uniform.epsilon() == direct_epsilon(replace, wor, 40, delta)
    with pytest.raises(ValueError, match="PLD"):
        PrivacyLedger(UNIFORM, delta, "pld")
    # The ledger's own composed event gives the same number through a fresh accountant.
    assert dpa.rdp.RdpAccountant().compose(ledger.event()).get_epsilon(delta) == ledger.epsilon()
    assert math.isinf(epsilon_of([(POISSON.with_noise(0.0), 3)], delta))
    assert epsilon_of([], delta) == 0.0


def test_ledger_resumes_exactly_from_json_and_records_a_changed_mechanism():
    full = PrivacyLedger(POISSON, 1e-5)
    for _ in range(9):
        full.record_round()
    part = PrivacyLedger(POISSON, 1e-5)
    for _ in range(4):
        part.record_round()
    resumed = PrivacyLedger.from_json(json.loads(json.dumps(part.to_json())))
    for _ in range(5):
        resumed.record_round()
    assert resumed.to_json() == full.to_json() and resumed.epsilon() == full.epsilon() and resumed.rounds == 9
    # A new z after resuming (e.g. recalibrated for more rounds) is a second segment.
    later = PrivacyLedger.from_json(part.to_json(), POISSON.with_noise(1.5))
    later.record_round(3)
    events = dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(POISSON.event(), 4),
                                  dpa.SelfComposedDpEvent(POISSON.with_noise(1.5).event(), 3)])
    assert later.epsilon() == dpa.rdp.RdpAccountant().compose(events).get_epsilon(1e-5)
    assert [s["rounds"] for s in later.to_json()["segments"]] == [4, 3]


def test_train_loop_ledger_helper():
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    context = {"population": 1000, "sampling": "poisson", "clients_per_round": 10, "num_rounds": 50}
    algorithm = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                                context=context, clip_norm=1.0, noise_multiplier=1.1, target_delta=1e-5)
    assert algorithm.denominator == 10.0 and algorithm.mechanism == POISSON
    ledger = open_privacy_ledger(algorithm.privacy_accounting())
    ledger.record_round(2)
    assert open_privacy_ledger(algorithm.privacy_accounting(), ledger.to_json(), 2).epsilon() == ledger.epsilon()
    with pytest.raises(ValueError, match="holds 2 rounds"):
        open_privacy_ledger(algorithm.privacy_accounting(), ledger.to_json(), 3)
    fedavg = build_algorithm("fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0))
    assert open_privacy_ledger(fedavg.privacy_accounting()) is None
    uniform = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                              context=dict(context, sampling="uniform"), clip_norm=1.0, noise_multiplier=1.1)
    assert uniform.mechanism == UNIFORM and uniform.denominator == 10.0
    assert uniform.target_delta == pytest.approx(1000 ** -1.1)


def test_calibration_meets_the_target_epsilon_closely():
    target, delta, rounds = 2.0, 1e-5, 100
    z = calibrate_noise_multiplier(POISSON, rounds, target, delta)
    eps = epsilon_of([(POISSON.with_noise(z), rounds)], delta)
    assert eps <= target and eps > 0.995 * target
    assert epsilon_of([(POISSON.with_noise(z * 0.99), rounds)], delta) > target  # z is (nearly) the smallest
    # Through the algorithm's options: target_epsilon instead of noise_multiplier.
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    context = {"population": 1000, "sampling": "poisson", "clients_per_round": 10, "num_rounds": rounds}
    algorithm = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                                context=context, clip_norm=1.0, target_epsilon=target, target_delta=delta)
    assert algorithm.noise_multiplier == pytest.approx(z, rel=1e-3)
    ledger = open_privacy_ledger(algorithm.privacy_accounting())
    ledger.record_round(rounds)
    assert ledger.epsilon() <= target
