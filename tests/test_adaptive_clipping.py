"""Adaptive clipping for DP-FedAvg (Andrew, Thakkar, McMahan, Ramaswamy 2021): NumPy reference on 1 and 4 devices,
the geometric update of C, z_Delta, resume.

The reference re-derives the paper's round in float64: clip each client's
delta to C_t, count the unclipped clients (centred, b_i - 1/2), noise the
delta sum with z_Delta C_t and the count with sigma_b, divide by the fixed
denominator D and update C_{t+1} = C_t exp(-eta_C (b_bar - gamma)). As in
test_dp.py it shares with the library only the data order and the two noise
draws, taken from the round's server key folded with the DP salts (the
definition of the randomness).
"""

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import run_transforms as rt
from support import final_state, flatten_tree, train_records
from fedstream.algorithms import RoundTotal, build_algorithm, make_optimizer
from fedstream.algorithms.base import aggregate
from fedstream.algorithms.dp_fedavg import COUNT_NOISE_SALT, NOISE_SALT, delta_noise_multiplier, round_log
from fedstream.algorithms.fedavg import ClientState
from fedstream.models import get_model
from fedstream.training.rounds import server_key

TOL = dict(rtol=2e-4, atol=2e-5)
ADAPTIVE_CASES = ("dp_adaptive_poisson", "dp_adaptive_uniform")
SHAPE = (int(np.prod(rt.INPUT_SHAPE)), rt.NUM_CLASSES)


def z_delta_reference(z: float, sigma_b: float) -> float:
    """The paper's z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)."""
    return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5


# ---------------------------------------------------------------------------------------------------------------
# 3 rounds against the NumPy reference
# ---------------------------------------------------------------------------------------------------------------

def reference_adaptive(case: str, W0: np.ndarray, b0: np.ndarray) -> dict:
    """Andrew et al. (2021), Algorithm 1 (geometric update) around McMahan et al. (2018)'s DP-FedAvg, per round t:

        Delta_i clipped to C_t;  b_i = 1[||Delta_i|| <= C_t]
        w       <- w + eta_g (sum_i clip(Delta_i) + z_Delta C_t xi) / D
        b_bar    = (sum_i (b_i - 1/2) + sigma_b xi_b) / D + 1/2
        C_{t+1}  = C_t exp(-eta_C (b_bar - gamma))

    xi, xi_b ~ N(0, I) from the round's server key folded with the delta / count salts.
    """
    spec = rt.CASES[case]
    o = spec["options"]
    C, z, gamma, eta, sigma_b = (o["clip_norm"], o["noise_multiplier"], o["target_unclipped_quantile"],
                                 o["clip_learning_rate"], o["clipped_count_stddev"])
    D = float(spec["cohort"])
    z_delta = z_delta_reference(z, sigma_b)
    theta = rt.flat(W0, b0)
    out = {"clips": [], "clients": [], "unclipped": []}
    for r in range(rt.ROUNDS):
        updates = rt.client_updates(spec, r, theta, SHAPE)
        assert updates, "the runner skips a round without clients (no noise); pick another seed"
        key = server_key(rt.SEED, r)
        xi = np.asarray(jax.random.normal(jax.random.fold_in(key, NOISE_SALT), theta.shape, jnp.float32), np.float64)
        xi_b = float(jax.random.normal(jax.random.fold_in(key, COUNT_NOISE_SALT), (), jnp.float32))
        norms = [np.linalg.norm(d) for _, d, _ in updates]
        total = sum(d * min(1.0, C / n) for (_, d, _), n in zip(updates, norms))
        unclipped = sum(n <= C for n in norms)
        out["clips"].append(C)
        out["clients"].append(len(updates))
        out["unclipped"].append(unclipped)
        theta = theta + spec["server_lr"] * (total + z_delta * C * xi) / D
        b_bar = (unclipped - len(updates) / 2 + sigma_b * xi_b) / D + 0.5
        C = C * math.exp(-eta * (b_bar - gamma))
    out["W"], out["b"] = rt.unflat(theta, SHAPE)
    out["clip_norm"] = C
    return out


def check_against_reference(case: str, got: dict) -> None:
    ref = reference_adaptive(case, got["W0"], got["b0"])
    np.testing.assert_allclose(got["W"], ref["W"], **TOL)
    np.testing.assert_allclose(got["b"], ref["b"], **TOL)
    np.testing.assert_allclose(got["clip_norm"], ref["clip_norm"], rtol=1e-5)
    clients = got["logs/log_clients"]
    assert clients.tolist() == ref["clients"]
    assert (clients - got["logs/log_clipped"]).tolist() == ref["unclipped"]
    np.testing.assert_allclose(got["logs/log_dp_clip_norm"] / clients, ref["clips"], rtol=1e-5)  # C_t per round
    # Both branches of the clip are taken, and C really moved.
    assert 0 < sum(ref["unclipped"]) < sum(ref["clients"])
    assert abs(math.log(ref["clip_norm"] / rt.CASES[case]["options"]["clip_norm"])) > 0.05


@pytest.mark.parametrize("case", ADAPTIVE_CASES)
def test_adaptive_clipping_matches_numpy_reference_on_one_device(case, tmp_path):
    got = rt.run(rt.CASES[case], 1, str(tmp_path / "store"))
    check_against_reference(case, got)
    log = round_log({k[len("logs/log_"):]: v[1] for k, v in got.items() if k.startswith("logs/log_")})
    assert log["dp_clip_norm"] == pytest.approx(got["logs/log_dp_clip_norm"][1] / got["logs/log_clients"][1])


@pytest.mark.parametrize("case", ADAPTIVE_CASES)
def test_adaptive_clipping_matches_numpy_reference_on_four_devices(case, tmp_path):
    check_against_reference(case, rt.run(rt.CASES[case], 4, str(tmp_path / "store")))


def test_adaptive_clipping_with_a_rotating_codec_keeps_both_states(tmp_path):
    """Rotations' key and C_t side by side in ServerState.extra; C follows the logged counts and the count noise."""
    spec = rt.CASES["dp_adaptive_uniform"]
    spec = dict(spec, options={**spec["options"], "compression": "quantize", "bits": 8, "rotate": True})
    algorithm = rt.build(spec)
    assert set(algorithm.init(jax.random.PRNGKey(0)).extra) == {"transform_key", "clip_norm"}
    got = rt.run(spec, 1, str(tmp_path / "store"))
    o, D = spec["options"], float(spec["cohort"])
    C = o["clip_norm"]
    for r in range(rt.ROUNDS):
        clients, clipped = got["logs/log_clients"][r], got["logs/log_clipped"][r]
        np.testing.assert_allclose(got["logs/log_dp_clip_norm"][r] / clients, C, rtol=1e-5)
        xi_b = float(jax.random.normal(jax.random.fold_in(server_key(rt.SEED, r), COUNT_NOISE_SALT), (), jnp.float32))
        b_bar = (clients - clipped - clients / 2 + o["clipped_count_stddev"] * xi_b) / D + 0.5
        C = C * math.exp(-o["clip_learning_rate"] * (b_bar - o["target_unclipped_quantile"]))
    np.testing.assert_allclose(got["clip_norm"], C, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The geometric update of C, without noise
# ---------------------------------------------------------------------------------------------------------------

def one_round(algorithm, delta_scale: float, clients: int):
    """One round through the hooks: `clients` clients whose update is delta_scale * ones; (old, new state)."""
    state = algorithm.init(jax.random.PRNGKey(0))
    broadcast = algorithm.broadcast(state)
    params = jax.tree.map(lambda p: p + delta_scale, state.params)
    client = ClientState(params, algorithm.client_optimizer.init(params))
    contributions = [algorithm.client_contribution(client, broadcast, jnp.float32(1), None, None,
                                                   jax.random.PRNGKey(i))[0] for i in range(clients)]
    total = aggregate(contributions, [jnp.float32(1)] * clients)  # as the runner sums them
    return state, algorithm.server_update(state, total, jax.random.PRNGKey(7))


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.9])
def test_clip_norm_moves_geometrically_towards_the_target_quantile(gamma):
    """z = 0 and sigma_b = 0: C shrinks by exp(-eta (1 - gamma)) when nobody is clipped, grows by exp(eta gamma)
    when everybody is; the params move by exactly the mean clipped delta (no noise)."""
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    C, eta, D = 0.5, 0.4, 4
    algorithm = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                                clip_norm=C, noise_multiplier=0.0, denominator=float(D), adaptive_clipping=True,
                                target_unclipped_quantile=gamma, clip_learning_rate=eta, clipped_count_stddev=0.0)
    assert algorithm.delta_noise_multiplier == 0.0
    n = sum(p.size for p in jax.tree.leaves(model.init(jax.random.PRNGKey(0))))
    for scale, factor in ((0.1 * C / math.sqrt(n), math.exp(-eta * (1 - gamma))),  # ||Delta|| = 0.1 C
                          (10 * C / math.sqrt(n), math.exp(eta * gamma))):  # ||Delta|| = 10 C
        old, new = one_round(algorithm, scale, D)
        np.testing.assert_allclose(float(new.extra["clip_norm"]), C * factor, rtol=1e-6)
        moved = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new.params),
                                                                 jax.tree.leaves(old.params))])
        np.testing.assert_allclose(np.linalg.norm(moved), min(np.sqrt(n) * scale, C), rtol=1e-4)
    # Half of the clients unclipped with gamma = 1/2 leaves C where it is.
    half = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                           clip_norm=C, noise_multiplier=0.0, denominator=2.0, adaptive_clipping=True,
                           clipped_count_stddev=0.0)
    state = half.init(jax.random.PRNGKey(0))
    zero = jax.tree.map(jnp.zeros_like, state.params)
    new = half.server_update(state, RoundTotal(weighted=zero, weight=jnp.float32(2),
                                               summed={"unclipped_centred": jnp.float32(0)}), jax.random.PRNGKey(1))
    assert float(new.extra["clip_norm"]) == pytest.approx(C, rel=1e-7)


def test_non_adaptive_state_and_broadcast_are_unchanged():
    """Without adaptive_clipping, DP keeps the base's extra (None for FedAvg) and sends no count."""
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    algorithm = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                                clip_norm=0.5, noise_multiplier=1.0, denominator=4.0)
    state = algorithm.init(jax.random.PRNGKey(0))
    assert state.extra is None and set(algorithm.broadcast(state)) == {"params"}
    client = ClientState(state.params, algorithm.client_optimizer.init(state.params))
    sent, _ = algorithm.client_contribution(client, algorithm.broadcast(state), jnp.float32(1), None, None,
                                            jax.random.PRNGKey(0))
    # What the client sends besides its update: its summed parts, and its metrics by their former log_ names.
    contribution = {**(sent.summed or {}), **{f"log_{name}": value for name, value in sent.metrics.items()}}
    assert "unclipped_centred" not in contribution and "log_dp_clip_norm" not in contribution


# ---------------------------------------------------------------------------------------------------------------
# z_Delta, the refusal of a too small sigma_b, the noise on the delta
# ---------------------------------------------------------------------------------------------------------------

def test_delta_noise_multiplier_and_refusal_of_a_too_small_count_stddev():
    for z, sigma_b in ((1.0, 5.0), (0.6, 1.5), (2.0, 1.01), (0.3, 1.0)):
        z_delta = delta_noise_multiplier(z, sigma_b)
        assert z_delta == pytest.approx(z_delta_reference(z, sigma_b), rel=1e-12)
        assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2, rel=1e-12)  # overall multiplier z
        assert z_delta > z
    assert delta_noise_multiplier(1.0, 5.0) == pytest.approx(1.0050378, rel=1e-6)  # the paper's m = 100, sigma_b = m/20
    assert delta_noise_multiplier(0.0, 0.0) == 0.0 and delta_noise_multiplier(0.0, 3.0) == 0.0  # no noise at all
    for z, sigma_b in ((1.0, 0.5), (1.0, 0.3), (0.6, 0.0)):  # 2 sigma_b <= z
        with pytest.raises(ValueError, match="clipped_count_stddev"):
            delta_noise_multiplier(z, sigma_b)

    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    build = lambda **options: build_algorithm(  # noqa: E731
        "dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
        context={"population": 1000, "sampling": "poisson", "clients_per_round": 5, "num_rounds": 10},
        clip_norm=0.5, adaptive_clipping=True, **options)
    with pytest.raises(ValueError, match="clipped_count_stddev"):  # default sigma_b = 5 / 20 = 0.25 <= 0.6 / 2
        build(noise_multiplier=0.6)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        build(noise_multiplier=0.6, clipped_count_stddev=0.3)
    algorithm = build(noise_multiplier=0.6, clipped_count_stddev=1.5)
    assert algorithm.delta_noise_multiplier == pytest.approx(z_delta_reference(0.6, 1.5))
    assert algorithm.mechanism.noise_multiplier == 0.6  # the ledger accounts the overall z
    assert build(noise_multiplier=0.4).count_noise_stddev == 0.25  # default: D / 20
    with pytest.raises(ValueError, match="target_unclipped_quantile"):
        build(noise_multiplier=0.4, target_unclipped_quantile=1.5)
    with pytest.raises(ValueError, match="adaptive_clipping"):
        build_algorithm("compressed_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                        compression="drive", adaptive_clipping=True)


def test_delta_noise_std_is_z_delta_c_t_over_the_denominator():
    model = get_model("logistic", (32, 32, 1), 10)  # 10,250 parameters
    z, sigma_b, C, D = 1.3, 2.0, 0.7, 12.5
    algorithm = build_algorithm("dp_fedavg", model, make_optimizer("sgd", 0.1), make_optimizer("sgd", 1.0),
                                clip_norm=C, noise_multiplier=z, denominator=D, adaptive_clipping=True,
                                clipped_count_stddev=sigma_b)
    state = algorithm.init(jax.random.PRNGKey(0))
    state = state.replace(extra={"clip_norm": jnp.float32(2 * C)})  # C_t = 2 C_0: the noise follows C_t
    zero = jax.tree.map(jnp.zeros_like, state.params)
    key = jax.random.PRNGKey(42)
    new = algorithm.server_update(state, RoundTotal(weighted=zero, weight=jnp.float32(3),
                                                    summed={"unclipped_centred": jnp.float32(0)}), key)
    moved = np.concatenate([np.asarray(a - b).ravel() for a, b in zip(jax.tree.leaves(new.params),
                                                                       jax.tree.leaves(state.params))])
    xi = np.asarray(jax.random.normal(jax.random.fold_in(key, NOISE_SALT), (moved.size,), jnp.float32))
    flat_order = np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(
        jax.flatten_util.ravel_pytree(state.params)[1](jnp.asarray(xi)))])
    np.testing.assert_allclose(moved, z_delta_reference(z, sigma_b) * 2 * C / D * flat_order, rtol=1e-4, atol=1e-6)
    # The count's noise is another stream: C_{t+1} = C_t exp(-eta (sigma_b xi_b / D + 1/2 - gamma)).
    xi_b = float(jax.random.normal(jax.random.fold_in(key, COUNT_NOISE_SALT), (), jnp.float32))
    assert xi_b != pytest.approx(float(xi[0]))
    np.testing.assert_allclose(float(new.extra["clip_norm"]), 2 * C * math.exp(-0.2 * (sigma_b * xi_b / D)),
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Resume: C_t comes back from the checkpoint
# ---------------------------------------------------------------------------------------------------------------

def adaptive_config(digits, num_rounds: int) -> ml_collections.ConfigDict:
    from fedstream.config import load_config

    config = load_config("digits_dp_fedavg", "fedstream.pipelines",
                         [f"data.path={digits}", f"num_rounds={num_rounds}", "eval.every=0"])
    with config.unlocked():
        config.algorithm.options.update({"adaptive_clipping": True, "clip_learning_rate": 0.5,
                                         "target_unclipped_quantile": 0.3})
    return config


@pytest.mark.slow
def test_resume_restores_the_clip_norm(tmp_path, digits):
    """4 rounds in one go == 2 rounds, then a resumed run to 4: params, C_t, and the logged C_t per round."""
    from fedstream.training.train import train

    rounds = 4
    train(adaptive_config(digits, rounds), tmp_path / "full", log=lambda _: None)
    train(adaptive_config(digits, rounds // 2), tmp_path / "resumed", log=lambda _: None)
    _, half = final_state(tmp_path / "resumed")
    train(adaptive_config(digits, rounds), tmp_path / "resumed", log=lambda _: None)
    step_a, a = final_state(tmp_path / "full")
    step_b, b = final_state(tmp_path / "resumed")
    assert step_a == step_b == rounds
    flat_a, flat_b = dict(flatten_tree(a)), dict(flatten_tree(b))
    assert flat_a.keys() == flat_b.keys() and "/extra/clip_norm" in flat_a
    for key in flat_a:
        assert np.array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key])), key
    assert float(half["extra"]["clip_norm"]) != float(a["extra"]["clip_norm"])  # C moved after the checkpoint
    rows_a = [r for r in train_records(tmp_path / "full") if r["kind"] == "train"]
    rows_b = [r for r in train_records(tmp_path / "resumed") if r["kind"] == "train"]
    assert rows_a == rows_b and len(rows_a) == rounds
    clips = [r["dp_clip_norm"] for r in rows_a]
    assert clips[0] == pytest.approx(0.5) and len(set(clips)) == rounds  # C_0 = clip_norm, then it adapts
