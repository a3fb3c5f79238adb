"""The literature models: parameter counts from the published layer sizes, shapes, dtypes, numerics, training.

Parameter counts are recomputed here from the architectures' layer sizes
(Keras conventions: an LSTM layer has 4h(in + h + 1) weights, a bias-free
convolution k*k*in*out, a GroupNorm 2 per channel), never read from the
models. Shapes and counts use `jax.eval_shape` (tracing only), so they cost
no compilation; the FedAvg tests run the library's round on tiny synthetic
data of each benchmark's shape and dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedstream.algorithms.fedavg import FedAvg, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.data.format import FeatureSpec
from fedstream.models import MODEL_NAMES, get_model
from fedstream.models.text import LSTMLanguageModel
from fedstream.models.vision import CIFAR100_MEAN, CIFAR100_STD, max_pool_same, normalize_images, strided_conv2d
from fedstream.training.rounds import build_train_round, make_mesh, shard_batch


def num_params(model) -> int:
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def out_shape(model, batch: int = 2):
    x = jax.ShapeDtypeStruct((batch, *model.input_shape), jnp.dtype(model.input_dtype))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return jax.eval_shape(model.apply, params, x)


def lstm_params(inputs: int, hidden: int) -> int:
    return 4 * hidden * (inputs + hidden + 1)


def dense_params(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


# ---------------------------------------------------------------- published parameter counts


def test_shakespeare_lstm_matches_mcmahan_architecture():
    model = get_model("shakespeare_lstm", (80,), 90, input_dtype="int32")
    vocab, embed, h = 90, 8, 256  # 86 characters + PAD/BOS/EOS/OOV
    expected = vocab * embed + lstm_params(embed, h) + lstm_params(h, h) + dense_params(h, vocab)
    assert expected == 820_522
    assert num_params(model) == expected
    out = out_shape(model, 3)
    assert out.shape == (3, 80, 90) and out.dtype == jnp.float32


def test_stackoverflow_lstm_matches_reddi_architecture():
    model = get_model("stackoverflow_lstm", (20,), 10_004, input_dtype="int32")
    vocab, embed, h = 10_004, 96, 670  # 10,000 words + PAD/BOS/EOS/OOV
    expected = vocab * embed + lstm_params(embed, h) + dense_params(h, embed) + dense_params(embed, vocab)
    assert expected == 4_050_748  # the count Reddi et al. report for this model
    assert num_params(model) == expected
    assert out_shape(model).shape == (2, 20, 10_004)


def test_stackoverflow_transformer_size():
    model = get_model("stackoverflow_transformer", (20,), 10_004, input_dtype="int32")
    vocab, width, mlp, layers, length = 10_004, 128, 512, 2, 20
    block = (2 * 2 * width                                  # two LayerNorms
             + 4 * (width * width + width)                  # q, k, v, out projections
             + dense_params(width, mlp) + dense_params(mlp, width))
    expected = vocab * width + length * width + layers * block + 2 * width + dense_params(width, vocab)
    assert expected == 2_970_388
    assert num_params(model) == expected
    assert out_shape(model).shape == (2, 20, 10_004)


def resnet18_v2_gn_params(channels: int, classes: int) -> int:
    """google-research/federated create_resnet18(norm='group'): 7x7 stem, 4 stages x 2 basic blocks, no conv bias."""
    gn = lambda c: 2 * c  # noqa: E731  (gamma, beta)
    conv = lambda k, i, o: k * k * i * o  # noqa: E731
    total = conv(7, channels, 64) + gn(64)  # stem conv + its GroupNorm
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            first_of_net = stage == 0 and block == 0
            total += (0 if first_of_net else gn(cin)) + conv(3, cin, width) + gn(width) + conv(3, width, width)
            if cin != width:
                total += conv(1, cin, width) + gn(width)  # projection shortcut
            cin = width
    return total + gn(512) + dense_params(512, classes)


def test_resnet18_gn_matches_reddi_architecture_on_uint8_images():
    model = get_model("resnet18_gn", (32, 32, 3), 100, input_dtype="uint8")
    expected = resnet18_v2_gn_params(3, 100)
    assert expected == 11_227_812
    assert num_params(model) == expected
    out = out_shape(model)
    assert out.shape == (2, 100) and out.dtype == jnp.float32
    # Reddi et al. crop to 24x24: the model takes any image size.
    assert out_shape(get_model("resnet18_gn", (24, 24, 3), 100, input_dtype="uint8")).shape == (2, 100)


def test_emnist_cnn_and_logistic_counts():
    cnn = get_model("cnn", (28, 28, 1), 62)
    # conv 3x3x1x32, conv 3x3x32x64 (VALID: 28 -> 26 -> 24), pool -> 12x12x64, dense 128, dense 62
    expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + dense_params(12 * 12 * 64, 128) + dense_params(128, 62)
    assert expected == 1_206_590
    assert num_params(cnn) == expected
    for name in ("logistic", "cifar_logistic"):
        model = get_model(name, (32, 32, 3), 100, input_dtype="uint8")
        assert num_params(model) == dense_params(32 * 32 * 3, 100)


def test_registered_names_and_option_checking():
    assert {"shakespeare_lstm", "stackoverflow_lstm", "stackoverflow_transformer", "resnet18_gn",
            "cifar_logistic"} <= set(MODEL_NAMES)
    # The train loop passes hidden and conv_impl to every factory: accepted.
    get_model("shakespeare_lstm", (80,), 90, input_dtype="int32", hidden=(200, 200), conv_impl="auto")
    get_model("resnet18_gn", (32, 32, 3), 100, hidden=(200, 200), conv_impl="xla")
    for name in ("shakespeare_lstm", "stackoverflow_lstm", "stackoverflow_transformer", "resnet18_gn",
                 "cifar_logistic"):
        with pytest.raises(TypeError, match="unexpected keyword"):
            get_model(name, (20,), 10, lstm_szie=3)
    with pytest.raises(ValueError, match="normalization"):
        get_model("resnet18_gn", (32, 32, 3), 100, normalization="imagenet")
    with pytest.raises(ValueError, match="conv_impl"):
        get_model("resnet18_gn", (32, 32, 3), 100, conv_impl="winograd")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        get_model("stackoverflow_transformer", (20,), 100, width=30, num_heads=4)
    # Options change the architecture.
    small = get_model("shakespeare_lstm", (80,), 90, input_dtype="int32", embed_dim=4, lstm_sizes=[16])
    assert num_params(small) == 90 * 4 + lstm_params(4, 16) + dense_params(16, 90)


# ---------------------------------------------------------------- numerics against independent references


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_lstm_language_model_matches_numpy_equations():
    module = LSTMLanguageModel(vocab_size=11, embed_dim=3, lstm_sizes=(5, 4), projection=0)
    tokens = np.random.default_rng(0).integers(0, 11, (2, 7)).astype(np.int32)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"]
    p = jax.tree.map(np.asarray, params)
    assert np.all(p["LSTM_0"]["bias"][5:10] == 1.0) and np.all(p["LSTM_0"]["bias"][:5] == 0.0)  # forget bias 1

    x = p["Embed_0"]["embedding"][tokens].astype(np.float64)
    for layer in ("LSTM_0", "LSTM_1"):
        wx, wh, b = p[layer]["input_kernel"], p[layer]["recurrent_kernel"], p[layer]["bias"]
        h_size = wh.shape[0]
        h = np.zeros((2, h_size))
        c = np.zeros((2, h_size))
        outs = []
        for t in range(tokens.shape[1]):
            z = x[:, t] @ wx + h @ wh + b
            i, f, g, o = (z[:, k * h_size:(k + 1) * h_size] for k in range(4))
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
    expected = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_transformer_is_causal():
    model = get_model("stackoverflow_transformer", (12,), 50, input_dtype="int32", width=32, num_heads=4,
                      mlp_dim=64)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    tokens = np.random.default_rng(1).integers(0, 50, (2, 12)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 7] = (changed[:, 7] + 1) % 50

    @jax.jit
    def outputs(params, tokens, changed):
        return (model.apply(params, tokens), model.apply(params, changed),
                model.apply(params, tokens, rng=jax.random.PRNGKey(1)),
                model.apply(params, tokens, rng=jax.random.PRNGKey(2)))

    a, b, d1, d2 = outputs(params, jnp.asarray(tokens), jnp.asarray(changed))
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)  # the past does not see the future
    assert not np.allclose(a[:, 7:], b[:, 7:])
    assert not np.allclose(d1, d2)  # dropout in training, drawn from the step's key
    assert not np.allclose(a, d1)


@pytest.mark.parametrize("size,kernel", [(32, 7), (15, 7)])
def test_strided_conv_patches_matches_lax_conv(size, kernel):
    kx, kk = jax.random.split(jax.random.PRNGKey(size))
    x = jax.random.normal(kx, (2, size, size + 1, 3))
    w = jax.random.normal(kk, (kernel, kernel, 3, 5))

    @jax.jit
    def compare(x, w):
        pairs = [(strided_conv2d(x, w, s, "patches"),
                  jax.lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
                 for s in (1, 2)]
        grads = [jax.grad(lambda w: jnp.sum(jnp.sin(strided_conv2d(x, w, 2, impl))))(w) for impl in ("patches", "xla")]
        return pairs, grads

    pairs, grads = compare(x, w)
    for got, ref in pairs:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size", [16, 15])
def test_max_pool_same_matches_reduce_window(size):
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size + 3, 4))
    got, ref = jax.jit(lambda x: (max_pool_same(x, 3, 2), jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")))(x)
    np.testing.assert_array_equal(got, ref)


def test_image_normalization_of_uint8():
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3)).astype(np.uint8)
    expected = (images / 255.0 - np.array(CIFAR100_MEAN)) / np.array(CIFAR100_STD)
    flat = images.reshape(3, -1).astype(np.float64)
    std = np.maximum(flat.std(1), 1 / np.sqrt(flat.shape[1]))
    per_image = ((flat - flat.mean(1, keepdims=True)) / std[:, None]).reshape(images.shape)
    from_uint8, from_float, standardized = jax.jit(lambda u, f: (
        normalize_images(u, "dataset"), normalize_images(f, "dataset"), normalize_images(u, "per_image")))(
        jnp.asarray(images), jnp.asarray(images / 255.0, jnp.float32))
    np.testing.assert_allclose(from_uint8, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_float, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(standardized, per_image, rtol=1e-4, atol=1e-4)
    # The plain logistic model runs on uint8 images too.
    model = get_model("logistic", (4, 5, 3), 7, input_dtype="uint8")
    logits = jax.jit(model.apply)(jax.jit(model.init)(jax.random.PRNGKey(0)), jnp.asarray(images))
    assert logits.shape == (3, 7) and bool(jnp.isfinite(logits).all())


# ---------------------------------------------------------------- FedAvg rounds through the library


class ArraySource:
    """Clients held in memory with the reader's interface, any feature shapes and dtypes."""

    def __init__(self, clients):
        self.clients = clients
        first = clients[0]
        self.schema = {k: FeatureSpec(v.dtype.name, v.shape[1:]) for k, v in first.items()}

    def client_sizes(self, split):
        return np.array([len(c["y"]) for c in self.clients], np.int64)

    def get_client(self, split, client):
        return self.clients[int(client)]


def next_token_clients(num_clients, rows, length, vocab, rng):
    """Sequences counting up (mod a small alphabet above the special ids): the next token is learnable.

    Rows of the last client end in PAD (0) targets, which the loss must ignore.
    """
    clients = []
    for c in range(num_clients):
        start = rng.integers(0, 20, rows)
        seq = 3 + (start[:, None] + np.arange(length + 1)[None, :]) % 20
        x, y = seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)
        if c == num_clients - 1:
            x[:, -3:], y[:, -3:] = 0, 0
        clients.append({"x": x, "y": y})
    return clients


def run_rounds(model, source, *, rounds, cohort, batch_size, client_lr, server=("sgd", 1.0)):
    """Train losses of each round (FedAvg, one device)."""
    algorithm = FedAvg(model, make_optimizer("sgd", client_lr), make_optimizer(server[0], server[1]))
    mesh = make_mesh(1)
    pipeline = CohortPipeline(source, "train", ("x", "y"), seed=0, cohort_size=cohort,
                              batching=ClientBatching(batch_size), num_devices=1, data_threads=0)
    round_fn = build_train_round(algorithm, mesh, seed=0)
    state = jax.jit(algorithm.init)(jax.random.PRNGKey(0))
    iterator = pipeline.iterator(rounds)
    losses = []
    for _ in range(rounds):
        state, stats = round_fn(state, shard_batch(next(iterator)["batch"], mesh))
        losses.append(float(stats["metrics"].compute()["loss"]))
    assert int(state.round) == rounds
    return losses


@pytest.mark.parametrize("name,length,vocab,batch_size,client_lr,max_ratio", [
    # Reddi et al.: batch 4, client lr 10^0; about 3 s, on CI (slow) with the others
    pytest.param("shakespeare_lstm", 80, 90, 4, 1.0, 0.85, marks=pytest.mark.slow),
    # batch 16 as in Reddi et al.; 10,004 output classes start slowly, so a smaller drop is asked for
    # slow (20-30 s on 2 cores): the default run keeps under ~10 minutes; CI runs it
    pytest.param("stackoverflow_lstm", 20, 10_004, 16, 1.0, 0.97, marks=pytest.mark.slow),
    # Our own model (not from the papers; its causality is tested above): slow, to keep this file short.
    pytest.param("stackoverflow_transformer", 20, 10_004, 8, 0.1, 0.75, marks=pytest.mark.slow),
])
def test_fedavg_rounds_lower_the_loss_of_language_models(name, length, vocab, batch_size, client_lr, max_ratio):
    rng = np.random.default_rng(0)
    source = ArraySource(next_token_clients(3, 2 * batch_size, length, vocab, rng))
    model = get_model(name, (length,), vocab, input_dtype="int32", loss_mask_ids=(0,),
                      accuracy_mask_ids=(0, 1, 2, vocab - 1))
    # Every client trains every round, so the rounds' train losses are comparable.
    losses = run_rounds(model, source, rounds=4, cohort=3, batch_size=batch_size, client_lr=client_lr)
    assert all(np.isfinite(losses))
    assert losses[-1] < max_ratio * losses[0], losses  # train losses of the first and the last round


@pytest.mark.slow
def test_resnet18_gn_fedavg_rounds_lower_the_loss_and_conv_impls_agree():
    """Memorising 4 clients x 4 uint8 images; also im2col vs lax.conv on the whole network."""
    rng = np.random.default_rng(0)
    clients = [{"x": rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8),
                "y": rng.integers(0, 100, 4).astype(np.int32)} for _ in range(4)]
    model = get_model("resnet18_gn", (32, 32, 3), 100, input_dtype="uint8")
    losses = run_rounds(model, ArraySource(clients), rounds=5, cohort=4, batch_size=4, client_lr=10 ** -1.5)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.85 * losses[0], losses

    params = jax.jit(model.init)(jax.random.PRNGKey(1))
    x = jnp.asarray(clients[0]["x"][:2])
    xla = get_model("resnet18_gn", (32, 32, 3), 100, input_dtype="uint8", conv_impl="xla")
    patches = get_model("resnet18_gn", (32, 32, 3), 100, input_dtype="uint8", conv_impl="patches")
    np.testing.assert_allclose(jax.jit(patches.apply)(params, x), jax.jit(xla.apply)(params, x),
                               rtol=1e-3, atol=1e-4)
