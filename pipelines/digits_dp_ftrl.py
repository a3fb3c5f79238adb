"""DP-FTRL (Kairouz et al., 2021) on the embedded digits: no sampling, each client once per epoch.

Each epoch shuffles the 100 clients and cuts them into 5 rounds of 20 (`sampling = "epochs"`),
so a client trains at most once per epoch, in an order it does not choose. Each update is
clipped to L2 norm 0.5, the server sums them and releases the prefix sums of its tree through
binary tree aggregation (Gaussian noise z * C on every tree node), and runs FTRL with server
momentum 0.9 on the noisy prefix means; the tree (and FTRL's starting point and momentum)
restarts every epoch. The RDP accountant logs epsilon(delta) every round (metrics dp_epsilon,
dp_delta; tree-aggregation events, no amplification). With 100 clients the guarantee is weak;
the config shows the mechanics and runs in about a minute on 2 CPU cores.

    fedstream train digits_dp_ftrl --workdir checkpoints/digits_dp_ftrl
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """The digits config with DP-FTRL over epochs of shuffled clients."""
    c = digits_fedavg.get_config()
    c.num_rounds = 100  # 20 epochs of 5 rounds
    c.clients_per_round = 20
    c.sampling = "epochs"
    c.aggregation = "uniform"
    c.algorithm.name = "dp_ftrl"
    c.algorithm.options = ml_collections.ConfigDict({
        "clip_norm": 0.5, "noise_multiplier": 1.0, "server_learning_rate": 0.5, "server_momentum": 0.9,
        "restart_every": 0,  # 0 = every epoch
    })
    return c
