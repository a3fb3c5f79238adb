"""Models: Flax modules wrapped with their per-example loss and metrics.

`get_model(name, ...)` returns a `Model`, the one object the round runner needs:
pure functions over a params pytree, so that clients can be scanned, vmapped
and sharded freely.

Registered: `logistic`, `mlp`, `cnn` (core.py); `shakespeare_lstm`,
`stackoverflow_lstm`, `stackoverflow_transformer` (text.py); `resnet18_gn`,
`cifar_logistic` (vision.py).
"""

from typing import Any

# text and vision register their models on import.
from fedstream.models import core, text, vision  # noqa: F401
from fedstream.models.core import Model, TrainMetrics, get_model, model_factories, register_model, resolve_model

__all__ = ["Model", "TrainMetrics", "get_model", "model_factories", "register_model", "resolve_model",
           "MODEL_NAMES"]


def __getattr__(name: str) -> Any:
    """`MODEL_NAMES`, read from the live registry (so it includes models registered later)."""
    if name == "MODEL_NAMES":
        return core.MODEL_NAMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
