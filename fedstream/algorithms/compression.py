"""Compression of a client's update vector: codecs that encode, and decode to what the server sums.

Every codec works on one flat float32 vector x in R^n (the whole model
update, `jax.flatten_util.ravel_pytree` order) and returns the *decoded*
vector the server adds to its sum, the number of bits the client sends, and
(for error feedback) its new residual. Decoding is simulated: the server's
sum of decoded vectors is exactly what a real decoder would form.

Codecs (with n' = 2^ceil(log2 n) after padding, b = bits per coordinate):

* `StochasticQuantizer` (unbiased uniform stochastic quantization):
    minmax: l = min x, u = max x, s = 2^b - 1 intervals, t_j = (x_j - l) / (u - l) * s,
            Q(x)_j = l + (u - l) / s * (floor(t_j) + Bernoulli(t_j - floor(t_j)))
            E Q(x) = x;  Var Q(x)_j = ((u - l) / s)^2 p_j (1 - p_j) <= (u - l)^2 / (4 s^2)
            bits = n b + 64 (l and u as float32)
    norm:   (QSGD, Alistarh et al. 2017) s = 2^(b-1) - 1 levels of |x_j| / ||x||_2 plus a sign bit,
            Q(x)_j = ||x|| sign(x_j) (floor(t_j) + Bernoulli(t_j - floor(t_j))) / s,  t_j = s |x_j| / ||x||
            E Q(x) = x;  E ||Q(x) - x||^2 <= min(n / s^2, sqrt(n) / s) ||x||^2;  bits = n b + 32
  With `rotate`, the quantizer is applied to y = R x in R^{n'} (Suresh et al. 2017), where
    R = H_{n'} D / sqrt(n')   (randomized Walsh-Hadamard: D = diag of Rademacher signs of the round,
                               H the Sylvester-Hadamard matrix, applied in O(n' log n')),
  shared by all clients of a round; the server sums the quantized y's and applies
  R^{-1} = D H_{n'} / sqrt(n') once, to the sum (so to the mean), then drops the padding.
  bits = n' b + side information.
* `Drive` (Vargaftik et al. 2021): y = R x, the client sends sign(y) (1 bit per coordinate,
  sign(0) = +1) and S = ||x||_2^2 / ||y||_1; decoded y_hat = S sign(y), x_hat = R^{-1} y_hat.
  <x_hat, x> = S ||y||_1 = ||x||^2 exactly, which makes x_hat unbiased for a uniformly random
  rotation (approximately so for the Hadamard one). bits = n' + 32.
* `TopK` with error feedback (Stich et al. 2018; Karimireddy et al. 2019): per client a residual e
  (in the client-state store), u = x + e, send the k entries of largest |u| (value and index),
  e <- u - top_k(u). bits = k (32 + ceil(log2 n)).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

FLOAT_BITS = 32


def padded_size(n: int) -> int:
    """n' = the smallest power of 2 >= n."""
    return 1 << max(int(n) - 1, 0).bit_length()


def fwht(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh-Hadamard transform H x / sqrt(n) along the last axis (n a power of 2), O(n log n).

    H is the Sylvester-ordered Hadamard matrix; the transform is symmetric and its own inverse.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-2 length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return x / jnp.sqrt(jnp.asarray(n, x.dtype))


def rotation_signs(round_key: jax.Array, n: int) -> jax.Array:
    """The diagonal D of the round's rotation: Rademacher signs in R^{n'}, n' = padded_size(n)."""
    return jax.random.rademacher(round_key, (padded_size(n),), jnp.float32)


def rotate(x: jax.Array, round_key: jax.Array) -> jax.Array:
    """R x = H D pad(x) / sqrt(n') in R^{n'}."""
    signs = rotation_signs(round_key, x.shape[-1])
    padded = jnp.pad(x, (0, signs.shape[0] - x.shape[-1]))
    return fwht(signs * padded)


def unrotate(y: jax.Array, round_key: jax.Array, n: int) -> jax.Array:
    """R^{-1} y = D H y / sqrt(n'), truncated to the first n coordinates."""
    return (rotation_signs(round_key, n) * fwht(y))[:n]


@dataclasses.dataclass(frozen=True)
class Codec:
    """No compression: x is sent as n float32 numbers.

    `encode(x, key, round_key, residual) -> (decoded, new_residual, bits)`: `decoded` is in the
    server's summation domain (R^{n'} for rotating codecs, else R^n); `decode_sum` maps a sum
    of decoded vectors back to R^n.
    """

    rotates = False  # the server must apply R^{-1} (needs the round key)
    stateful = False  # keeps a per-client residual in the client-state store

    def encode(self, x: jax.Array, key: jax.Array, round_key: jax.Array | None,
               residual: jax.Array | None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """Identity; bits = 32 n."""
        return x, residual, jnp.float32(FLOAT_BITS * x.shape[0])

    def decode_sum(self, total: jax.Array, round_key: jax.Array | None, n: int) -> jax.Array:
        """The sum in R^n (identity unless the codec rotates)."""
        return unrotate(total, round_key, n) if self.rotates else total

    def summed_size(self, n: int) -> int:
        """Length of the decoded vectors the server sums."""
        return padded_size(n) if self.rotates else n


def stochastic_round(t: jax.Array, key: jax.Array) -> jax.Array:
    """floor(t) + Bernoulli(t - floor(t)): E = t."""
    low = jnp.floor(t)
    return low + (jax.random.uniform(key, t.shape, t.dtype) < t - low).astype(t.dtype)


def quantize_minmax(x: jax.Array, bits: int, key: jax.Array) -> jax.Array:
    """Unbiased stochastic quantization to 2^bits levels evenly spaced on [min x, max x]."""
    levels = (1 << bits) - 1
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    t = jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1) * levels, 0.0)
    q = jnp.clip(stochastic_round(t, key), 0, levels)
    return lo + q * (span / levels)


def quantize_norm(x: jax.Array, bits: int, key: jax.Array) -> jax.Array:
    """Unbiased QSGD quantization: sign and 2^(bits-1) - 1 levels of |x_j| / ||x||_2."""
    levels = (1 << (bits - 1)) - 1
    norm = jnp.linalg.norm(x)
    t = jnp.where(norm > 0, jnp.abs(x) / jnp.where(norm > 0, norm, 1) * levels, 0.0)
    q = jnp.clip(stochastic_round(t, key), 0, levels)
    return norm * jnp.sign(x) * q / levels


@dataclasses.dataclass(frozen=True)
class StochasticQuantizer(Codec):
    """Unbiased b-bit stochastic quantization (scale 'minmax' or 'norm'), optionally after the random rotation."""

    bits: int = 8
    scale: str = "minmax"
    rotation: bool = False

    def __post_init__(self) -> None:
        if self.scale not in ("minmax", "norm"):
            raise ValueError(f"quantization scale must be 'minmax' or 'norm', got {self.scale!r}")
        low = 2 if self.scale == "norm" else 1
        if not low <= self.bits <= 16:
            raise ValueError(f"{self.scale} quantization needs {low} <= bits <= 16, got {self.bits}")

    @property
    def rotates(self) -> bool:  # type: ignore[override]
        return self.rotation

    def encode(self, x, key, round_key, residual):
        """Q(x) or Q(R x); bits = n b + 64 (minmax) or n b + 32 (norm), n -> n' when rotating."""
        y = rotate(x, round_key) if self.rotation else x
        quantize = quantize_minmax if self.scale == "minmax" else quantize_norm
        side = 2 * FLOAT_BITS if self.scale == "minmax" else FLOAT_BITS
        return quantize(y, self.bits, key), residual, jnp.float32(self.bits * y.shape[0] + side)


@dataclasses.dataclass(frozen=True)
class Drive(Codec):
    """DRIVE: one bit per rotated coordinate and the scale S = ||x||^2 / ||R x||_1."""

    rotates = True

    def encode(self, x, key, round_key, residual):
        """S sign(R x); bits = n' + 32."""
        y = rotate(x, round_key)
        l1 = jnp.sum(jnp.abs(y))
        scale = jnp.where(l1 > 0, jnp.sum(x * x) / jnp.where(l1 > 0, l1, 1), 0.0)
        return scale * jnp.where(y >= 0, 1.0, -1.0), residual, jnp.float32(y.shape[0] + FLOAT_BITS)


@dataclasses.dataclass(frozen=True)
class TopK(Codec):
    """Top-k sparsification (k = ceil(fraction n), or `k` if > 0), with error feedback by default."""

    fraction: float = 0.01
    k: int = 0
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if self.k < 0 or (self.k == 0 and not 0.0 < self.fraction <= 1.0):
            raise ValueError(f"top-k needs k >= 1 or a fraction in (0, 1], got k={self.k}, fraction={self.fraction}")

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.error_feedback

    def num_kept(self, n: int) -> int:
        """k for a vector of n entries."""
        return min(n, self.k) if self.k else min(n, max(1, math.ceil(self.fraction * n)))

    def encode(self, x, key, round_key, residual):
        """u = x + e; sends top_k(u); e <- u - top_k(u); bits = k (32 + ceil(log2 n))."""
        u = x + residual if self.error_feedback else x
        k = self.num_kept(x.shape[0])
        _, index = jax.lax.top_k(jnp.abs(u), k)
        sent = jnp.zeros_like(u).at[index].set(u[index])
        new_residual = u - sent if self.error_feedback else residual
        index_bits = max(1, math.ceil(math.log2(max(x.shape[0], 2))))
        return sent, new_residual, jnp.float32(k * (FLOAT_BITS + index_bits))


def make_codec(name: str, *, bits: int = 8, scale: str = "minmax", rotate: bool = False, topk_fraction: float = 0.01,
               topk: int = 0, error_feedback: bool = True) -> Codec:
    """A codec by name: 'none', 'quantize' (bits, scale, rotate), 'drive', 'topk' (topk_fraction or topk,
    error_feedback)."""
    if name == "none":
        return Codec()
    if name == "quantize":
        return StochasticQuantizer(int(bits), str(scale), bool(rotate))
    if name == "drive":
        return Drive()
    if name == "topk":
        return TopK(float(topk_fraction), int(topk), bool(error_feedback))
    raise ValueError(f"unknown compression {name!r}; known: none, quantize, drive, topk")


__all__ = ["Codec", "StochasticQuantizer", "Drive", "TopK", "make_codec", "fwht", "rotate", "unrotate",
           "padded_size", "quantize_minmax", "quantize_norm"]

