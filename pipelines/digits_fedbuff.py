"""FedBuff on the embedded 8x8 digits, on the simulated clock (heavy-tailed device speeds).

Nguyen et al. (AISTATS 2022): 30 clients train at once, each from the model
current when it started; the server steps after every K = 10 updates, each
scaled by 1/sqrt(1 + staleness). A round is one server step; metrics.jsonl
carries `simulated_time`, `staleness_mean` and `staleness_max`.

    fedstream train digits_fedbuff --workdir checkpoints/digits_fedbuff
    fedstream plot checkpoints/digits_fedbuff --x simulated_time

The clock (config keys clock.*, docs/simulated_clock.md) is the one
`benchmarks/fedbuff_vs_sync.py` compares against synchronous FedAvg with
over-selection under.
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config: digits_fedavg with FedBuff on the simulated clock."""
    c = digits_fedavg.get_config()
    c.num_rounds = 300  # server steps
    c.clients_per_round = 10  # K: updates per server step

    c.algorithm.name = "fedbuff"
    c.algorithm.options.concurrency = 30  # clients training at the same time
    c.algorithm.options.max_staleness = 20  # staler updates are dropped (the server keeps 21 versions)
    c.algorithm.options.staleness_exponent = 0.5  # s(tau) = (1 + tau)^-0.5, the paper's

    c.clock.enabled = True
    c.clock.seconds_per_example = 0.5  # median compute seconds per example processed
    c.clock.speed_distribution = "lognormal"
    c.clock.speed_sigma = 1.0  # heavy-tailed device speeds: the slowest decile ~3.6x the median
    c.clock.network_seconds = 5.0

    c.eval.every = 10
    return c
