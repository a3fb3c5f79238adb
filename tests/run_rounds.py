"""A few FedAdam rounds of the EMNIST CNN (with dropout) on in-memory clients, on a mesh of N devices.

Used by test_rounds.py for its device-count invariance check (the session
has 8 virtual CPU devices, see conftest.py).
"""

import jax
import numpy as np

from fedstream.algorithms.fedavg import FedAvg, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource


def run(num_devices: int) -> dict[str, np.ndarray]:
    """Final parameters (by key path), per-round losses and the change of the parameters' L1 norm."""
    sizes = np.random.default_rng(0).lognormal(3.0, 1.0, 40).astype(int)
    sizes[[3, 17]] = 0  # empty clients are skipped
    source = InMemorySource(sizes, input_shape=(10, 10, 1), num_classes=7, seed=0)
    model = get_model("cnn", (10, 10, 1), 7)
    algorithm = FedAvg(model, make_optimizer("sgd", 0.05), make_optimizer("adam", 0.01, eps=1e-4))
    mesh = make_mesh(num_devices)
    pipeline = CohortPipeline(source, "train", ("x", "y"), seed=5, cohort_size=7,
                              batching=ClientBatching(8, epochs=2, max_steps=12), num_devices=num_devices)
    round_fn = build_train_round(algorithm, mesh, seed=5)
    state = replicate(algorithm.init(jax.random.PRNGKey(1)), mesh)
    init_norm = sum(float(np.abs(np.asarray(leaf)).sum()) for leaf in jax.tree.leaves(state.params))
    iterator = pipeline.iterator(4)
    losses = []
    for _ in range(4):
        state, stats = round_fn(state, shard_batch(next(iterator)["batch"], mesh))
        losses.append(float(stats["metrics"].compute()["loss"]))
    leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    final_norm = sum(float(np.abs(leaf).sum()) for leaf in leaves.values())
    return {"losses": np.array(losses), "norm_change": np.array(final_norm - init_norm), **leaves}
