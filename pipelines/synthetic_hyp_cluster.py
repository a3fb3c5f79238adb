"""HypCluster (Mansour et al., 2020) on Synthetic(1, 1), 2 cluster models.

The setup of `synthetic_fedprox_setup` (Synthetic(1, 1), logistic regression,
10 of 30 devices per round, batch 10, 20 local epochs, client SGD 0.01, 200
rounds) with HypCluster: 2 cluster models (independent random inits), each
device training the one of lowest loss on its data. One of the pipelines of
the algorithm comparison:

    fedstream train synthetic_hyp_cluster --workdir checkpoints/synthetic_hyp_cluster

Evaluation needs each test device's cluster (see
fedstream.algorithms.hyp_cluster).
"""

import ml_collections

from fedstream.pipelines import synthetic_fedprox_setup


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config."""
    c = synthetic_fedprox_setup.get_config()
    c.algorithm.name = "hyp_cluster"
    c.algorithm.options.num_clusters = 2
    return c
