"""Models: the im2col convolution equals lax.conv; dropout keys matter; parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedstream.models import get_model
from fedstream.models.layers import conv2d


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("kernel", [(3, 3), (5, 3), (2, 2)])
def test_patches_conv_matches_lax_conv(padding, kernel):
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (3, 11, 9, 4))
    w = jax.random.normal(kk, (*kernel, 4, 6))
    # Jitted: one compilation per implementation instead of one per eager operation (the test's time).
    patches = jax.jit(lambda x, w: conv2d(x, w, padding, "patches"))
    xla = jax.jit(lambda x, w: conv2d(x, w, padding, "xla"))
    np.testing.assert_allclose(patches(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
    # Gradients too (they drive training).
    g1 = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, padding, "patches"))), (0, 1)))(x, w)
    g2 = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, padding, "xla"))), (0, 1)))(x, w)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_emnist_cnn_shape_params_and_dropout():
    model = get_model("cnn", (28, 28, 1), 62)
    params = model.init(jax.random.PRNGKey(0))
    assert sum(p.size for p in jax.tree.leaves(params)) == 1_206_590  # Reddi et al.'s CNN, 62 classes
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
    apply = jax.jit(model.apply)  # jitted: one compilation instead of one per eager operation
    eval_logits = apply(params, x)
    assert eval_logits.shape == (4, 62)
    a = apply(params, x, rng=jax.random.PRNGKey(2))
    b = apply(params, x, rng=jax.random.PRNGKey(3))
    assert not np.allclose(a, b)  # different keys, different dropout masks
    np.testing.assert_array_equal(a, apply(params, x, rng=jax.random.PRNGKey(2)))
    xla = get_model("cnn", (28, 28, 1), 62, conv_impl="xla")
    np.testing.assert_allclose(jax.jit(xla.apply)(params, x), eval_logits, rtol=1e-4, atol=1e-4)


def test_metrics_respect_mask():
    model = get_model("logistic", (2,), 3)
    logits = jnp.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    m = jax.jit(model.metrics)(logits, jnp.array([0, 0, 2]), jnp.array([True, False, True])).compute()  # jitted: fast
    assert float(m["accuracy"]) == 1.0
    with pytest.raises(ValueError, match="unknown model"):
        get_model("resnet", (2,), 3)


def test_sequence_scores_mask_special_tokens_like_a_numpy_reference():
    """Token-level loss masks PAD; in-vocabulary accuracy also masks BOS/EOS/OOV."""
    pad, bos, eos, oov = 0, 1, 2, 3
    model = get_model("logistic", (5,), 7, loss_mask_ids=(pad,), accuracy_mask_ids=(pad, bos, eos, oov))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
    labels[0, 3:] = pad
    labels[1, 0] = oov
    labels[2, 4] = eos
    mask = np.array([True, True, False])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    in_loss = (labels != pad) & mask[:, None]
    in_acc = in_loss & ~np.isin(labels, [bos, eos, oov])
    hit = logits.argmax(-1) == labels
    expected_loss = (nll * in_loss).sum() / in_loss.sum()
    expected_acc = (hit & in_acc).sum() / in_acc.sum()
    # Jitted: one compilation each instead of one per eager operation (the test's time).
    np.testing.assert_allclose(jax.jit(model.batch_loss)(jnp.array(logits), jnp.array(labels), jnp.array(mask)),
                               expected_loss, rtol=1e-5)
    m = jax.jit(model.metrics)(jnp.array(logits), jnp.array(labels), jnp.array(mask)).compute()
    np.testing.assert_allclose(float(m["loss"]), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), expected_acc, rtol=1e-6)
