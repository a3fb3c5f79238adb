"""Image models of the federated benchmarks: CIFAR-100's ResNet-18 (GroupNorm) and logistic regression.

* `resnet18_gn`: the ResNet-18 of Reddi et al. (2021), "Adaptive Federated
  Optimization", as defined in google-research/federated
  `utils/models/resnet_models.py` (`create_resnet18(norm='group')`), the
  code the paper ran: a pre-activation ResNet v2 with an ImageNet stem (7x7
  stride-2 convolution, GroupNorm, ReLU, 3x3 stride-2 max pool), 4 stages of
  2 basic blocks with 64/128/256/512 filters, GroupNorm -> ReLU, global
  average pooling and a dense layer. Its details, kept here:
    - GroupNorm with 2 groups and epsilon 1e-3 (the `tfa.layers.GroupNormalization`
      defaults the Keras model relied on) everywhere BatchNorm would be;
    - convolutions without bias, He-normal initialised, 'SAME' padding;
    - no stride between stages: every stage runs at the stem's output
      resolution (input / 4; 8x8 for 32x32 images), the first block of a
      stage changes the width through a 1x1 convolution + GroupNorm shortcut;
    - the first block of the first stage skips its pre-activation;
    - dense head initialised N(0, 0.01).
  11,227,812 parameters for 3-channel input and 100 classes.
* `cifar_logistic`: the same input normalisation, then one dense layer
  (307,300 parameters for 32x32x3 and 100 classes). The plain `logistic`
  model also accepts uint8 images, but on raw 0..255 values.

Inputs are uint8 images `[batch, H, W, 3]` (any H, W), normalised inside the
model (`normalization`):
  - 'dataset' (default): x / 255, minus the CIFAR-100 training-set channel
    mean (0.5071, 0.4865, 0.4409), divided by its std (0.2673, 0.2564, 0.2762);
  - 'per_image': `tf.image.per_image_standardization`, what the TFF/Reddi
    pipeline did: (x - mean(x)) / max(std(x), 1/sqrt(H*W*C)) per image.
Float inputs are taken to be already scaled to [0, 1] ('dataset') or are
standardised as they are ('per_image').

Convolutions go through `fedstream.models.layers.conv2d` (im2col on CPU,
`conv_impl`); stride-2 convolutions and the max pool are written as strided
slices with TensorFlow's 'SAME' padding, so both implementations agree with
`lax.conv_general_dilated` / `lax.reduce_window`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fedstream.models.core import register_model
from fedstream.models.layers import ConvImpl, conv2d, resolve_conv_impl

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NORMALIZATIONS = ("dataset", "per_image")


def normalize_images(x: jax.Array, normalization: str) -> jax.Array:
    """uint8 (or [0, 1] float) images -> float32 model inputs (see the module doc)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    x = x.astype(jnp.float32)
    if normalization == "per_image":
        axes = tuple(range(1, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        return (x - mean) / jnp.maximum(std, 1.0 / np.sqrt(np.prod(x.shape[1:])))
    if integer:
        x = x / 255.0
    return (x - jnp.asarray(CIFAR100_MEAN)) / jnp.asarray(CIFAR100_STD)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def strided_conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str) -> jax.Array:
    """'SAME' NHWC convolution with an HWIO kernel and a spatial stride, by `impl` ('xla' or 'patches')."""
    if stride == 1:
        return conv2d(x, kernel, "SAME", impl)
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kh, kw, cin, cout = kernel.shape
    (top, bottom), (left, right) = same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    patches = jnp.concatenate([x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
                               for i in range(kh) for j in range(kw)], axis=-1)
    return patches @ kernel.reshape(kh * kw * cin, cout)


def max_pool_same(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """Max pooling with TensorFlow 'SAME' padding, as the max of strided slices (no reduce_window)."""
    (top, bottom), (left, right) = same_padding(x.shape[1], window, stride), same_padding(x.shape[2], window, stride)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (x.shape[1] - window) // stride + 1, (x.shape[2] - window) // stride + 1
    out = None
    for i in range(window):
        for j in range(window):
            part = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out = part if out is None else jnp.maximum(out, part)
    return out


class ConvNoBias(nn.Module):
    """'SAME' convolution without bias (kernel HWIO, He-normal), stride 1 or more."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.he_normal(),
                            (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
        return strided_conv2d(x, kernel, self.stride, resolve_conv_impl(self.impl))


class BasicBlockV2(nn.Module):
    """Pre-activation basic block: [GN -> ReLU ->] conv3x3 -> GN -> ReLU -> conv3x3, plus the shortcut."""

    features: int
    groups: int = 2
    skip_first_norm: bool = False
    impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = x if self.skip_first_norm else nn.relu(nn.GroupNorm(self.groups, epsilon=1e-3)(x))
        y = ConvNoBias(self.features, 3, impl=self.impl)(y)
        y = nn.relu(nn.GroupNorm(self.groups, epsilon=1e-3)(y))
        y = ConvNoBias(self.features, 3, impl=self.impl)(y)
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = nn.GroupNorm(self.groups, epsilon=1e-3)(ConvNoBias(self.features, 1, impl=self.impl)(x))
        return shortcut + y


class ResNet18GN(nn.Module):
    """ResNet-18 v2 with GroupNorm, as in Reddi et al. (2021) (see the module doc)."""

    num_classes: int
    groups: int = 2
    normalization: str = "dataset"
    conv_impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = normalize_images(x, self.normalization)
        x = ConvNoBias(64, 7, stride=2, impl=self.conv_impl)(x)
        x = nn.relu(nn.GroupNorm(self.groups, epsilon=1e-3)(x))
        x = max_pool_same(x, 3, 2)
        for stage, width in enumerate((64, 128, 256, 512)):
            for block in range(2):
                x = BasicBlockV2(width, self.groups, skip_first_norm=stage == 0 and block == 0,
                                 impl=self.conv_impl)(x)
        x = nn.relu(nn.GroupNorm(self.groups, epsilon=1e-3)(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01))(x)


class NormalizedLogistic(nn.Module):
    """Multinomial logistic regression on normalised, flattened images."""

    num_classes: int
    normalization: str = "dataset"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = normalize_images(x, self.normalization)
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def resnet18_gn(num_classes: int, *, groups: int = 2, normalization: str = "dataset", conv_impl: ConvImpl = "auto",
                hidden: Any = None) -> nn.Module:
    """ResNet-18 v2, GroupNorm (2 groups), of Reddi et al. (2021) for CIFAR-100: 11.2M params (`hidden` ignored)."""
    del hidden
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    resolve_conv_impl(conv_impl)  # validates
    return ResNet18GN(int(num_classes), int(groups), str(normalization), conv_impl)


def cifar_logistic(num_classes: int, *, normalization: str = "dataset", hidden: Any = None,
                   conv_impl: Any = None) -> nn.Module:
    """Logistic regression on images normalised in the model (uint8 input; `hidden`, `conv_impl` ignored)."""
    del hidden, conv_impl
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return NormalizedLogistic(int(num_classes), str(normalization))


register_model("resnet18_gn", resnet18_gn)
register_model("cifar_logistic", cifar_logistic)
