"""Models: Flax modules wrapped with their per-example loss and metrics.

`get_model(name, ...)` returns a `Model`, the one object the round runner needs:
pure functions over a params pytree, so that clients can be scanned, vmapped
and sharded freely.
"""

from fedstream.models.core import Model, TrainMetrics, get_model, MODEL_NAMES

__all__ = ["Model", "TrainMetrics", "get_model", "MODEL_NAMES"]
