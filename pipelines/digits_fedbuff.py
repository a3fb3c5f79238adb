"""FedBuff on the embedded 8x8 digits, on the simulated clock of digits_fedavg_clock.

Nguyen et al. (AISTATS 2022): 30 clients train at once, each from the model
current when it started; the server steps after every K = 10 updates, each
scaled by 1/sqrt(1 + staleness). A round is one server step; metrics.jsonl
carries `simulated_time`, `staleness_mean`, `staleness_max` and the dropped
clients.

    fedstream train digits_fedbuff --workdir checkpoints/digits_fedbuff
    fedstream plot checkpoints/digits_fedbuff --output fedbuff.png --x simulated_time

The clock (device profile and availability, config keys clock.*,
docs/simulated_clock.md) is digits_fedavg_clock's, without its
over-selection and deadline (synchronous rounds only):
`benchmarks/fedbuff_vs_sync.py` compares the two (docs/fedbuff_vs_sync.md).
"""

import ml_collections

from fedstream.pipelines import digits_fedavg, digits_fedavg_clock


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config: digits_fedavg with FedBuff on digits_fedavg_clock's clock."""
    c = digits_fedavg.get_config()
    c.num_rounds = 600  # server steps
    c.clients_per_round = 10  # K: updates per server step

    c.algorithm.name = "fedbuff"
    c.algorithm.options.concurrency = 30  # clients training at the same time
    c.algorithm.options.max_staleness = 20  # staler updates are dropped (the server keeps 21 versions)
    c.algorithm.options.staleness_exponent = 0.5  # s(tau) = (1 + tau)^-0.5, the paper's

    c.clock = digits_fedavg_clock.get_config().clock  # the same devices and availability
    c.clock.over_selection = 1.0  # synchronous rounds only
    c.clock.deadline = 0.0

    c.eval.every = 20
    return c
