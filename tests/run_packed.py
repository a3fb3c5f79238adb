"""FedAvg rounds of softmax regression on clients of very different sizes, packed onto N devices.

Used by test_fedavg_reference.py on meshes of 1 and 4 of the session's devices.
"""

import jax
import numpy as np

from fedstream.algorithms.fedavg import FedAvg, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource

# One client far larger than the rest, several smaller than a batch, one empty.
SIZES = [1, 2, 310, 3, 0, 150, 5, 1, 80, 2, 4, 6, 40, 1, 9, 3]
SEED, ROUNDS, COHORT, BATCH, CLIENT_LR = 11, 3, 12, 4, 0.2


def run(num_devices: int) -> dict[str, np.ndarray]:
    """Final (`W`, `b`) and initial (`w0`, `b0`) params and each round's padding waste."""
    source = InMemorySource(SIZES, input_shape=(4, 3, 1), num_classes=5, seed=2)
    algorithm = FedAvg(get_model("logistic", (4, 3, 1), 5), make_optimizer("sgd", CLIENT_LR),
                       make_optimizer("sgd", 1.0))
    mesh = make_mesh(num_devices)
    pipeline = CohortPipeline(source, "train", ("x", "y"), seed=SEED, cohort_size=COHORT,
                              batching=ClientBatching(BATCH), num_devices=num_devices, data_threads=0)
    round_fn = build_train_round(algorithm, mesh, seed=SEED)
    state = algorithm.init(jax.random.PRNGKey(0))
    w0, b0 = (np.asarray(state.params["Dense_0"][k]) for k in ("kernel", "bias"))
    state = replicate(state, mesh)
    iterator = pipeline.iterator(ROUNDS)
    waste = []
    for _ in range(ROUNDS):
        element = next(iterator)
        waste.append(element["padding_waste"])
        state, _ = round_fn(state, shard_batch(element["batch"], mesh))
    return {"W": np.asarray(state.params["Dense_0"]["kernel"]), "b": np.asarray(state.params["Dense_0"]["bias"]),
            "w0": w0, "b0": b0, "waste": np.array(waste)}
