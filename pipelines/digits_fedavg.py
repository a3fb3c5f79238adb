"""FedAvg on the embedded 8x8 digits, 100 Dirichlet(0.5) label-skewed clients.

The README's default run: no download, a few minutes on 2 CPU cores.

    fedstream train digits_fedavg --workdir checkpoints/digits

Every other shipped pipeline starts from this one. It starts from
`fedstream.config.default_train_config()`, the schema of every key with its
default and a comment (`fedstream config digits_fedavg` prints the result).
"""

import ml_collections

from fedstream.config import default_train_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config: the defaults, on the digits with a 2x200 MLP."""
    c = default_train_config()
    c.num_rounds = 200
    c.clients_per_round = 10

    c.data.path = "data/digits"  # preprocessed dataset directory
    c.data.recipe = "digits"  # preprocess it with this recipe if missing ('' = never)

    c.model.name = "mlp"
    c.model.hidden = (200, 200)
    c.model.num_classes = 10

    c.algorithm.name = "fedavg"  # see `fedstream list algorithms`

    c.client.optimizer = "sgd"
    c.client.learning_rate = 0.1
    c.client.batch_size = 10

    c.server.optimizer = "sgd"  # sgd with learning_rate 1.0 is plain FedAvg
    c.server.learning_rate = 1.0

    c.eval.every = 25  # rounds between evaluations on the test split (0 = only at the end)
    return c
