"""fedstream: federated-learning simulation on JAX as a streaming pipeline."""

__version__ = "0.1.0"
