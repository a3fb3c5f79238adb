"""DP-FedAvg (McMahan et al., 2018) on the embedded digits with Poisson-sampled cohorts.

Each client is included with probability q = clients_per_round / N (expected cohort 20 of
100), its delta clipped to L2 norm 0.5, Gaussian noise z * C on the sum, fixed denominator
qN; the RDP accountant logs epsilon(delta) every round (metrics dp_epsilon, dp_delta).
With 100 clients the privacy guarantee is weak; the config shows the mechanics.

    fedstream train digits_dp_fedavg --workdir checkpoints/digits_dp
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """The digits config with DP-FedAvg and Poisson sampling."""
    c = digits_fedavg.get_config()
    c.clients_per_round = 20
    c.sampling = "poisson"
    c.aggregation = "uniform"
    c.algorithm.name = "dp_fedavg"
    c.algorithm.options = ml_collections.ConfigDict({"clip_norm": 0.5, "noise_multiplier": 0.3,
                                                     "accountant": "rdp"})
    return c
