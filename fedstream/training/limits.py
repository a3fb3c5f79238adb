"""Sizes checked against the dataset and the machine before a run allocates anything.

`validate_train_config` bounds every integer key on its own (int32, a uint32
seed, 2**24 examples a batch). What needs the dataset or the machine is here,
called once by `Simulation.__init__` (so `fedstream train` and the Python API
both get it) before the model is initialised or any client data is read:

- a `client.batch_size` larger than any client's examples of a round
  (its capped examples times `epochs`) is cut to that number; every client
  still takes exactly one step over the same examples, so results are those of
  the larger batch, without its padding (the config keeps the value given);
- `eval.batch_size` is cut the same way to the largest client of the split
  evaluated (`fit_eval_batch`, at each evaluation);
- a model whose parameters alone would not fit in the memory of the device
  that holds them is refused with the estimated bytes (from `jax.eval_shape`
  of the model's init: nothing is allocated).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from fedstream.config import ConfigError


def fit_batch_size(batch_size: int, client_sizes: Sequence[int] | np.ndarray, *, epochs: int = 1,
                   max_examples: int = 0) -> int:
    """`batch_size`, cut to the most examples any client trains on in a round (its capped size x `epochs`).

    A batch at least that large gives every client one step over all its
    examples; so does the cut one, with less padding. At least 1.
    """
    sizes = np.asarray(client_sizes, np.int64)
    largest = int(sizes.max()) if sizes.size else 0
    if max_examples:
        largest = min(largest, int(max_examples))
    return max(1, min(int(batch_size), largest * max(int(epochs), 1)))


def fit_eval_batch(batch_size: int, client_sizes: Sequence[int] | np.ndarray) -> int:
    """`eval.batch_size`, cut to the largest client of the split evaluated (at least 1)."""
    return fit_batch_size(batch_size, client_sizes)


def device_memory_bytes(device: Any = None) -> int | None:
    """Memory of `device` (default: this process's first device): an accelerator's limit, or the host's RAM
    for a CPU device; None when unknown."""
    import jax

    device = device if device is not None else jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def check_model_fits(param_bytes: int, model: Any = None, memory_bytes: int | None = None) -> None:
    """Refuses a model whose parameters alone (`param_bytes`, from `jax.eval_shape`) exceed the device's memory."""
    memory = device_memory_bytes() if memory_bytes is None else memory_bytes
    if memory is None or param_bytes <= memory:
        return
    classes = getattr(model, "num_classes", None)
    hint = f"; model.num_classes is {classes}" if isinstance(classes, int) else ""
    raise ConfigError(f"the model's parameters alone would need {param_bytes:,} bytes ({_human(param_bytes)}, "
                      f"estimated from their shapes{hint}), more than the {_human(memory)} of memory of the device "
                      "that holds them; lower model.num_classes or the model's size")


def check_run_sizes(settings: Any, dataset: Any, model: Any, param_bytes: int) -> int:
    """The checks of a `Simulation` that need its dataset and the machine; returns the train batch size to use.

    `settings` is the simulation's config-shaped settings (`client.*`,
    `data.train_split`). Raises ConfigError for a model that cannot fit.
    """
    check_model_fits(param_bytes, model)
    client = settings.client
    return fit_batch_size(int(client.batch_size), dataset.client_sizes(settings.data.train_split),
                          epochs=int(client.epochs), max_examples=int(client.max_examples))
