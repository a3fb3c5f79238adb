"""Recipe `synthetic`: Synthetic(alpha, beta) of FedProx (Li et al., MLSys 2020), and its IID variant.

Re-implemented from the equations of the FedProx repository's generators
(litian96/FedProx, data/synthetic_{0_0,0.5_0.5,1_1}/generate_synthetic.py and
data/synthetic_iid/generate_iid.py) with a seeded numpy Generator. The
original draws from numpy's global RNG without a seed, so the numbers differ;
the distributions are the same. With K devices (30), d = 60 features and 10
classes:

    n_k = floor(LogNormal(mean=4, sigma=2)) + 50            examples of device k
    u_k ~ N(0, alpha^2),  B_k ~ N(0, beta^2)                 alpha, beta are standard deviations,
                                                             as numpy's `scale` in the original
    v_k ~ N(B_k, 1), independently per feature               feature mean of device k
    W_k ~ N(u_k, 1) [d x 10],  b_k ~ N(u_k, 1) [10]          device model (the same u_k for both)
    x ~ N(v_k, Sigma),  Sigma = diag(j^-1.2), j = 1..d
    y = argmax softmax(x W_k + b_k) = argmax(x W_k + b_k)

IID variant (`iid=True`, generate_iid.py): v_k = 0 for every device and one
W ~ N(0, 1) [d x 10], b ~ N(0, 1) [10] shared by all devices; alpha and beta
are unused.

Draw order from `np.random.default_rng(seed)`: the K sizes; then (non-IID)
u [K], B [K] and v_1..v_K, or (IID) the shared W then b; then per device in
order: (non-IID) W_k then b_k, then its n_k x d standard normals (x = v_k +
sqrt(diag Sigma) * z, the same law as the original's multivariate_normal).
Labels are computed from x rounded to float32, as stored, so the stored data
are exactly consistent with the labelling function.

Each device's examples are shuffled (a separate stream, seed (seed, 1)) and
the first floor(train_fraction * n_k) (0.9, as in FedProx) go to `train`, the
rest to `test`. Device ids are `device_00`, `device_01`, ... (FedProx calls
them f_00000, ...) and are the same in both splits.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

from fedstream.data.format import FeatureSpec, Schema

SOURCE = ("Synthetic(alpha, beta) and Synthetic-IID of FedProx (Li et al., MLSys 2020; generator in "
          "github.com/litian96/FedProx, MIT), generated locally from a seed")
DIMENSION = 60
NUM_CLASSES = 10


def get_config() -> ml_collections.ConfigDict:
    """Synthetic(1, 1) over 30 devices by default; `iid=True` gives Synthetic-IID."""
    c = ml_collections.ConfigDict()
    c.alpha = 1.0
    c.beta = 1.0
    c.iid = False
    c.num_devices = 30
    c.train_fraction = 0.9
    c.seed = 0
    return c


def schema(config: ml_collections.ConfigDict) -> Schema:
    """`x` float32 (60,), `y` int32 label 0-9, `domain_id` int32: device i < K/2 -> 0, else 1.

    The two domains are not part of the FedProx paper; they let AgnosticFedAvg
    run on this dataset (the first and second half of the devices).
    """
    return {"x": FeatureSpec("float32", (DIMENSION,)), "y": FeatureSpec("int32", ()),
            "domain_id": FeatureSpec("int32", ())}


@dataclasses.dataclass(frozen=True)
class Device:
    """One device's generative parameters and examples (before the train/test split)."""

    mean: np.ndarray  # v_k, float64 [d]
    w: np.ndarray  # W_k, float64 [d, 10]
    b: np.ndarray  # b_k, float64 [10]
    x: np.ndarray  # float32 [n_k, d]
    y: np.ndarray  # int32 [n_k]


def _check(config: ml_collections.ConfigDict) -> None:
    if config.num_devices < 1:
        raise ValueError(f"config.num_devices must be >= 1, got {config.num_devices}")
    if config.alpha < 0 or config.beta < 0:
        raise ValueError(f"config.alpha and config.beta are standard deviations and must be >= 0, "
                         f"got {config.alpha} and {config.beta}")
    if not 0.0 < config.train_fraction <= 1.0:
        raise ValueError(f"config.train_fraction must be in (0, 1], got {config.train_fraction}")


def feature_covariance_diagonal() -> np.ndarray:
    """diag(Sigma): Sigma_jj = j^-1.2 for j = 1..60."""
    return np.arange(1, DIMENSION + 1, dtype=np.float64) ** -1.2


def device_sizes(config: ml_collections.ConfigDict) -> np.ndarray:
    """n_k = floor(LogNormal(4, 2)) + 50 per device: the first draw of the recipe's Generator."""
    return np.random.default_rng(config.seed).lognormal(4.0, 2.0, config.num_devices).astype(np.int64) + 50


def label(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = argmax softmax(x W + b); softmax is monotone, so the argmax of the logits (float64)."""
    return np.argmax(np.asarray(x, np.float64) @ w + b, axis=1).astype(np.int32)


def sample_devices(config: ml_collections.ConfigDict) -> Iterator[Device]:
    """Yields every device's parameters and examples, one device at a time (pure in config)."""
    _check(config)
    k = config.num_devices
    rng = np.random.default_rng(config.seed)
    sizes = rng.lognormal(4.0, 2.0, k).astype(np.int64) + 50
    if config.iid:
        means = np.zeros((k, DIMENSION))
        shared_w = rng.normal(0.0, 1.0, (DIMENSION, NUM_CLASSES))
        shared_b = rng.normal(0.0, 1.0, NUM_CLASSES)
    else:
        u = rng.normal(0.0, config.alpha, k)
        big_b = rng.normal(0.0, config.beta, k)
        means = np.stack([rng.normal(big_b[i], 1.0, DIMENSION) for i in range(k)])
    std = np.sqrt(feature_covariance_diagonal())
    for i in range(k):
        if config.iid:
            w, b = shared_w, shared_b
        else:
            w = rng.normal(u[i], 1.0, (DIMENSION, NUM_CLASSES))
            b = rng.normal(u[i], 1.0, NUM_CLASSES)
        x = (means[i] + std * rng.standard_normal((int(sizes[i]), DIMENSION))).astype(np.float32)
        yield Device(mean=means[i], w=w, b=b, x=x, y=label(x, w, b))


def device_id(i: int, num_devices: int) -> str:
    """`device_07`: zero-padded (at least 2 digits) so lexicographic order is numeric order."""
    return f"device_{i:0{max(len(str(num_devices - 1)), 2)}d}"


def generate(config: ml_collections.ConfigDict) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """Yields ('train', id, examples) then ('test', id, examples) per device."""
    shuffle = np.random.default_rng([config.seed, 1])
    for i, device in enumerate(sample_devices(config)):
        order = shuffle.permutation(len(device.y))
        cut = int(config.train_fraction * len(device.y))
        name = device_id(i, config.num_devices)
        domain = np.full(len(device.y), 0 if i < config.num_devices / 2 else 1, np.int32)
        yield "train", name, {"x": device.x[order[:cut]], "y": device.y[order[:cut]], "domain_id": domain[:cut]}
        yield "test", name, {"x": device.x[order[cut:]], "y": device.y[order[cut:]], "domain_id": domain[cut:]}


def expected_counts(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """All devices in both splits; floor(train_fraction * n_k) train examples per device."""
    _check(config)
    sizes = device_sizes(config)
    num_train = sum(int(config.train_fraction * int(n)) for n in sizes)
    return {"train": (config.num_devices, num_train), "test": (config.num_devices, int(sizes.sum()) - num_train)}
