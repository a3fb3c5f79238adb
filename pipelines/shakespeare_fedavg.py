"""FedAvg on Federated Shakespeare (next character), the setup of Reddi et al. (2021).

Source: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv
2003.00295), task "Shakespeare", with its FedAvg hyperparameters from
google-research/federated `optimization/docs/hyperparameters.md`; the model
is McMahan et al. (2017)'s character LSTM:

- data: TFF's Federated Shakespeare, 715 speaking roles, sequences of 80
  character ids (recipe `shakespeare`, TFF's vocabulary: PAD 0, characters
  1..86, OOV 87, BOS 88, EOS 89);
- model: `shakespeare_lstm`, embedding 8 -> LSTM 256 -> LSTM 256 -> 90
  logits per position (820,522 parameters);
- 1,200 rounds, 10 clients per round, 1 local epoch, batch 4;
- client SGD lr 10^0 = 1; server SGD lr 10^0 = 1 (plain FedAvg);
- PAD targets are left out of the loss and the accuracy; the accuracy counts
  every other target, BOS/EOS/OOV included, as the paper's code
  (`MaskedCategoricalAccuracy(masked_tokens=[pad])`). FedJAX's
  `accuracy_in_vocab` also drops BOS, EOS and OOV: set
  `--config.model.accuracy_mask_ids='(87, 88, 89)'` for that.

Target: about 56.9% test accuracy for FedAvg (57.0% FedAdam, 57.2% FedYogi;
Reddi et al. Table 2, figures quoted from memory of the paper, not checked
against it here). The recipe's default `packing='joined'` (FedJAX-like
streams of BOS + snippet + EOS) differs from TFF's per-snippet padding
(`--config.packing=tff` in the recipe reproduces TFF's).

    fedstream preprocess shakespeare --output data/shakespeare --source shakespeare.sqlite.lzma
    fedstream train shakespeare_fedavg --workdir checkpoints/shakespeare_fedavg
"""

import ml_collections

from fedstream.pipelines import digits_fedavg

PAD, OOV, BOS, EOS = 0, 87, 88, 89  # preprocess/shakespeare.py (TFF's ids)


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config (the digits config with Reddi et al.'s Shakespeare settings)."""
    c = digits_fedavg.get_config()
    c.num_rounds = 1200
    c.clients_per_round = 10
    c.data.path = "data/shakespeare"
    c.data.recipe = "shakespeare"
    c.model.name = "shakespeare_lstm"
    c.model.num_classes = 90
    c.model.loss_mask_ids = (PAD,)
    c.model.accuracy_mask_ids = (PAD,)
    c.client.optimizer = "sgd"
    c.client.learning_rate = 1.0
    c.client.batch_size = 4
    c.client.epochs = 1
    c.server.optimizer = "sgd"
    c.server.learning_rate = 1.0
    c.eval.every = 100
    return c
