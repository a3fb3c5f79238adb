"""Rounds of dp_fedavg / compressed_fedavg on softmax regression over in-memory clients, on N devices.

Used by test_dp.py, test_compression.py and test_adaptive_clipping.py on meshes of 1 and 4 of the
session's devices. `run` returns the final params (`W`, `b`), the initial ones (`W0`, `b0`), the
per-round sums of the contributions' metrics (metric NAME as `logs/log_NAME`) and, with adaptive clipping,
the final clip norm (`clip_norm`).
"""

import jax
import numpy as np

from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.models import get_model
from fedstream.training.client_store import ClientStateStore
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource

# An empty client, clients smaller than a batch, and clients of many steps.
SIZES = [3, 40, 0, 7, 1, 25, 12, 2, 60, 9, 17, 5]
SEED, ROUNDS, BATCH, CLIENT_LR = 4, 3, 5, 0.2
INPUT_SHAPE, NUM_CLASSES = (3, 2, 1), 4

# Each case: algorithm and options, sampling, clients_per_round (the expected size under Poisson sampling),
# server SGD learning rate, uniform (True) or example weights.
CASES = {
    "dp_poisson": dict(algorithm="dp_fedavg", options={"clip_norm": 0.35, "noise_multiplier": 0.6},
                       sampling="poisson", cohort=5, server_lr=1.0, uniform=True),
    "dp_uniform": dict(algorithm="dp_fedavg", options={"clip_norm": 0.35, "noise_multiplier": 0.6},
                       sampling="uniform", cohort=6, server_lr=0.8, uniform=False),
    # Adaptive clipping (Andrew et al. 2021): C_0 = 0.35, fast enough to move C visibly in 3 rounds.
    "dp_adaptive_poisson": dict(algorithm="dp_fedavg",
                                options={"clip_norm": 0.35, "noise_multiplier": 0.6, "adaptive_clipping": True,
                                         "target_unclipped_quantile": 0.5, "clip_learning_rate": 0.5,
                                         "clipped_count_stddev": 1.5},
                                sampling="poisson", cohort=5, server_lr=1.0, uniform=True),
    "dp_adaptive_uniform": dict(algorithm="dp_fedavg",
                                options={"clip_norm": 0.35, "noise_multiplier": 0.6, "adaptive_clipping": True,
                                         "target_unclipped_quantile": 0.7, "clip_learning_rate": 0.5,
                                         "clipped_count_stddev": 1.5},
                                sampling="uniform", cohort=6, server_lr=0.8, uniform=False),
    "quantize_rotate": dict(algorithm="compressed_fedavg", options={"compression": "quantize", "bits": 2,
                                                                    "rotate": True},
                            sampling="uniform", cohort=6, server_lr=1.0, uniform=False),
    "quantize_norm": dict(algorithm="compressed_fedavg", options={"compression": "quantize", "bits": 3,
                                                                  "quantization_scale": "norm"},
                          sampling="uniform", cohort=6, server_lr=1.0, uniform=False),
    "drive": dict(algorithm="compressed_fedavg", options={"compression": "drive"}, sampling="uniform", cohort=6,
                  server_lr=1.0, uniform=False),
    "topk_ef": dict(algorithm="compressed_fedavg", options={"compression": "topk", "topk_fraction": 0.25},
                    sampling="poisson", cohort=6, server_lr=1.0, uniform=False),
}


def source() -> InMemorySource:
    return InMemorySource(SIZES, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=3)


def build(spec: dict):
    """The algorithm of a case, with the context the train loop would give it."""
    model = get_model("logistic", INPUT_SHAPE, NUM_CLASSES)
    context = {"population": len(SIZES), "sampling": spec["sampling"], "clients_per_round": spec["cohort"],
               "num_rounds": ROUNDS, "client_learning_rate": CLIENT_LR}
    return build_algorithm(spec["algorithm"], model, make_optimizer("sgd", CLIENT_LR),
                           make_optimizer("sgd", spec["server_lr"]), context=context, **spec["options"])


def run(spec: dict, num_devices: int, store_dir: str, rounds: int = ROUNDS, algorithm=None) -> dict[str, np.ndarray]:
    """`rounds` rounds of a case through the sharded runner (and the client-state store if stateful); `algorithm`:
    the case's algorithm built otherwise (default: `build(spec)`)."""
    algorithm = build(spec) if algorithm is None else algorithm
    mesh = make_mesh(num_devices)
    pipeline = CohortPipeline(source(), "train", ("x", "y"), seed=SEED, cohort_size=spec["cohort"],
                              batching=ClientBatching(BATCH), num_devices=num_devices, data_threads=0,
                              uniform_weights=spec["uniform"], sampling=spec["sampling"])
    state = algorithm.init(jax.random.PRNGKey(0))
    out = {"W0": np.asarray(state.params["Dense_0"]["kernel"]), "b0": np.asarray(state.params["Dense_0"]["bias"])}
    template = algorithm.client_state_template(state.params)
    store = ClientStateStore(store_dir, jax.tree.map(np.asarray, template), len(SIZES)) if template else None
    state = replicate(state, mesh)
    round_fn = build_train_round(algorithm, mesh, seed=SEED)
    iterator = pipeline.iterator(rounds)
    logs: dict[str, list[float]] = {}
    for r in range(rounds):
        batch = next(iterator)["batch"]
        if store is None:
            state, stats = round_fn(state, shard_batch(batch, mesh))
        else:
            clients = np.where(batch["slot_steps"] > 0, batch["slot_client"], -1)
            state, stats, new = round_fn(state, shard_batch(batch, mesh), shard_batch(store.read(clients), mesh))
            store.write(r + 1, clients, clients >= 0, jax.device_get(new))
        for name, value in jax.device_get(stats["logs"]).items():  # the summed Contribution.metrics
            logs.setdefault(f"log_{name}", []).append(float(value))
    assert int(state.round) == rounds
    out["W"] = np.asarray(state.params["Dense_0"]["kernel"])
    out["b"] = np.asarray(state.params["Dense_0"]["bias"])
    if isinstance(state.extra, dict) and "clip_norm" in state.extra:  # adaptive clipping's C_T
        out["clip_norm"] = np.asarray(state.extra["clip_norm"])
    out.update({f"logs/{k}": np.array(v) for k, v in logs.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The plain-NumPy side shared by the references of test_dp.py and test_compression.py
# ---------------------------------------------------------------------------------------------------------------

def flat(W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """theta = (b, W.ravel()) in float64: the order of `ravel_pytree` over {"Dense_0": {"bias", "kernel"}}."""
    return np.concatenate([np.asarray(b, np.float64), np.asarray(W, np.float64).ravel()])


def unflat(theta: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of theta."""
    nb = shape[1]
    return theta[nb:].reshape(shape), theta[:nb]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cohort_of(spec: dict, r: int) -> np.ndarray:
    """The round's sampled clients: the pipeline's definition (uniform, or Poisson with q = cohort / N)."""
    from fedstream.data.cohort import sample_cohort

    if spec["sampling"] == "poisson":
        return sample_cohort(SEED, r, len(SIZES), 0, "poisson", spec["cohort"] / len(SIZES))
    return sample_cohort(SEED, r, len(SIZES), spec["cohort"])


def client_updates(spec: dict, r: int, theta: np.ndarray,
                   shape: tuple[int, int]) -> list[tuple[int, np.ndarray, float]]:
    """(client, Delta_i, p_i) of round r's clients with data: local minibatch SGD on softmax regression in float64."""
    from fedstream.data.cohort import client_example_order

    data = source()
    out = []
    for c in cohort_of(spec, r):
        n = int(SIZES[c])
        if n == 0:
            continue
        x = data.get_client("train", c)["x"].reshape(n, -1).astype(np.float64)
        y = data.get_client("train", c)["y"]
        order = client_example_order(SEED, r, int(c), n, ClientBatching(BATCH)).reshape(-1, BATCH)
        t = theta.copy()
        for batch in order:
            idx = batch[batch >= 0]
            W, b = unflat(t, shape)
            p = softmax(x[idx] @ W + b)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            p /= len(idx)
            t = t - CLIENT_LR * np.concatenate([p.sum(0), (x[idx].T @ p).ravel()])
        out.append((int(c), t - theta, 1.0 if spec["uniform"] else float(n)))
    return out

