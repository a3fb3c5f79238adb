"""FedAdam on Federated CIFAR-100 with ResNet-18 (GroupNorm), the setup of Reddi et al. (2021).

Source: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv
2003.00295), task "CIFAR-100"; hyperparameters from google-research/federated
`optimization/docs/hyperparameters.md`, model from its
`utils/models/resnet_models.py` (see fedstream/models/vision.py):

- data: TFF's Federated CIFAR-100, 500 training clients of 100 images
  (Pachinko Allocation), uint8 32x32x3 (recipe `cifar100`);
- model: `resnet18_gn`, ResNet-18 v2 with GroupNorm (2 groups) instead of
  BatchNorm (11,227,812 parameters), per-image standardisation inside the
  model as TFF's `tf.image.per_image_standardization`;
- 4,000 rounds, 10 clients per round, 1 local epoch, batch 20;
- client SGD lr 10^-1.5; server Adam lr 10^0 = 1, b1 0.9, b2 0.999, eps 10^-1;
- augmentation: random crop + horizontal flip, fresh per (round, client).

Target: about 52.5% test accuracy for FedAdam (52.4% FedYogi, 44.7% FedAvg;
Reddi et al. Table 2, figures quoted from memory of the paper, not checked
against it here).

Deviation: the paper's pipeline randomly crops training images to 24x24
(centre crop at test time); `data.augment = 'crop_flip'` pads by 4 and crops
back to 32x32, and the test images stay 32x32. The ResNet's feature maps are
then 8x8 instead of 6x6 (~1.8x the compute per image).

On 2 CPU cores a round takes minutes (benchmarks/standard_setups.py); this
setup wants an accelerator.

    fedstream preprocess cifar100 --output data/cifar100
    fedstream train cifar100_resnet_fedadam --workdir checkpoints/cifar100_resnet_fedadam
"""

import ml_collections

from fedstream.pipelines import digits_fedavg


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config (the digits config with Reddi et al.'s CIFAR-100 settings)."""
    c = digits_fedavg.get_config()
    c.num_rounds = 4000
    c.clients_per_round = 10
    c.data.path = "data/cifar100"
    c.data.recipe = "cifar100"
    c.data.augment = "crop_flip"
    c.model.name = "resnet18_gn"
    c.model.num_classes = 100
    c.model.options.normalization = "per_image"
    c.client.optimizer = "sgd"
    c.client.learning_rate = 10 ** -1.5
    c.client.batch_size = 20
    c.client.epochs = 1
    c.server.optimizer = "adam"
    c.server.learning_rate = 1.0
    c.server.b1 = 0.9
    c.server.b2 = 0.999
    c.server.eps = 0.1
    c.eval.every = 100
    return c
