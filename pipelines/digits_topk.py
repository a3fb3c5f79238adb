"""FedAvg with top-k sparsified client updates and error feedback, on the embedded digits.

Each client sends the 5% largest-magnitude coordinates of (delta + its residual) and keeps the
rest as its residual for the next time it is sampled (in the client-state store); bits sent
per client are logged (bits_sent, bits_per_client).

    fedstream train digits_topk --workdir checkpoints/digits_topk
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """The digits config with top-k compression and error feedback."""
    c = digits_fedavg.get_config()
    c.algorithm.name = "compressed_fedavg"
    c.algorithm.options = ml_collections.ConfigDict({"compression": "topk", "topk_fraction": 0.05,
                                                     "error_feedback": True})
    return c
