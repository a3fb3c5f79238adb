"""AgnosticFedAvg (Ro et al., 2021) on Synthetic(1, 1) with 2 domains.

The setup of `synthetic_fedprox_setup` (Synthetic(1, 1), logistic regression,
10 of 30 devices per round, batch 10, 20 local epochs, client SGD 0.01, 200
rounds) with AgnosticFedAvg over 2 domains, domain weights by exponentiated
gradient (learning rate 0.1, not tuned). One of the pipelines of the algorithm
comparison:

    fedstream train synthetic_agnostic_fedavg --workdir checkpoints/synthetic_agnostic_fedavg

Needs an int32 `domain_id` feature in the dataset (values 0 and 1) and the
train loop loading the algorithm's `extra_features`.
"""

import ml_collections

from fedstream.pipelines import synthetic_fedprox_setup


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config."""
    c = synthetic_fedprox_setup.get_config()
    c.algorithm.name = "agnostic_fedavg"
    c.algorithm.options.init_domain_weights = (0.5, 0.5)
    c.algorithm.options.domain_learning_rate = 0.1
    c.algorithm.options.domain_algorithm = "eg"
    c.algorithm.options.domain_window_size = 1
    return c
