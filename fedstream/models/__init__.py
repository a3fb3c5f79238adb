"""Models: Flax modules wrapped with their per-example loss and metrics.

`get_model(name, ...)` returns a `Model`, the one object the round runner needs:
pure functions over a params pytree, so that clients can be scanned, vmapped
and sharded freely.

Registered: `logistic`, `mlp`, `cnn` (core.py); `shakespeare_lstm`,
`stackoverflow_lstm`, `stackoverflow_transformer` (text.py); `resnet18_gn`,
`cifar_logistic` (vision.py).
"""

# text and vision register their models on import; MODEL_NAMES is read after them.
from fedstream.models import text, vision  # noqa: F401
from fedstream.models.core import Model, TrainMetrics, get_model, model_factories, MODEL_NAMES

__all__ = ["Model", "TrainMetrics", "get_model", "model_factories", "MODEL_NAMES"]
