"""Compressed client updates: codec properties, and 3 rounds against a plain-NumPy reference on 1 and 4 devices.

The reference re-derives each codec from its paper (the Walsh-Hadamard
matrix from scipy, stochastic rounding, DRIVE's scale, top-k with an error
feedback residual per client) in float64 and shares with the library only
the data order and the random numbers: the uniform draws and rotation signs
come from the same JAX keys (client_key / the run's rotation key folded with
the round), which is the definition of the randomness, not arithmetic under
test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard

import run_transforms as rt
from fedstream.algorithms.compression import (Drive, StochasticQuantizer, TopK, fwht, make_codec, padded_size,
                                              quantize_minmax, quantize_norm, rotate, unrotate)
from fedstream.algorithms.dp_fedavg import CODEC_SALT, ROTATION_SALT
from fedstream.training.rounds import client_key

TOL = dict(rtol=2e-4, atol=2e-5)
CODEC_CASES = ("quantize_rotate", "quantize_norm", "drive", "topk_ef")
# On 4 devices: the shared rotation, DRIVE, and the error-feedback residual through the client-state store.
FOUR_DEVICE_CASES = ("quantize_rotate", "drive", "topk_ef")
SHAPE = (int(np.prod(rt.INPUT_SHAPE)), rt.NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------------
# Properties of the codecs
# ---------------------------------------------------------------------------------------------------------------

def test_fwht_is_the_orthonormal_hadamard_transform_and_rotation_inverts():
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    # Jitted: one compilation each instead of one per eager operation (the test's time).
    np.testing.assert_allclose(np.asarray(jax.jit(fwht)(jnp.asarray(x))), x @ hadamard(64).T / 8.0, rtol=1e-5,
                               atol=1e-5)
    v = jnp.asarray(np.random.default_rng(1).normal(size=37), jnp.float32)
    key = jax.random.PRNGKey(5)
    y = jax.jit(rotate)(v, key)
    assert y.shape == (64,) and padded_size(37) == 64 and padded_size(64) == 64 and padded_size(1) == 1
    np.testing.assert_allclose(float(jnp.linalg.norm(y)), float(jnp.linalg.norm(v)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(unrotate, static_argnums=2)(y, key, 37)), np.asarray(v), rtol=1e-5,
                               atol=1e-6)


def _draws(codec_fn, x, count, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), count)
    return np.asarray(jax.jit(jax.vmap(lambda k: codec_fn(x, k)))(keys), np.float64)


@pytest.mark.parametrize("bits", [1, 3])
def test_minmax_quantization_is_unbiased_with_the_known_variance(bits):
    x = jnp.asarray(np.random.default_rng(2).normal(size=50), jnp.float32)
    count = 20000
    q = _draws(lambda v, k: quantize_minmax(v, bits, k), x, count)
    xs = np.asarray(x, np.float64)
    s = 2 ** bits - 1
    lo, hi = xs.min(), xs.max()
    grid = (hi - lo) / s
    # Values lie on the 2^b levels of [min, max].
    levels = (q - lo) / grid
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    # Per coordinate: Var = grid^2 p (1 - p), p the fractional position between its two levels.
    t = (xs - lo) / grid
    p = t - np.floor(t)
    var = grid ** 2 * p * (1 - p)
    assert np.all(np.abs(q.mean(0) - xs) <= 5 * np.sqrt(var / count) + 1e-6)  # unbiased (5 sigma of the mean)
    total = q.var(0).sum()
    np.testing.assert_allclose(total, var.sum(), rtol=0.05)
    assert total <= xs.size * (hi - lo) ** 2 / (4 * s ** 2)  # the bound n (u - l)^2 / (4 s^2)


def test_norm_quantization_is_unbiased_within_the_qsgd_bound():
    x = jnp.asarray(np.random.default_rng(3).normal(size=64), jnp.float32)
    count, bits = 20000, 3
    q = _draws(lambda v, k: quantize_norm(v, bits, k), x, count)
    xs = np.asarray(x, np.float64)
    s = 2 ** (bits - 1) - 1
    norm = np.linalg.norm(xs)
    t = np.abs(xs) / norm * s
    var = (norm / s) ** 2 * (t - np.floor(t)) * (1 - t + np.floor(t))
    assert np.all(np.abs(q.mean(0) - xs) <= 5 * np.sqrt(var / count) + 1e-6)
    mse = ((q - xs) ** 2).sum(1).mean()
    np.testing.assert_allclose(mse, var.sum(), rtol=0.05)
    assert mse <= min(xs.size / s ** 2, math.sqrt(xs.size) / s) * norm ** 2


def test_rotated_quantization_is_unbiased_in_the_original_coordinates():
    x = jnp.asarray(np.random.default_rng(4).normal(size=40), jnp.float32)
    codec = StochasticQuantizer(bits=2, rotation=True)
    round_key = jax.random.PRNGKey(9)
    q = _draws(lambda v, k: codec.decode_sum(codec.encode(v, k, round_key, None)[0], round_key, 40), x, 20000)
    xs = np.asarray(x, np.float64)
    se = q.std(0) / np.sqrt(len(q))
    assert np.all(np.abs(q.mean(0) - xs) <= 5 * se + 1e-6)


def test_drive_scale_and_approximate_unbiasedness_over_rotations():
    x = jnp.asarray(np.random.default_rng(5).normal(size=50), jnp.float32)
    xs = np.asarray(x, np.float64)
    codec = Drive()

    def decode(v, round_key):
        sent, _, bits = codec.encode(v, jax.random.PRNGKey(0), round_key, None)
        return codec.decode_sum(sent, round_key, v.shape[0])

    # S = ||x||^2 / ||R x||_1 makes <x_hat, x> = ||x||^2 exactly, for every rotation.
    for k in range(5):
        x_hat = np.asarray(decode(x, jax.random.PRNGKey(k)), np.float64)
        np.testing.assert_allclose(x_hat @ xs, xs @ xs, rtol=1e-4)
    sent, _, bits = codec.encode(x, jax.random.PRNGKey(0), jax.random.PRNGKey(1), None)
    assert float(bits) == 64 + 32 and len(np.unique(np.abs(np.asarray(sent)))) == 1
    many = _draws(decode, x, 4000, seed=11)  # a fresh rotation per draw
    assert np.linalg.norm(many.mean(0) - xs) < 0.06 * np.linalg.norm(xs)
    assert ((many - xs) ** 2).sum(1).mean() < np.linalg.norm(xs) ** 2  # vNMSE < 1 (about pi/2 - 1)


def test_topk_error_feedback_telescopes_and_counts_bits():
    codec = TopK(fraction=0.1)
    rng = np.random.default_rng(6)
    n = 100
    residual = jnp.zeros(n, jnp.float32)
    sent_total, input_total = np.zeros(n), np.zeros(n)
    for _ in range(7):
        x = jnp.asarray(rng.normal(size=n), jnp.float32)
        sent, residual, bits = codec.encode(x, jax.random.PRNGKey(0), None, residual)
        assert int((np.asarray(sent) != 0).sum()) == 10
        assert float(bits) == 10 * (32 + 7)
        sent_total += np.asarray(sent, np.float64)
        input_total += np.asarray(x, np.float64)
    # sum of what was sent + what is still owed = sum of the updates
    np.testing.assert_allclose(sent_total + np.asarray(residual), input_total, rtol=1e-5, atol=1e-5)
    no_ef = TopK(fraction=0.1, error_feedback=False)
    assert not no_ef.stateful and codec.stateful


def test_bits_and_bad_options():
    x = jnp.ones(28, jnp.float32)
    key = jax.random.PRNGKey(0)

    def bits(codec, round_key=None):  # jitted: one compilation per codec instead of one per eager operation
        return float(jax.jit(lambda v, k, rk: codec.encode(v, k, rk, None)[2])(x, key, round_key))

    assert bits(make_codec("none")) == 32 * 28
    assert bits(make_codec("quantize", bits=4)) == 4 * 28 + 64
    assert bits(make_codec("quantize", bits=4, scale="norm")) == 4 * 28 + 32
    assert bits(make_codec("quantize", bits=4, rotate=True), key) == 4 * 32 + 64
    # A constant vector quantizes to itself (span 0), and so does the zero vector under 'norm'.
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize_minmax, static_argnums=1)(x, 2, key)), np.ones(28))
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize_norm, static_argnums=1)(jnp.zeros(5), 2, key)),
                                  np.zeros(5))
    for bad in (dict(name="quantize", bits=0), dict(name="quantize", bits=1, scale="norm"),
                dict(name="quantize", scale="max"), dict(name="topk", topk_fraction=0.0), dict(name="zip")):
        name = bad.pop("name")
        with pytest.raises(ValueError):
            make_codec(name, **bad)


# ---------------------------------------------------------------------------------------------------------------
# 3 rounds against the NumPy reference
# ---------------------------------------------------------------------------------------------------------------

def reference_compressed(case: str, W0: np.ndarray, b0: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The codec's equations, client by client, in float64; returns (W, b, bits sent per round)."""
    spec = rt.CASES[case]
    options = spec["options"]
    theta = rt.flat(W0, b0)
    n = theta.size
    n_pad = 1 << (n - 1).bit_length()
    H = hadamard(n_pad) / np.sqrt(n_pad)
    transform_key = jax.random.fold_in(jax.random.PRNGKey(0), ROTATION_SALT)  # the run's init key is PRNGKey(0)
    residual: dict[int, np.ndarray] = {}
    bits_per_round = []
    for r in range(rt.ROUNDS):
        signs = np.asarray(jax.random.rademacher(jax.random.fold_in(transform_key, r), (n_pad,), jnp.float32),
                           np.float64)
        total, weights, bits = np.zeros(n_pad), 0.0, 0.0
        for c, delta, w in rt.client_updates(spec, r, theta, SHAPE):
            key = jax.random.fold_in(client_key(rt.SEED, r, c), CODEC_SALT)
            if options["compression"] == "quantize":
                y = H @ (signs * np.pad(delta, (0, n_pad - n))) if options.get("rotate") else delta
                u = np.asarray(jax.random.uniform(key, y.shape, jnp.float32), np.float64)
                b = options["bits"]
                if options.get("quantization_scale", "minmax") == "minmax":
                    s = 2 ** b - 1
                    lo, hi = y.min(), y.max()
                    t = (y - lo) / (hi - lo) * s
                    decoded = lo + (np.floor(t) + (u < t - np.floor(t))) * (hi - lo) / s
                    bits += b * y.size + 64
                else:
                    s = 2 ** (b - 1) - 1
                    norm = np.linalg.norm(y)
                    t = np.abs(y) / norm * s
                    decoded = norm * np.sign(y) * (np.floor(t) + (u < t - np.floor(t))) / s
                    bits += b * y.size + 32
            elif options["compression"] == "drive":
                y = H @ (signs * np.pad(delta, (0, n_pad - n)))
                decoded = (delta @ delta) / np.abs(y).sum() * np.where(y >= 0, 1.0, -1.0)
                bits += n_pad + 32
            else:  # top-k with error feedback
                k = math.ceil(options["topk_fraction"] * n)
                u = delta + residual.get(c, np.zeros(n))
                keep = np.argsort(-np.abs(u), kind="stable")[:k]
                decoded = np.zeros(n)
                decoded[keep] = u[keep]
                residual[c] = u - decoded
                bits += k * (32 + math.ceil(math.log2(n)))
            total[:decoded.size] += w * decoded
            weights += w
        mean = total / weights
        if options["compression"] == "drive" or options.get("rotate"):
            mean = signs * (H @ mean)
        theta = theta + spec["server_lr"] * mean[:n]
        bits_per_round.append(bits)
    W, b = rt.unflat(theta, SHAPE)
    return W, b, bits_per_round


def check_against_reference(case: str, got: dict) -> None:
    W, b, bits = reference_compressed(case, got["W0"], got["b0"])
    np.testing.assert_allclose(got["W"], W, **TOL)
    np.testing.assert_allclose(got["b"], b, **TOL)
    np.testing.assert_allclose(got["logs/log_bits"], bits, rtol=1e-6)
    assert np.abs(W - got["W0"]).max() > 1e-2  # the model moved


@pytest.mark.parametrize("case", CODEC_CASES)
def test_compressed_rounds_match_numpy_reference_on_one_device(case, tmp_path):
    check_against_reference(case, rt.run(rt.CASES[case], 1, str(tmp_path / "store")))


@pytest.mark.parametrize("case", FOUR_DEVICE_CASES)
def test_compressed_rounds_match_numpy_reference_on_four_devices(case, tmp_path):
    check_against_reference(case, rt.run(rt.CASES[case], 4, str(tmp_path / "store")))


def test_compression_none_is_the_base_algorithm(tmp_path):
    """compressed_fedavg with compression 'none' ends where fedavg does."""
    spec = dict(rt.CASES["drive"], options={"compression": "none"})
    got = rt.run(spec, 1, str(tmp_path / "a"))
    plain = rt.run(dict(spec, algorithm="fedavg", options={}), 1, str(tmp_path / "b"))
    np.testing.assert_allclose(got["W"], plain["W"], rtol=1e-5, atol=1e-6)
    assert (got["logs/log_bits"] > 0).all() and "logs/log_bits" not in plain
