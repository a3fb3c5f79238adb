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
from typing import Any, Iterable

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
