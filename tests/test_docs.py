"""The code in the docs runs: docs/algorithms.md's user-defined algorithm trains through the real round."""

import pathlib
import re

import jax
import numpy as np

from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_user_algorithm_from_the_docs_clips_and_trains():
    namespace: dict = {}
    for block in python_blocks("algorithms.md"):
        exec(compile(block, "docs/algorithms.md", "exec"), namespace)  # noqa: S102 - our own docs
    source = InMemorySource([30, 12, 50, 7], input_shape=(3, 2, 1), num_classes=3, seed=1)
    model = get_model("logistic", (3, 2, 1), 3)
    mesh = make_mesh(1)
    deltas = {}
    for clip in (1e-3, 1e3):
        algorithm = build_algorithm("clipped_fedavg", model, make_optimizer("sgd", 0.5), make_optimizer("sgd", 1.0),
                                    clip_norm=clip)
        pipeline = CohortPipeline(source, "train", ("x", "y"), seed=0, cohort_size=4, batching=ClientBatching(5),
                                  num_devices=1, data_threads=0, uniform_weights=True)
        state0 = algorithm.init(jax.random.PRNGKey(0))
        state, _ = build_train_round(algorithm, mesh, seed=0)(replicate(state0, mesh),
                                                              shard_batch(next(pipeline.iterator(1))["batch"], mesh))
        flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])  # noqa: E731
        deltas[clip] = np.linalg.norm(flat(state.params) - flat(state0.params))
    assert deltas[1e-3] <= 1e-3 + 1e-7  # a mean of clipped deltas is within the clip norm
    assert deltas[1e3] > 10 * 1e-3  # without clipping the model moves much further
