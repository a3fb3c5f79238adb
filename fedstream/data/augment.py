"""Per-client data augmentation in the input pipeline (host side, NumPy).

An augmentation maps one client's features `{name: array [n, ...]}` and a
NumPy Generator to augmented features of the same shapes and dtypes. The
cohort pipeline seeds the generator from (seed, round, client), so augmented
rounds are as reproducible, and as resumable, as everything else; each
example gets one augmentation per round (shared by its local epochs).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

Augmentation = Callable[[Mapping[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


def random_crop_flip(features: Mapping[str, np.ndarray], rng: np.random.Generator, key: str = "x",
                     pad: int = 4) -> dict[str, np.ndarray]:
    """The standard CIFAR augmentation: zero-pad by `pad` pixels, random crop back, random horizontal flip.

    `features[key]` is `[n, height, width, channels]`; other features pass through.
    """
    images = np.asarray(features[key])
    n, h, w = images.shape[:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    rows = dy[:, None] + np.arange(h)[None, :]  # [n, h]
    cols = dx[:, None] + np.arange(w)[None, :]  # [n, w]
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return {**features, key: out}


AUGMENTATIONS: dict[str, Augmentation] = {
    "crop_flip": random_crop_flip,
}


def get_augmentation(name: str) -> Augmentation | None:
    """The augmentation registered as `name`; '' means none."""
    if not name:
        return None
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r} (config key data.augment); known: "
                         f"{', '.join(sorted(AUGMENTATIONS))}")
    return AUGMENTATIONS[name]

