"""FedAdam on Stack Overflow next-word prediction, the setup of Reddi et al. (2021).

Source: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv
2003.00295), task "Stack Overflow NWP"; hyperparameters from
google-research/federated `optimization/docs/hyperparameters.md`:

- data: TFF's Stack Overflow, 342,477 training users, sentences of 20 word
  ids (recipe `stackoverflow`, TFF's ids: PAD 0, words 1..10,000, OOV 10,001,
  BOS 10,002, EOS 10,003; 10,004 ids);
- model: `stackoverflow_lstm`, embedding 96 -> LSTM 670 -> dense 96 -> 10,004
  logits per position (4,050,748 parameters);
- 1,500 rounds, 50 clients per round, 1 local epoch, batch 16, at most 256
  sentences per client (the cap the project's issue and FedJAX's experiments use;
  the paper's code default `max_elements_per_user` is 1000:
  `--config.client.max_examples=1000`); a random subset per round;
- client SGD lr 10^-0.5; server Adam lr 10^-2, b1 0.9, b2 0.999, eps 10^-5;
- PAD targets are left out of the loss; the accuracy also leaves out OOV,
  BOS and EOS (the paper's code reports `accuracy_no_oov_or_eos`, besides
  `accuracy_with_oov` and `accuracy_no_oov`).

Target: about 25.2% test accuracy for FedAdam (Reddi et al. Table 2, quoted
from memory of the paper, not checked against it here; which of the code's
three accuracies the table shows is not verified either).

Evaluation: the paper validated on 10,000 random test sentences each round;
here evaluation covers every test client (16.6M sentences), so it runs only
at the end (`eval.every = 0`).

The small transformer instead of the LSTM:
`--config.model.name=stackoverflow_transformer` (2.97M parameters; not tuned).

    fedstream preprocess stackoverflow --output data/stackoverflow --config.splits=train,test
    fedstream train stackoverflow_nwp_fedadam --workdir checkpoints/stackoverflow_nwp_fedadam
"""

import ml_collections

from fedstream.pipelines import digits_fedavg

PAD, OOV, BOS, EOS = 0, 10_001, 10_002, 10_003  # preprocess/stackoverflow.py (TFF's ids, 10,000 words)


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config (the digits config with Reddi et al.'s Stack Overflow NWP settings)."""
    c = digits_fedavg.get_config()
    c.num_rounds = 1500
    c.clients_per_round = 50
    c.data.path = "data/stackoverflow"
    c.data.recipe = "stackoverflow"
    c.data.test_split = "test"
    c.model.name = "stackoverflow_lstm"
    c.model.num_classes = 10_004
    c.model.loss_mask_ids = (PAD,)
    c.model.accuracy_mask_ids = (PAD, OOV, BOS, EOS)
    c.client.optimizer = "sgd"
    c.client.learning_rate = 10 ** -0.5
    c.client.batch_size = 16
    c.client.epochs = 1
    c.client.max_examples = 256
    c.server.optimizer = "adam"
    c.server.learning_rate = 1e-2
    c.server.b1 = 0.9
    c.server.b2 = 0.999
    c.server.eps = 1e-5
    c.eval.every = 0
    c.eval.batch_size = 256
    return c
