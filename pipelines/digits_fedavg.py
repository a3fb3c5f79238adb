"""FedAvg on the embedded 8x8 digits, 100 Dirichlet(0.5) label-skewed clients.

The README's default run: no download, a few minutes on 2 CPU cores.

    fedstream train digits_fedavg --workdir checkpoints/digits
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the experiment config."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_rounds = 200
    c.clients_per_round = 10
    c.sampling = "uniform"  # 'uniform' (clients_per_round clients) or 'poisson' (each client with rate q)
    c.sampling_rate = 0.0  # Poisson q; 0 = clients_per_round / N (clients_per_round = expected cohort size)
    c.max_clients_per_round = 0  # Poisson slots per round (cap); 0 = smallest k with P(size > k) <= 1e-9
    c.aggregation = "example"  # 'example' (weight = examples) or 'uniform'
    c.nonfinite = "skip"  # a client update with NaN/Inf: 'skip' it (counted in the metrics) or 'stop' the run
    c.data_threads = 0  # reader threads; 0 = auto (a quarter of the CPU cores, at least 1)

    c.data = ml_collections.ConfigDict()
    c.data.path = "data/digits"  # preprocessed dataset directory
    c.data.recipe = "digits"  # preprocess it with this recipe if missing ('' = never)
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.augment = ""  # per-client augmentation in the pipeline ('' = none; 'crop_flip' for CIFAR)

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.hidden = (200, 200)
    c.model.num_classes = 10
    c.model.conv_impl = "auto"
    c.model.options = ml_collections.ConfigDict()  # extra keyword arguments of the model's factory
    c.model.loss_mask_ids = ()  # label ids scored by neither loss nor accuracy (e.g. PAD)
    c.model.accuracy_mask_ids = ()  # label ids left out of the accuracy (e.g. BOS, EOS, OOV)

    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.name = "fedavg"  # see `fedstream list`
    c.algorithm.options = ml_collections.ConfigDict()  # the algorithm's own knobs (e.g. proximal_weight)

    c.client = ml_collections.ConfigDict()
    c.client.optimizer = "sgd"
    c.client.learning_rate = 0.1
    c.client.momentum = 0.0
    c.client.batch_size = 10
    c.client.epochs = 1
    c.client.max_examples = 0  # 0 = no cap
    c.client.max_steps = 0  # 0 = no cap

    c.server = ml_collections.ConfigDict()
    c.server.optimizer = "sgd"  # sgd with learning_rate 1.0 is plain FedAvg
    c.server.learning_rate = 1.0
    c.server.momentum = 0.0
    c.server.b1 = 0.9
    c.server.b2 = 0.999
    c.server.eps = 1e-3

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 25  # rounds between evaluations on the test split (0 = only at the end)
    c.eval.batch_size = 64
    c.eval.chunk_clients = 256
    c.eval.finetune_steps = 0  # > 0: also evaluate after this many local fine-tuning steps per client

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1  # rounds between Orbax checkpoints
    c.checkpoint.keep = 3
    return c
