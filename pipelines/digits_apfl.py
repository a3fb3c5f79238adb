"""APFL (Deng et al., 2020) on the embedded digits, 100 Dirichlet(0.5) label-skewed clients.

FedAvg trains the global model w; each client also keeps a personal model v_i and a mixing
weight alpha_i (both in the client-state store), learned on the loss of its personalized model
alpha_i v_i + (1 - alpha_i) w. Evaluations add `personal_*` (each test client scored with its
mix against the current w; clients never sampled on w) and the rounds log `apfl_alpha_mean`.

    fedstream train digits_apfl --workdir checkpoints/digits_apfl
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """The digits config with APFL: alpha_0 = 0.5, learned with the client learning rate."""
    c = digits_fedavg.get_config()
    c.algorithm.name = "apfl"
    c.algorithm.options = ml_collections.ConfigDict({"alpha_init": 0.5, "adaptive_alpha": True})
    return c
