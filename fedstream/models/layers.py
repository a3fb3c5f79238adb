"""Layers that stay fast inside `lax.scan` on every backend.

XLA:CPU runs a `lax.conv` inside a scanned loop roughly 45x slower than the
same convolution written as image patches followed by one matrix product
(measured in docs/performance.md). `Conv2D` keeps `flax.linen.Conv`'s
parameter layout (kernel HWIO, bias) and picks the implementation per
backend, so checkpoints are interchangeable between the two.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

ConvImpl = Literal["auto", "xla", "patches"]


def resolve_conv_impl(impl: ConvImpl) -> str:
    """'auto' means patches on CPU (fast inside loops) and XLA's conv elsewhere."""
    if impl == "auto":
        return "patches" if jax.default_backend() == "cpu" else "xla"
    if impl not in ("xla", "patches"):
        raise ValueError(f"conv_impl must be 'auto', 'xla' or 'patches', got {impl!r}")
    return impl


def conv2d(x: jax.Array, kernel: jax.Array, padding: str, impl: str) -> jax.Array:
    """A stride-1 NHWC convolution with an HWIO kernel, by `impl`.

    'patches' is im2col written with slices: the kh*kw shifted views of the
    input are concatenated on the channel axis and multiplied by the
    flattened kernel. Its gradient is slicing and padding, which XLA:CPU
    runs fast in loops (the gradient of `lax.conv_general_dilated_patches`
    is itself a convolution and was ~3x slower, see docs/performance.md).
    """
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kh, kw, cin, cout = kernel.shape
    if padding == "SAME":
        top, left = (kh - 1) // 2, (kw - 1) // 2
        x = jnp.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    elif padding != "VALID":
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    # Feature index of the patches = (i * kw + j) * cin + c, matching kernel.reshape.
    patches = jnp.concatenate([x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
    return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv2D(nn.Module):
    """Stride-1 2-D convolution with a per-backend implementation (see module doc)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "VALID"
    impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (*self.kernel_size, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv2d(x, kernel, self.padding, resolve_conv_impl(self.impl)) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, NHWC, as reshape + max (no reduce_window)."""
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
