"""Experiment and recipe configs: ml_collections `get_config()` files plus overrides.

Configs follow the Flax/big_vision convention: a Python file with a
`get_config()` function returning an `ml_collections.ConfigDict`. Command-line
overrides `--config.a.b=value` are applied on top; an unknown key or a value of
the wrong type is an error that names the key.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import pathlib
import sys
from types import ModuleType
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config file, key or value is invalid. The message names the culprit."""


def load_module(name_or_path: str, package: str) -> ModuleType:
    """Imports `name_or_path` as a module.

    A path ending in `.py` is loaded from that file; anything else is looked up
    as `package.<name>` (dashes become underscores), e.g. the recipe `digits`
    resolves to `fedstream.recipes.digits`.
    """
    if name_or_path.endswith(".py") or "/" in name_or_path:
        path = pathlib.Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        module_name = f"_fedstream_user_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{path}: cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module
    module_name = f"{package}.{name_or_path.replace('-', '_')}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"unknown name {name_or_path!r}: no module {module_name} and no such file") from None
        raise


def load_config(name_or_path: str, package: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a module or file and applies `key=value` overrides."""
    module = load_module(name_or_path, package)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{name_or_path}: has no get_config() function")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{name_or_path}: get_config() must return an ml_collections.ConfigDict")
    return apply_overrides(config, overrides)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as adam or /tmp/x


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with each `a.b.c=value` applied.

    Values are parsed as Python literals (falling back to a string) and must
    match the type of the existing value; ints are accepted for float keys.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.removeprefix("--").removeprefix("config.")
        set_value(config, key, _parse_value(text))
    return config


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets dotted `key` in `config`, refusing unknown keys and wrong types."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r}")
        node = node[part]
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        raise ConfigError(f"unknown config key {key!r} (known here: {known})")
    old = node[leaf]
    if old is not None and value is not None:
        if isinstance(old, bool) != isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {value!r}")
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
            value = type(old)(value)
        elif not isinstance(value, type(old)):
            raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {value!r}")
    with node.unlocked():
        node[leaf] = value


def to_json(config: ml_collections.ConfigDict) -> str:
    """Canonical JSON of a config (sorted keys), used for fingerprints and metadata."""
    return json.dumps(config.to_dict(), sort_keys=True, default=list)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flattens nested dicts to dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Validation of a training config (`validate_train_config`), run before any work starts.
# ---------------------------------------------------------------------------------------------------------------

# The pipeline whose get_config() lists every key a training config may have, with its type.
# A new key belongs there (with its default) before another pipeline may set it.
REFERENCE_PIPELINE = "fedstream.pipelines.digits_fedavg"
# Subtrees whose keys are free-form (keyword arguments of the model's factory, the algorithm's options).
FREE_FORM_KEYS = ("model.options", "algorithm.options")
AGGREGATIONS = ("example", "uniform")
NONFINITE_POLICIES = ("skip", "stop")  # config key nonfinite: a client update with NaN/Inf


def _reference_config() -> dict[str, Any]:
    return importlib.import_module(REFERENCE_PIPELINE).get_config().to_dict()


def _type_ok(expected: Any, value: Any) -> bool:
    """Whether `value` may stand where the reference config has `expected` (the override rules)."""
    if expected is None or value is None:
        return True
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) and isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    if isinstance(expected, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(expected))


def _check_keys_and_types(config: dict[str, Any], reference: dict[str, Any], prefix: str = "") -> None:
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if any(dotted == free or dotted.startswith(free + ".") for free in FREE_FORM_KEYS):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a ConfigDict (keyword arguments), got {value!r}")
            continue
        if key not in reference:
            import difflib

            close = difflib.get_close_matches(key, list(reference), n=1)
            hint = f" (did you mean {prefix}{close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; every key must exist in {REFERENCE_PIPELINE}")
        expected = reference[key]
        if isinstance(expected, dict) != isinstance(value, dict):
            kind = "a section (ConfigDict)" if isinstance(expected, dict) else f"a {type(expected).__name__}"
            raise ConfigError(f"config key {dotted!r} must be {kind}, got {value!r}")
        if isinstance(value, dict):
            _check_keys_and_types(value, expected, dotted + ".")
        elif not _type_ok(expected, value):
            raise ConfigError(f"config key {dotted!r} expects {type(expected).__name__}, got {value!r}")


def validate_train_config(config: ml_collections.ConfigDict, num_train_clients: int | None = None) -> None:
    """Refuses a training config with an unknown key, a wrong type or an out-of-range value.

    Raises ConfigError naming the key. Keys and types are checked against the
    reference pipeline (`REFERENCE_PIPELINE`); `model.options` is free-form.
    With `num_train_clients` (the train split's population) it also runs
    `check_clients_per_round`. Cheap: no data is read.
    """
    import math

    flat_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    _check_keys_and_types(flat_dict, _reference_config())
    values = flatten(flat_dict)

    def get(key: str) -> Any:
        return values.get(key)

    def need(key: str, ok: bool, what: str) -> None:
        if key in values and not ok:
            raise ConfigError(f"config key {key!r} must be {what}, got {values[key]!r}")

    def number(key: str) -> float | None:
        v = get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def at_least(key: str, low: float) -> None:
        v = number(key)
        need(key, v is not None and v >= low, f"an integer >= {low}" if isinstance(get(key), int) else f">= {low}")

    def positive_finite(key: str) -> None:
        v = number(key)
        need(key, v is not None and math.isfinite(v) and v > 0, "a finite number > 0")

    def in_unit_interval(key: str) -> None:  # [0, 1)
        v = number(key)
        need(key, v is not None and 0.0 <= v < 1.0, "in [0, 1)")

    for key in ("seed", "num_rounds", "data_threads", "client.max_examples", "client.max_steps", "eval.every",
                "eval.finetune_steps"):
        at_least(key, 0)
    for key in ("clients_per_round", "client.batch_size", "client.epochs", "eval.batch_size", "eval.chunk_clients",
                "checkpoint.every", "checkpoint.keep", "model.num_classes"):
        at_least(key, 1)
    for key in ("client.learning_rate", "server.learning_rate", "server.eps"):
        positive_finite(key)
    for key in ("client.momentum", "server.momentum", "server.b1", "server.b2"):
        in_unit_interval(key)
    need("aggregation", get("aggregation") in AGGREGATIONS, f"one of {', '.join(AGGREGATIONS)}")
    need("nonfinite", get("nonfinite") in NONFINITE_POLICIES, f"one of {', '.join(NONFINITE_POLICIES)}")
    need("sampling", get("sampling") in ("uniform", "poisson"), "one of uniform, poisson")
    rate = number("sampling_rate")
    need("sampling_rate", rate is not None and 0.0 <= rate <= 1.0, "in [0, 1] (0 = clients_per_round / N)")
    at_least("max_clients_per_round", 0)
    for key in ("data.path", "data.train_split", "data.test_split"):
        need(key, isinstance(get(key), str) and bool(get(key)), "a non-empty string")
    hidden = get("model.hidden")
    need("model.hidden", isinstance(hidden, list) and all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden), "a sequence of integers >= 1")
    need("model.conv_impl", get("model.conv_impl") in ("auto", "xla", "patches"), "one of auto, xla, patches")
    for key in ("model.loss_mask_ids", "model.accuracy_mask_ids"):
        ids = get(key)
        need(key, isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids),
             "a sequence of integers")
    if "model.name" in values:
        from fedstream.models import MODEL_NAMES

        need("model.name", get("model.name") in MODEL_NAMES, f"one of {', '.join(MODEL_NAMES)}")
    if "client.optimizer" in values or "server.optimizer" in values:
        from fedstream.algorithms.fedavg import OPTIMIZER_NAMES

        for key in ("client.optimizer", "server.optimizer"):
            need(key, get(key) in OPTIMIZER_NAMES, f"one of {', '.join(OPTIMIZER_NAMES)}")
    if "algorithm.name" in values:
        from fedstream.algorithms import algorithm_names

        algorithms = tuple(algorithm_names())
        need("algorithm.name", get("algorithm.name") in algorithms, f"one of {', '.join(algorithms)}")
    if get("data.augment"):
        from fedstream.data.augment import AUGMENTATIONS

        need("data.augment", get("data.augment") in AUGMENTATIONS,
             f"'' or one of {', '.join(sorted(AUGMENTATIONS))}")
    if num_train_clients is not None:
        check_clients_per_round(config, num_train_clients)


def check_clients_per_round(config: ml_collections.ConfigDict | Mapping[str, Any], num_train_clients: int) -> None:
    """Refuses a `clients_per_round` larger than the train split's population (the check that needs the data).

    Only this key is checked; the rest of the config is `validate_train_config`'s.
    """
    values = flatten(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
    clients = values.get("clients_per_round")
    if isinstance(clients, (int, float)) and not isinstance(clients, bool) and int(clients) > int(num_train_clients):
        raise ConfigError(f"config key 'clients_per_round' is {clients}, more than the {num_train_clients} clients "
                          f"of split {values.get('data.train_split')!r} in {values.get('data.path')}")
