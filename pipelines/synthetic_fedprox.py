"""FedProx (Li et al., 2020) on Synthetic(1, 1) with mu = 1.

The setup of `synthetic_fedprox_setup` (Synthetic(1, 1), logistic regression,
10 of 30 devices per round, batch 10, 20 local epochs, client SGD 0.01, 200
rounds) with FedProx's proximal term mu/2 ||w - w_server||^2, mu = 1. One of
the pipelines of the algorithm comparison:

    fedstream train synthetic_fedprox --workdir checkpoints/synthetic_fedprox
"""

import ml_collections

from fedstream.pipelines import synthetic_fedprox_setup


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config."""
    c = synthetic_fedprox_setup.get_config()
    c.algorithm.name = "fedprox"
    c.algorithm.options.proximal_weight = 1.0
    return c
