"""Mime (Karimireddy et al., 2021) on Synthetic(1, 1).

The setup of `synthetic_fedprox_setup` (Synthetic(1, 1), logistic regression,
10 of 30 devices per round, batch 10, 20 local epochs, client SGD 0.01, 200
rounds) with Mime mimicking SGD with momentum 0.9 (the client optimizer is the
base optimizer; its state is kept on the server and frozen on clients); the
server step is SGD with `server_learning_rate`, the `server` section is
unused. One of the pipelines of the algorithm comparison:

    fedstream train synthetic_mime --workdir checkpoints/synthetic_mime
"""

import ml_collections

from fedstream.pipelines import synthetic_fedprox_setup


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config."""
    c = synthetic_fedprox_setup.get_config()
    c.algorithm.name = "mime"
    c.client.momentum = 0.9
    c.algorithm.options.server_learning_rate = 1.0
    return c
