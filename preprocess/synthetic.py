"""Recipe `synthetic`: Synthetic(alpha, beta) of FedProx (Li et al., 2020), and its IID variant.

The generator of the FedProx repository (data/synthetic_*/generate_synthetic.py
and data/synthetic_iid/generate_iid.py), re-implemented from its equations
with a seeded numpy Generator (the original uses numpy's global RNG, so the
numbers differ; the distributions are the same). With K devices, d = 60
features and 10 classes:

    n_k = floor(LogNormal(mean=4, sigma=2)) + 50           examples of device k
    u_k ~ N(0, alpha^2),  B_k ~ N(0, beta^2)                 (alpha, beta are std devs, as in the code)
    v_k ~ N(B_k, 1) per feature                              feature mean of device k
    W_k ~ N(u_k, 1) [d x 10],  b_k ~ N(u_k, 1) [10]          device model
    x ~ N(v_k, Sigma),  Sigma = diag(j^-1.2), j = 1..d
    y = argmax(softmax(W_k^T x + b_k))

IID variant (`iid=True`): v_k = 0 and one W, b ~ N(0, 1) shared by all
devices (alpha and beta are unused). Draw order: sizes, then the priors
(u, B, v) or the shared model, then per device its model and examples.
Each device's examples are shuffled and the first floor(0.9 n_k) are `train`,
the rest `test`; device ids are `f_00000`, ... as in FedProx.
"""

from __future__ import annotations

from typing import Iterator

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema

SOURCE = "Synthetic(alpha, beta) generator of FedProx (Li et al., MLSys 2020), generated locally"
DIMENSION = 60
NUM_CLASSES = 10


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.alpha = 1.0
    c.beta = 1.0
    c.iid = False
    c.num_devices = 30
    c.train_fraction = 0.9
    c.seed = 0
    return c


def schema(config: ml_collections.ConfigDict) -> Schema:
    return {"x": FeatureSpec("float32", (DIMENSION,)), "y": FeatureSpec("int32", ())}


def feature_covariance_diagonal() -> np.ndarray:
    """Sigma_jj = j^-1.2 for j = 1..60."""
    return np.arange(1, DIMENSION + 1, dtype=np.float64) ** -1.2


def device_models(config: ml_collections.ConfigDict, rng: np.random.Generator):
    """Per-device (feature mean v_k, W_k, b_k, n_k), drawn in the generator's order (lazily for W, b)."""
    k = config.num_devices
    sizes = rng.lognormal(4, 2, k).astype(np.int64) + 50
    if config.iid:
        means = np.zeros((k, DIMENSION))
        shared = (rng.normal(0, 1, (DIMENSION, NUM_CLASSES)), rng.normal(0, 1, NUM_CLASSES))
        return sizes, means, lambda i: shared
    mean_w = rng.normal(0, config.alpha, k)
    b_prior = rng.normal(0, config.beta, k)
    means = np.stack([rng.normal(b_prior[i], 1, DIMENSION) for i in range(k)])
    return sizes, means, lambda i: (rng.normal(mean_w[i], 1, (DIMENSION, NUM_CLASSES)),
                                    rng.normal(mean_w[i], 1, NUM_CLASSES))


def label(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = argmax softmax(x W + b) (softmax is monotone, so argmax of the logits)."""
    return np.argmax(x @ w + b, axis=1).astype(np.int32)


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    if config.num_devices < 1:
        raise ValueError(f"config.num_devices must be >= 1, got {config.num_devices}")
    rng = np.random.default_rng(config.seed)
    sizes, means, model_of = device_models(config, rng)
    std = np.sqrt(feature_covariance_diagonal())
    for i in range(config.num_devices):
        w, b = model_of(i)
        x = means[i] + rng.standard_normal((int(sizes[i]), DIMENSION)) * std
        y = label(x, w, b)
        order = rng.permutation(len(y))
        cut = int(config.train_fraction * len(y))
        device = f"f_{i:05d}"
        yield "train", device, {"x": x[order[:cut]].astype(np.float32), "y": y[order[:cut]]}
        yield "test", device, {"x": x[order[cut:]].astype(np.float32), "y": y[order[cut:]]}
