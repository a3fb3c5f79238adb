"""FedAvg on Synthetic(1, 1) in the setup of the FedProx paper (Li et al., 2020).

Multinomial logistic regression, 30 devices, 10 devices per round, batch 10,
20 local epochs, client SGD learning rate 0.01, 200 rounds (FedProx §5.1).

    fedstream train synthetic_fedprox_setup --workdir checkpoints/synthetic_1_1
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config (the digits config with FedProx's settings)."""
    c = digits_fedavg.get_config()
    c.num_rounds = 200
    c.clients_per_round = 10
    c.data.path = "data/synthetic_1_1"
    c.data.recipe = "synthetic"  # defaults: alpha = beta = 1, 30 devices
    c.model.name = "logistic"
    c.model.num_classes = 10
    c.client.learning_rate = 0.01
    c.client.batch_size = 10
    c.client.epochs = 20
    c.eval.every = 20
    return c
