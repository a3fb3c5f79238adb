"""Language models of the federated benchmarks: Shakespeare and Stack Overflow.

* `shakespeare_lstm`: the character model of McMahan et al. (2017), used by
  Reddi et al. (2021) and FedJAX: embedding 8 -> LSTM 256 -> LSTM 256 ->
  dense to the vocabulary (90 = 86 characters + PAD/BOS/EOS/OOV), logits at
  every position of an int32 `[batch, 80]` input. 820,522 parameters.
* `stackoverflow_lstm`: the next-word model of Reddi et al. (2021): embedding
  96 -> LSTM 670 -> dense 96 -> dense to the vocabulary (10,004 = 10,000 words
  + PAD/BOS/EOS/OOV) on int32 `[batch, 20]`. 4,050,748 parameters.
* `stackoverflow_transformer`: a small causal transformer for the same task
  (our choice, not from the papers; see `CausalTransformerLM`). 2,970,388
  parameters at the defaults.

Initialisers follow the Keras models of google-research/federated
(`utils/models/{shakespeare,stackoverflow}_models.py`) that the paper used:
embeddings uniform(-0.05, 0.05), LSTM input kernels He-normal, recurrent
kernels orthogonal, forget-gate bias 1 (Keras `unit_forget_bias`), output
dense layers Glorot-normal.

Keras masks PAD inputs (`mask_zero=True`); here every position is computed.
PAD only ever trails the real tokens of a row (a snippet's or sentence's end),
so the outputs at real positions are the same, and the PAD targets are
left out of the loss by the `Model`'s `loss_mask_ids`.

The LSTM is one `jax.lax.scan` over time with the input projection of all
time steps hoisted out of it (one `[batch*T, in] x [in, 4h]` matmul); each
scanned step only does `h @ W_h`. On CPU inside the round's loops this was
faster than `nn.RNN(nn.OptimizedLSTMCell)` (measured in
benchmarks/standard_setups.py --lstm-check).

Every factory takes `hidden` and `conv_impl` (the train loop passes them to
all models) and ignores them; any other unknown option is an error.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fedstream.models.core import register_model

Initializer = Any


def uniform_init(scale: float) -> Initializer:
    """Uniform(-scale, scale), Keras' `RandomUniform` default for embeddings is 0.05."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def _lstm_bias_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Zeros, except 1 for the forget gate (gate order i, f, g, o)."""
    hidden = shape[0] // 4
    return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(1.0)


class LSTM(nn.Module):
    """One LSTM layer over `[batch, T, in]`, returning all hidden states `[batch, T, features]`.

    Gates (i, f, g, o) = x_t W_x + h_{t-1} W_h + b; c_t = s(f) c_{t-1} + s(i) tanh(g);
    h_t = s(o) tanh(c_t); zero initial state. Parameters: `input_kernel`
    `[in, 4h]`, `recurrent_kernel` `[h, 4h]`, `bias` `[4h]`, i.e. 4h(in + h + 1)
    as in Keras and `flax.linen.LSTMCell`.
    """

    features: int
    unroll: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.features
        w_x = self.param("input_kernel", nn.initializers.he_normal(), (x.shape[-1], 4 * h))
        w_h = self.param("recurrent_kernel", nn.initializers.orthogonal(), (h, 4 * h))
        b = self.param("bias", _lstm_bias_init, (4 * h,))
        projected = jnp.swapaxes(x @ w_x + b, 0, 1)  # [T, batch, 4h], all steps at once

        def step(carry: tuple[jax.Array, jax.Array], z_x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
            c, h_prev = carry
            i, f, g, o = jnp.split(z_x + h_prev @ w_h, 4, axis=-1)
            c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
            h_new = nn.sigmoid(o) * jnp.tanh(c)
            return (c, h_new), h_new

        # zeros_like keeps the inputs' and weights' varying manual axes (inside the
        # round's shard_map), so the scan carry has one type from the first step on.
        zeros = jnp.zeros_like(projected[0, :, :h]) + jnp.zeros_like(w_h[0, :h])
        _, hs = jax.lax.scan(step, (zeros, zeros), projected, unroll=self.unroll)
        return jnp.swapaxes(hs, 0, 1)


class LSTMLanguageModel(nn.Module):
    """Embedding -> stacked LSTMs (each optionally followed by a dense projection) -> vocabulary logits.

    `projection` > 0 adds a dense layer of that width after every LSTM (the
    Stack Overflow model projects 670 back to 96); 0 means none (Shakespeare).
    """

    vocab_size: int
    embed_dim: int
    lstm_sizes: tuple[int, ...]
    projection: int = 0
    unroll: int = 1

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=uniform_init(0.05))(tokens.astype(jnp.int32))
        for size in self.lstm_sizes:
            x = LSTM(size, unroll=self.unroll)(x)
            if self.projection:
                x = nn.Dense(self.projection, kernel_init=nn.initializers.glorot_normal())(x)
        return nn.Dense(self.vocab_size, kernel_init=nn.initializers.glorot_normal())(x)


class CausalTransformerLM(nn.Module):
    """A small pre-LayerNorm decoder-only transformer for next-word prediction.

    Token embedding (width) + learned absolute position embedding (one per
    input position, sized by the input length at init: 20 for Stack
    Overflow) -> `num_layers` blocks of [LayerNorm -> causal multi-head
    self-attention -> residual, LayerNorm -> dense mlp_dim GELU -> dense
    width -> residual] -> LayerNorm -> dense to the vocabulary. Dropout
    `dropout` on the embeddings and on both residual branches (training
    only). Untied input and output embeddings.

    Defaults (2 layers, 4 heads, width 128, MLP 512, dropout 0.1) are our
    choice: the smallest width in the 128-256 range, which keeps the model
    (2.97M parameters) below the LSTM's 4.05M and a step on 2 CPU cores
    cheaper; google-research/federated's `transformer_models.py` defaults
    (1 layer, width 512, 8 heads, tied 96-wide embeddings) are larger.
    """

    vocab_size: int
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 512
    dropout: float = 0.1

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        tokens = tokens.astype(jnp.int32)
        length = tokens.shape[1]
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.width, embedding_init=init)(tokens)
        x = x + self.param("position_embedding", init, (length, self.width))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        mask = nn.make_causal_mask(tokens)  # [batch, 1, T, T]: position t sees positions <= t
        for _ in range(self.num_layers):
            y = nn.LayerNorm()(x)
            y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.width,
                                                deterministic=True)(y, y, mask=mask)
            x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
            y = nn.LayerNorm()(x)
            y = nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp_dim)(y)))
            x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def shakespeare_lstm(num_classes: int, *, embed_dim: int = 8, lstm_sizes: Sequence[int] = (256, 256),
                     unroll: int = 1, hidden: Any = None, conv_impl: Any = None) -> nn.Module:
    """Shakespeare next-character LSTM (McMahan et al. 2017): embed 8, 2x LSTM 256; vocabulary 90."""
    del hidden, conv_impl  # passed to every factory by the train loop; not used here
    return LSTMLanguageModel(int(num_classes), int(embed_dim), tuple(int(s) for s in lstm_sizes), 0, int(unroll))


def stackoverflow_lstm(num_classes: int, *, embed_dim: int = 96, lstm_size: int = 670, unroll: int = 1,
                       hidden: Any = None, conv_impl: Any = None) -> nn.Module:
    """Stack Overflow next-word LSTM (Reddi et al. 2021): embed 96, LSTM 670, dense 96; vocabulary 10,004."""
    del hidden, conv_impl
    return LSTMLanguageModel(int(num_classes), int(embed_dim), (int(lstm_size),), int(embed_dim), int(unroll))


def stackoverflow_transformer(num_classes: int, *, width: int = 128, num_layers: int = 2, num_heads: int = 4,
                              mlp_dim: int = 512, dropout: float = 0.1, hidden: Any = None,
                              conv_impl: Any = None) -> nn.Module:
    """Small causal transformer LM (ours: 2 layers, 4 heads, width 128) for Stack Overflow next words."""
    del hidden, conv_impl
    if int(width) % int(num_heads):
        raise ValueError(f"width {width} must be a multiple of num_heads {num_heads}")
    return CausalTransformerLM(int(num_classes), int(width), int(num_layers), int(num_heads), int(mlp_dim),
                               float(dropout))


register_model("shakespeare_lstm", shakespeare_lstm)
register_model("stackoverflow_lstm", stackoverflow_lstm)
register_model("stackoverflow_transformer", stackoverflow_transformer)
