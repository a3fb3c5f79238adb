"""MimeLite (Karimireddy et al., 2021) on Synthetic(1, 1).

The setup of `synthetic_fedprox_setup` (Synthetic(1, 1), logistic regression,
10 of 30 devices per round, batch 10, 20 local epochs, client SGD 0.01, 200
rounds) with MimeLite mimicking SGD with momentum 0.9 (no control variate);
the server step is SGD with `server_learning_rate`, the `server` section is
unused. One of the pipelines of the algorithm comparison:

    fedstream train synthetic_mimelite --workdir checkpoints/synthetic_mimelite
"""

import ml_collections

from fedstream.pipelines import synthetic_fedprox_setup


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config."""
    c = synthetic_fedprox_setup.get_config()
    c.algorithm.name = "mimelite"
    c.client.momentum = 0.9
    c.algorithm.options.server_learning_rate = 1.0
    c.algorithm.options.client_delta_clip_norm = 0.0  # 0 = no clipping
    return c
