"""FedAvg on the embedded digits on a simulated clock: heavy-tailed devices, diurnal availability,
over-selection and a deadline (docs/simulated_clock.md).

Each round samples ceil(10 x 1.3) = 13 of the clients online at that moment and keeps the
first 10 that finish within 30 simulated seconds; the others are dropped. A client's time is
its examples x 0.5 s x its slowness (lognormal, sigma 1: a tenth of the clients are 3.6x
slower than the median) plus a network time of about 10 s. Each client is online half of
the day, in one of 24 time zones. metrics.jsonl carries `simulated_time` (the clock at the
round's end), `simulated_round_seconds` and the dropped clients; compare runs on the clock
with `fedstream plot ... --x simulated_time`. Without over-selection
(--config.clock.over_selection=1 --config.clock.deadline=0) a round waits for its slowest
client and takes about twice as long on this clock.

    fedstream train digits_fedavg_clock --workdir checkpoints/digits_clock
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """The digits FedAvg config with rounds on the simulated clock."""
    c = digits_fedavg.get_config()
    c.clock.enabled = True
    c.clock.over_selection = 1.3  # sample 13 online clients, keep the first 10 to finish
    c.clock.deadline = 30.0  # simulated seconds; later clients are dropped
    c.clock.seconds_per_example = 0.5
    c.clock.speed_distribution = "lognormal"
    c.clock.speed_sigma = 1.0
    c.clock.network_seconds = 10.0
    c.clock.network_sigma = 0.5
    c.clock.availability = "diurnal"
    c.clock.day_seconds = 86400.0
    c.clock.available_fraction = 0.5
    c.clock.time_zones = 24
    return c
