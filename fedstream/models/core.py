"""The `Model` wrapper and the classification models of the foundation.

A `Model` bundles a Flax Linen module with how to initialise it, apply it, and
score it. Everything is a pure function of a params pytree (a plain dict), so
the round runner can scan over client steps, shard clients over devices and
checkpoint params without knowing anything about the module.

Dropout keys are passed at call time (never stored in the model), so every
client and every step draws its own mask (see docs/notes.md, 'Flax dropout
keys at call time').
"""

# No `from __future__ import annotations`: clu reads the Collection annotations.

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax import linen as nn

from fedstream.models.layers import Conv2D, ConvImpl, max_pool_2x2

Params = Any


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Mean loss and accuracy over the scored targets seen (examples, or tokens for sequence models)."""

    loss: metrics.Average
    accuracy: metrics.Average


# Per-target functions of (logits, labels): a loss (softmax cross-entropy by default) and a correctness score
# (argmax == label by default), each shaped like `labels`.
TargetFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy per target (the default loss)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def argmax_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the highest logit is the label (the default accuracy)."""
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Model:
    """A model the rounds can train: how to initialise and apply it, its features, and how it is scored.

    Build one with `Model.from_flax(module, ...)` (any Linen module, or an
    initialised NNX module), `Model.from_functions(init, apply, ...)` (any
    pure JAX init/apply pair), or `get_model(name, ...)` for the built-in zoo.
    Everything is a pure function of a params pytree, so the round runner can
    scan over client steps, shard clients over devices and checkpoint params
    without knowing anything else about the model.

    Classification models score one label per example. Sequence models
    (labels `[batch, T]`, logits `[batch, T, vocab]`) score every target
    token, except that tokens in `loss_mask_ids` (e.g. PAD) count in neither
    loss nor accuracy and tokens in `accuracy_mask_ids` (e.g. PAD, BOS, EOS,
    OOV: "in-vocabulary accuracy") are left out of the accuracy.

    Attributes:
      module: a Linen module (`module.apply(vars, x, train=..., rngs=...)`), or None with `init_fn`/`apply_fn`.
      input_shape: per-example input shape, e.g. (28, 28, 1) or (20,).
      num_classes: number of output logits (the vocabulary size for text); labels must lie in [0, num_classes).
      input_key / label_key: dataset features holding inputs and labels.
      input_dtype: dtype of the input feature (int32 for token ids).
      loss_mask_ids / accuracy_mask_ids: label ids left out of the scores.
      loss_fn: per-target loss `f(logits, labels)` shaped like labels (default: softmax cross-entropy).
      correct_fn: per-target correctness `f(logits, labels)` in [0, 1] (default: argmax == label).
      init_fn / apply_fn: `init(rng) -> params` and `apply(params, x, rng_or_None) -> logits`, used
        instead of `module` when given (rng None means evaluation: no dropout).
    """

    module: Any
    input_shape: tuple[int, ...]
    num_classes: int
    input_key: str = "x"
    label_key: str = "y"
    input_dtype: str = "float32"
    loss_mask_ids: tuple[int, ...] = ()
    accuracy_mask_ids: tuple[int, ...] = ()
    loss_fn: TargetFn = cross_entropy_loss
    correct_fn: TargetFn = argmax_correct
    init_fn: Callable[[jax.Array], Params] | None = None
    apply_fn: Callable[[Params, jax.Array, jax.Array | None], jax.Array] | None = None

    @classmethod
    def from_flax(cls, module: Any, input_shape: Sequence[int], num_classes: int, *, input_key: str = "x",
                  label_key: str = "y", input_dtype: str = "float32", loss_fn: TargetFn = cross_entropy_loss,
                  correct_fn: TargetFn = argmax_correct) -> "Model":
        """Wraps a Flax module: a Linen module (initialised from the run's seed), or an NNX module instance.

        A Linen module's `__call__(x)` may take `train: bool` (or `deterministic: bool`); it is then
        told whether it is training, and gets a `dropout` rng while it is. An NNX module is used as
        initialised (its current parameters are the initial model, whatever the run's seed).
        """
        common = dict(input_key=input_key, label_key=label_key, input_dtype=str(input_dtype), loss_fn=loss_fn,
                      correct_fn=correct_fn)
        shape = tuple(int(d) for d in input_shape)
        if isinstance(module, nn.Module):
            return cls(module, shape, int(num_classes), **common)
        from flax import nnx

        if isinstance(module, nnx.Module):
            graphdef, params, rest = nnx.split(module, nnx.Param, ...)
            return cls(None, shape, int(num_classes), **common, init_fn=lambda rng: params,
                       apply_fn=lambda p, x, rng: nnx.merge(graphdef, p, rest)(x))
        raise TypeError(f"Model.from_flax: expected a flax.linen.Module or a flax.nnx.Module, got "
                        f"{type(module).__name__}; for other code use Model.from_functions(init, apply, ...)")

    @classmethod
    def from_functions(cls, init: Callable[[jax.Array], Params],
                       apply: Callable[[Params, jax.Array, jax.Array | None], jax.Array],
                       input_shape: Sequence[int], num_classes: int, *, input_key: str = "x", label_key: str = "y",
                       input_dtype: str = "float32", loss_fn: TargetFn = cross_entropy_loss,
                       correct_fn: TargetFn = argmax_correct) -> "Model":
        """Wraps a pure init/apply pair: `init(rng) -> params`, `apply(params, x, rng) -> logits`
        (`rng` is a key while training, None while evaluating)."""
        return cls(None, tuple(int(d) for d in input_shape), int(num_classes), input_key, label_key,
                   str(input_dtype), loss_fn=loss_fn, correct_fn=correct_fn, init_fn=init, apply_fn=apply)

    def init(self, rng: jax.Array) -> Params:
        """Initial params (a pytree of arrays)."""
        if self.init_fn is not None:
            return self.init_fn(rng)
        x = jnp.zeros((1, *self.input_shape), self.input_dtype)
        return self.module.init({"params": rng, "dropout": rng}, x, **self._mode(False))["params"]

    def apply(self, params: Params, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Logits for a batch. With `rng`, runs in training mode (dropout on)."""
        if self.apply_fn is not None:
            return self.apply_fn(params, x, rng)
        if rng is None:
            return self.module.apply({"params": params}, x, **self._mode(False))
        return self.module.apply({"params": params}, x, **self._mode(True), rngs={"dropout": rng})

    def _mode(self, train: bool) -> dict[str, bool]:
        """The keyword that tells a Linen module whether it trains (`train` or `deterministic`), if it takes one."""
        parameters = _call_parameters(type(self.module))
        if "train" in parameters:
            return {"train": train}
        if "deterministic" in parameters:
            return {"deterministic": not train}
        return {}

    def example_scores(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        """Per-example sums `[batch]`: `loss` (loss summed over scored targets),
        `loss_count` (targets in the loss), `correct` and `accuracy_count` (targets in the accuracy).

        For a classifier the counts are 1 and `loss` is the example's loss.
        """
        loss = self.loss_fn(logits, labels)
        hit = self.correct_fn(logits, labels).astype(jnp.float32)
        in_loss = _not_in(labels, self.loss_mask_ids)
        in_accuracy = in_loss * _not_in(labels, self.accuracy_mask_ids)
        per_target = lambda v: v.reshape(v.shape[0], -1).sum(-1)  # noqa: E731 (sums over T for sequences)
        return {"loss": per_target(loss * in_loss), "loss_count": per_target(in_loss),
                "correct": per_target(hit * in_accuracy), "accuracy_count": per_target(in_accuracy)}

    def batch_loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
        """Mean loss over the batch's scored targets (padded examples excluded by `mask`)."""
        scores = self.example_scores(logits, labels)
        weights = mask.astype(jnp.float32)
        return jnp.sum(scores["loss"] * weights) / jnp.maximum(jnp.sum(scores["loss_count"] * weights), 1.0)

    def metrics(self, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> TrainMetrics:
        """clu metrics of one batch, padded examples excluded by `mask`."""
        scores = self.example_scores(logits, labels)
        weights = mask.astype(jnp.float32)

        def average(total: str, count: str) -> metrics.Average:
            return metrics.Average(total=jnp.sum(scores[total] * weights),
                                   count=jnp.sum(scores[count] * weights).astype(jnp.int32))

        return TrainMetrics.empty().replace(loss=average("loss", "loss_count"),
                                            accuracy=average("correct", "accuracy_count"))


@functools.lru_cache(maxsize=None)
def _call_parameters(module_type: type) -> frozenset[str]:
    """Parameter names of a Linen module class's `__call__`."""
    try:
        return frozenset(inspect.signature(module_type.__call__).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _not_in(labels: jax.Array, ids: tuple[int, ...]) -> jax.Array:
    """1.0 where a label is none of `ids`, else 0.0."""
    keep = jnp.ones(labels.shape, jnp.float32)
    for i in ids:
        keep = keep * (labels != i)
    return keep


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the flattened input."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """Dense ReLU layers (default 2x200, the 'dense' model of McMahan et al.)."""

    num_classes: int
    hidden: Sequence[int] = (200, 200)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class EmnistCNN(nn.Module):
    """The EMNIST CNN of Reddi et al. (2021) and FedJAX.

    conv 32 3x3 -> conv 64 3x3 -> max-pool 2x2 -> dropout 0.25 -> dense 128
    -> dropout 0.5 -> dense classes; 'VALID' convolutions, ReLU activations.
    About 1.2M parameters for 28x28 inputs and 62 classes.
    """

    num_classes: int
    conv_impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(Conv2D(32, impl=self.conv_impl)(x))
        x = nn.relu(Conv2D(64, impl=self.conv_impl)(x))
        x = max_pool_2x2(x)
        x = nn.Dropout(0.25, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


# The built-in factories take `hidden` and `conv_impl` whether they use them or not (as the zoo's do), so that
# scripts passing both to every model keep working; the train loop passes each only to factories declaring it.
def _logistic(num_classes: int, hidden: Any = None, conv_impl: Any = None) -> nn.Module:
    """Multinomial logistic regression on the flattened input (`hidden`, `conv_impl` ignored)."""
    del hidden, conv_impl
    return LogisticRegression(int(num_classes))


def _mlp(num_classes: int, hidden: Sequence[int] = (200, 200), conv_impl: Any = None) -> nn.Module:
    """Dense ReLU layers (default 2x200, the 'dense' model of McMahan et al.); `hidden` are the widths."""
    del conv_impl
    return MLP(int(num_classes), tuple(int(h) for h in hidden))


def _cnn(num_classes: int, conv_impl: ConvImpl = "auto", hidden: Any = None) -> nn.Module:
    """The EMNIST CNN of Reddi et al. (2021) and FedJAX: 2 convs, max-pool, dropout, dense 128, dropout."""
    del hidden
    return EmnistCNN(int(num_classes), conv_impl)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {"logistic": _logistic, "mlp": _mlp, "cnn": _cnn}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Adds a model factory `factory(num_classes, **options) -> flax.linen.Module` under `name`.

    The train loop passes `hidden` and `conv_impl` (config keys model.hidden,
    model.conv_impl) only to factories that declare them, and `model.options`
    as keyword arguments.
    """
    _FACTORIES[name] = factory


def model_factories() -> dict[str, Callable[..., nn.Module]]:
    """The registered model factories by name (a copy: `register_model` adds to the registry)."""
    return dict(_FACTORIES)


def __getattr__(name: str) -> Any:
    """`MODEL_NAMES`: the registered model names, sorted, read from the live registry."""
    if name == "MODEL_NAMES":
        return tuple(sorted(_FACTORIES))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_model(name: str | Callable[..., nn.Module], search: Sequence[Any] = ()) -> Callable[..., nn.Module]:
    """The factory that `name` (config key `model.name`) stands for.

    `name` is a registered name (`model_factories()`), `module:attribute` or
    `path/to/file.py:attribute` (a relative file is looked up in `search`, by
    default the cwd); a callable is returned as is. Raises a one-line
    ConfigError (a ValueError) naming the key otherwise.
    """
    from fedstream.config import ConfigError, is_attribute_name, load_attribute

    if callable(name):
        return name
    if name in _FACTORIES:
        return _FACTORIES[name]
    if is_attribute_name(name):
        return load_attribute(name, "model.name", search)
    raise ConfigError(f"config key 'model.name' must be one of {', '.join(sorted(_FACTORIES))} (registered), "
                      f"module:attribute or path/to/file.py:attribute, got {name!r} (unknown model)")


def factory_accepts(factory: Callable[..., Any], option: str) -> bool:
    """Whether `factory` has a parameter named `option` (or takes `**kwargs`)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return option in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def get_model(
    name: str | Callable[..., nn.Module],
    input_shape: Sequence[int],
    num_classes: int,
    input_key: str = "x",
    label_key: str = "y",
    *,
    input_dtype: str = "float32",
    loss_mask_ids: Sequence[int] = (),
    accuracy_mask_ids: Sequence[int] = (),
    **options: Any,
) -> Model:
    """Builds a model: a registered name (see `model_factories()`), `module:attribute`,
    `path/to/file.py:attribute`, or a factory itself; `options` go to its factory."""
    module = resolve_model(name)(num_classes, **options)
    return Model(module, tuple(int(d) for d in input_shape), int(num_classes), input_key, label_key,
                 str(input_dtype), tuple(int(i) for i in loss_mask_ids), tuple(int(i) for i in accuracy_mask_ids))
