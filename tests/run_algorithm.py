"""Rounds of a registered algorithm on softmax regression over in-memory clients, on N devices.

Used by test_algorithms.py on meshes of 1 and 4 of the session's devices. `run` returns the final
params (`W`, `b`; a leading cluster axis for HypCluster), the initial ones (`W0`, `b0`) and each
array of `ServerState.extra`.
"""

import jax
import numpy as np

from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.data.format import FeatureSpec
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource

# Clients smaller than a batch and clients of many steps: FedNova's tau_i differ. With this seed every
# round packs to one stream length on 1 and on 4 devices (one compilation per run), and the empty
# client 2 is never sampled (empty clients are covered by test_fedavg_reference and test_rounds).
SIZES = [3, 40, 0, 7, 1, 25, 12, 2, 60, 9, 17, 5]
SEED, COHORT, ROUNDS = 146, 7, 3
INPUT_SHAPE, NUM_CLASSES, NUM_DOMAINS = (3, 2, 1), 4, 2
FEATURES = ("x", "y", "domain_id")

# Each case: algorithm name and options, client and server optimizers as make_optimizer(name, lr, **kw), batching.
CASES = {
    "fedprox": dict(algorithm="fedprox", options={"proximal_weight": 0.5}, client=("sgd", 0.2, {}),
                    server=("sgd", 1.0, {}), batching=ClientBatching(5, epochs=2)),
    "fednova": dict(algorithm="fednova", options={}, client=("sgd", 0.1, {"momentum": 0.5}),
                    server=("sgd", 0.9, {"momentum": 0.3}), batching=ClientBatching(5, epochs=2)),
    "mime": dict(algorithm="mime", options={"server_learning_rate": 0.8}, client=("sgd", 0.1, {"momentum": 0.9}),
                 server=("sgd", 1.0, {}), batching=ClientBatching(5)),
    "mimelite": dict(algorithm="mimelite", options={"server_learning_rate": 1.0, "client_delta_clip_norm": 0.1},
                     client=("adam", 0.02, {"eps": 1e-3}), server=("sgd", 1.0, {}),
                     batching=ClientBatching(4, max_steps=5)),
    "agnostic_fedavg": dict(algorithm="agnostic_fedavg",
                            options={"init_domain_weights": (0.3, 0.7), "domain_learning_rate": 0.5,
                                     "domain_window_size": 2, "init_domain_window": (1.0, 2.0)},
                            client=("sgd", 0.2, {}), server=("sgd", 1.0, {}), batching=ClientBatching(5)),
    "hyp_cluster": dict(algorithm="hyp_cluster", options={"num_clusters": 2}, client=("sgd", 0.2, {}),
                        server=("adam", 0.05, {"eps": 1e-3}), batching=ClientBatching(5)),
}


class DomainSource(InMemorySource):
    """InMemorySource plus an int32 `domain_id` per example (odd clients mostly domain 1, even mostly 0).

    With `domains=1` every example is of domain 0.
    """

    def __init__(self, sizes=SIZES, seed=3, domains=NUM_DOMAINS):
        super().__init__(sizes, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=seed)
        self.schema = {**self.schema, "domain_id": FeatureSpec("int32", ())}
        rng = np.random.default_rng(seed + 100)
        for i, client in enumerate(self.clients):
            share = 0.85 if i % 2 else 0.15
            client["domain_id"] = ((rng.random(len(client["y"])) < share) & (domains > 1)).astype(np.int32)


def run(spec: dict, num_devices: int, rounds: int = ROUNDS, sizes=SIZES, init=None,
        lanes: int = 1) -> dict[str, np.ndarray]:
    """`rounds` rounds of `spec` through the sharded runner; final and initial params and `extra`.

    `init(algorithm)` gives the initial server state (default: `algorithm.init(PRNGKey(0))`).
    """
    model = get_model("logistic", INPUT_SHAPE, NUM_CLASSES)
    (cname, clr, ckw), (sname, slr, skw) = spec["client"], spec["server"]
    algorithm = build_algorithm(spec["algorithm"], model, make_optimizer(cname, clr, **ckw),
                                make_optimizer(sname, slr, **skw), **spec["options"])
    mesh = make_mesh(num_devices)
    source = DomainSource(sizes, domains=spec.get("domains", NUM_DOMAINS))
    pipeline = CohortPipeline(source, "train", FEATURES, seed=SEED, cohort_size=COHORT, batching=spec["batching"],
                              num_devices=num_devices, data_threads=0, lanes=lanes)
    state = init(algorithm) if init is not None else algorithm.init(jax.random.PRNGKey(0))
    out = {"W0": np.asarray(state.params["Dense_0"]["kernel"]), "b0": np.asarray(state.params["Dense_0"]["bias"])}
    state = replicate(state, mesh)
    round_fn = build_train_round(algorithm, mesh, seed=SEED, lanes=lanes)
    iterator = pipeline.iterator(rounds)
    for _ in range(rounds):
        state, _ = round_fn(state, shard_batch(next(iterator)["batch"], mesh))
    assert int(state.round) == rounds
    out["W"] = np.asarray(state.params["Dense_0"]["kernel"])
    out["b"] = np.asarray(state.params["Dense_0"]["bias"])
    for key, value in (state.extra or {}).items():
        out[key] = np.asarray(value)
    return out

