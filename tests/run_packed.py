"""FedAvg rounds of softmax regression on clients of very different sizes, packed onto N devices.

Used by test_fedavg_reference.py in a subprocess (the CPU device count must be
fixed before jax is imported):

    python tests/run_packed.py NUM_DEVICES OUT.npz
"""

import os
import sys

if __name__ == "__main__":  # the test imports this file for its constants
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
    sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedstream.algorithms.fedavg import FedAvg, make_optimizer  # noqa: E402
from fedstream.data.cohort import ClientBatching, CohortPipeline  # noqa: E402
from fedstream.models import get_model  # noqa: E402
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch  # noqa: E402
from support import InMemorySource  # noqa: E402

# One client far larger than the rest, several smaller than a batch, one empty.
SIZES = [1, 2, 310, 3, 0, 150, 5, 1, 80, 2, 4, 6, 40, 1, 9, 3]
SEED, ROUNDS, COHORT, BATCH, CLIENT_LR = 11, 3, 12, 4, 0.2


def main() -> None:
    num_devices, out = int(sys.argv[1]), sys.argv[2]
    source = InMemorySource(SIZES, input_shape=(4, 3, 1), num_classes=5, seed=2)
    algorithm = FedAvg(get_model("logistic", (4, 3, 1), 5), make_optimizer("sgd", CLIENT_LR),
                       make_optimizer("sgd", 1.0))
    mesh = make_mesh()
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
    np.savez(out, W=np.asarray(state.params["Dense_0"]["kernel"]), b=np.asarray(state.params["Dense_0"]["bias"]),
             w0=w0, b0=b0, waste=np.array(waste))


if __name__ == "__main__":
    main()
