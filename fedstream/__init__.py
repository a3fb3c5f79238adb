"""fedstream: federated-learning simulation on JAX as a streaming pipeline.

The research surface, in a few concepts:

    import fedstream as fs

    data = fs.FederatedDataset("data/emnist")                  # a preprocessed directory, or
    data = fs.InMemoryDataset.from_arrays({"train": {"x": x, "y": y, "client": owner}, ...})
    model = fs.Model.from_flax(MyModule(), input_shape=(28, 28, 1), num_classes=62)   # or fs.get_model("cnn", ...)
    algorithm = fs.FedAvg(model, optax.sgd(0.03), optax.adam(0.003))                 # or FedProx, Scaffold, ...
    sim = fs.Simulation(data, algorithm, clients_per_round=10, batch_size=20, workdir="runs/a")
    sim.run(1500)                                               # checkpointed every round; rerun to resume
    sim.evaluate(split="test")

Everything is also reachable from configs and the `fedstream` command, which
build the same objects (see `fedstream.training.train`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Imported on first use, so that `import fedstream` (and the
# command line's start-up) does not pay for JAX until something needs it.
_EXPORTS = {
    # datasets
    "FederatedDataset": "fedstream.data.reader",
    "InMemoryDataset": "fedstream.data.memory",
    "run_preprocess": "fedstream.data.preprocessing",
    # models
    "Model": "fedstream.models.core",
    "get_model": "fedstream.models.core",
    "register_model": "fedstream.models.core",
    # algorithms
    "Algorithm": "fedstream.algorithms.base",
    "Contribution": "fedstream.algorithms.base",
    "RoundTotal": "fedstream.algorithms.base",
    "FedAvg": "fedstream.algorithms.fedavg",
    "ServerState": "fedstream.algorithms.base",
    "make_optimizer": "fedstream.algorithms.fedavg",
    "FedProx": "fedstream.algorithms.fedprox",
    "FedNova": "fedstream.algorithms.fednova",
    "Scaffold": "fedstream.algorithms.scaffold",
    "Mime": "fedstream.algorithms.mime",
    "MimeLite": "fedstream.algorithms.mimelite",
    "AgnosticFedAvg": "fedstream.algorithms.agnostic_fedavg",
    "HypCluster": "fedstream.algorithms.hyp_cluster",
    "Ditto": "fedstream.algorithms.ditto",
    "APFL": "fedstream.algorithms.apfl",
    "FedBuff": "fedstream.algorithms.fedbuff",
    "Aggregated": "fedstream.algorithms.aggregators",
    "Aggregator": "fedstream.algorithms.aggregators",
    "Clip": "fedstream.algorithms.aggregators",
    "Compress": "fedstream.algorithms.aggregators",
    "GaussianNoise": "fedstream.algorithms.aggregators",
    "make_codec": "fedstream.algorithms.compression",
    "build_algorithm": "fedstream.algorithms",
    "register_algorithm": "fedstream.algorithms",
    "algorithm_options": "fedstream.algorithms",
    # running
    "Simulation": "fedstream.training.simulation",
    "Callback": "fedstream.training.simulation",
    "TrainResult": "fedstream.training.simulation",
    "train": "fedstream.training.train",
    "load_config": "fedstream.config",
    "default_train_config": "fedstream.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
