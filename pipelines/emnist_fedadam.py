"""FedAdam on Federated EMNIST-62 with the CNN, the setup of Reddi et al. (2021).

Source: Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan,
"Adaptive Federated Optimization", ICLR 2021 (arXiv 2003.00295), task "EMNIST
CR"; hyperparameters from google-research/federated
`optimization/docs/hyperparameters.md` (the paper's tuned values) and
FedJAX's `examples/emnist_fed_avg.py`, which uses the same ones:

- data: TFF's Federated EMNIST, 62 classes, 3,400 writers (recipe `emnist`;
  pixels as TFF stores them, 1.0 = background, as the paper's TFF pipeline);
- model: the EMNIST CNN (`cnn`: conv 32, conv 64, max-pool, dropout 0.25,
  dense 128, dropout 0.5; 1,206,590 parameters);
- 1,500 rounds, 10 clients per round, 1 local epoch, batch 20;
- client SGD lr 10^-1.5; server Adam lr 10^-2.5, b1 0.9, b2 0.999, eps 10^-4.

Target: about 85.6% test accuracy for FedAdam (Reddi et al. Table 2; the
figure is quoted from memory of the paper, not checked against it here).

    fedstream preprocess emnist --output data/emnist --source emnist_all.sqlite.lzma
    fedstream train emnist_fedadam --workdir checkpoints/emnist_fedadam
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config (the digits config with Reddi et al.'s EMNIST CR settings)."""
    c = digits_fedavg.get_config()
    c.num_rounds = 1500
    c.clients_per_round = 10
    c.data.path = "data/emnist"
    c.data.recipe = "emnist"  # 62 classes (only_digits=False)
    c.model.name = "cnn"
    c.model.num_classes = 62
    c.client.optimizer = "sgd"
    c.client.learning_rate = 10 ** -1.5
    c.client.batch_size = 20
    c.client.epochs = 1
    c.server.optimizer = "adam"
    c.server.learning_rate = 10 ** -2.5
    c.server.b1 = 0.9
    c.server.b2 = 0.999
    c.server.eps = 1e-4
    c.eval.every = 100
    return c
