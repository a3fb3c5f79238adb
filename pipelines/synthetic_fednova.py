"""FedNova (Wang et al., 2020) on Synthetic(1, 1).

The setup of `synthetic_fedprox_setup` (Synthetic(1, 1), logistic regression,
10 of 30 devices per round, batch 10, 20 local epochs, client SGD 0.01, 200
rounds) with FedNova's normalized averaging: with 20 epochs of batch 10 the
devices' local step counts differ by up to two orders of magnitude (their
sizes are log-normal). One of the pipelines of the algorithm comparison:

    fedstream train synthetic_fednova --workdir checkpoints/synthetic_fednova
"""

import ml_collections

from fedstream.pipelines import synthetic_fedprox_setup


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config."""
    c = synthetic_fedprox_setup.get_config()
    c.algorithm.name = "fednova"
    return c
