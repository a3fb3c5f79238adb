"""Experiment and recipe configs: ml_collections `get_config()` files plus overrides.

Configs follow the Flax/big_vision convention: a Python file with a
`get_config()` function returning an `ml_collections.ConfigDict`. Command-line
overrides `--config.a.b=value` are applied on top; an unknown key or a value of
the wrong type is an error that names the key.

`default_train_config()` is the schema of a training config: every key, its
type (that of its default) and a comment. Pipelines start from it and
`validate_train_config` checks a config against it. This module imports no
other fedstream module at import time.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import weakref
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

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
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # a user's file: its own error, named, chained (the traceback keeps the cause)
            sys.modules.pop(module_name, None)
            raise ConfigError(f"{path}: {_import_failure(e)}") from e
        return module
    module_name = f"{package}.{name_or_path.replace('-', '_')}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"unknown name {name_or_path!r}: no module {module_name} and no such file") from None
        raise
    except SyntaxError as e:
        raise ConfigError(f"{module_name}: {_import_failure(e)}") from e


def _import_failure(e: Exception) -> str:
    """One line saying why importing a config or recipe file failed (its syntax error, or what it raised)."""
    if isinstance(e, SyntaxError):
        where = f"line {e.lineno}: " if e.lineno else ""
        return f"{where}{type(e).__name__}: {e.msg} (the file is not valid Python)"
    if isinstance(e, ConfigError):
        return str(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"importing it raised {type(e).__name__}" + (f": {first}" if first else "")


# --- where a config came from: the pipeline file's directory, for relative `path.py:attribute` names -------------
# A side channel rather than a config key, so that the config (stored in checkpoints, compared on resume) does
# not depend on where the pipeline file lives. Copies made by `apply_overrides` keep it.
_ORIGINS: dict[int, pathlib.Path] = {}


def set_config_origin(config: ml_collections.ConfigDict, directory: str | os.PathLike | None) -> None:
    """Records `directory` (a pipeline file's directory) as where `config`'s relative file names resolve first."""
    key = id(config)
    if directory is None:
        _ORIGINS.pop(key, None)
        return
    if key not in _ORIGINS:
        weakref.finalize(config, _ORIGINS.pop, key, None)
    _ORIGINS[key] = pathlib.Path(directory).resolve()


def config_origin(config: ml_collections.ConfigDict) -> pathlib.Path | None:
    """The directory of the pipeline file `config` was loaded from (`load_config`), or None."""
    return _ORIGINS.get(id(config))


def search_dirs(config: ml_collections.ConfigDict | None = None) -> tuple[pathlib.Path, ...]:
    """Where a relative `path.py:attribute` of `config` is looked up: its pipeline's directory, then the cwd."""
    dirs = [d for d in ((config_origin(config) if config is not None else None), pathlib.Path.cwd()) if d]
    return tuple(dict.fromkeys(pathlib.Path(d).resolve() for d in dirs))


def load_config(name_or_path: str, package: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a module or file and applies `key=value` overrides.

    The module's directory is recorded (`config_origin`): relative file names in
    `model.name` and `algorithm.name` resolve there first.
    """
    module = load_module(name_or_path, package)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{name_or_path}: has no get_config() function")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{name_or_path}: get_config() must return an ml_collections.ConfigDict")
    file = getattr(module, "__file__", None)
    set_config_origin(config, pathlib.Path(file).parent if file else None)
    return apply_overrides(config, overrides)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as adam or /tmp/x


# Subtrees whose keys are free-form: keyword arguments of the model's factory, the algorithm's options (checked
# against the algorithm's declared options by `validate_train_config`).
FREE_FORM_KEYS = ("model.options", "algorithm.options")


def _is_free_form(dotted: str) -> bool:
    return any(dotted == free or dotted.startswith(free + ".") for free in FREE_FORM_KEYS)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with each `a.b.c=value` applied.

    Values are parsed as Python literals (falling back to a string) and must
    match the type of the existing value; ints are accepted for float keys.
    Under the free-form sections (`FREE_FORM_KEYS`) new keys may be added.
    """
    copy = ml_collections.ConfigDict(config.to_dict())
    set_config_origin(copy, config_origin(config))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.removeprefix("--").removeprefix("config.")
        set_value(copy, key, _parse_value(text))
    return copy


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets dotted `key` in `config`, refusing unknown keys and wrong types (new keys are allowed only under
    `FREE_FORM_KEYS`)."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        here = ".".join(parents[: i + 1])
        if part not in node and _is_free_form(here) and here not in FREE_FORM_KEYS:
            with node.unlocked():
                node[part] = ml_collections.ConfigDict()
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {here!r}")
        node = node[part]
    if leaf not in node:
        if _is_free_form(".".join(parents)):
            with node.unlocked():
                node[leaf] = value
            return
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
        elif isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
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
# `model.name` and `algorithm.name`: a registered name, `module:attribute` or `path/to/file.py:attribute`.
# ---------------------------------------------------------------------------------------------------------------

_USER_FILES: dict[tuple[str, int], ModuleType] = {}


def is_attribute_name(name: str) -> bool:
    """Whether `name` is `module:attribute` or `path/to/file.py:attribute` rather than a registered name."""
    return isinstance(name, str) and ":" in name


def _load_file(path: pathlib.Path) -> ModuleType:
    """A user's .py file as a module, imported once per version of the file."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _USER_FILES:
        _USER_FILES[key] = load_module(str(path), "")
    return _USER_FILES[key]


def load_attribute(spec: str, key: str, search: Sequence[str | os.PathLike] = ()) -> Any:
    """Resolves `module:attribute` or `path/to/file.py:attribute`, the value of config key `key`.

    A relative file is looked up in each directory of `search` in turn (by
    default the cwd); a module that Python cannot import is looked for there as
    a file too (`a.b` -> `a/b.py`), so no PYTHONPATH is needed. Raises a
    one-line ConfigError naming `key` and what was not found.
    """
    target, _, attribute = spec.rpartition(":")
    if not target or not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(f"config key {key!r}: {spec!r} is not a registered name, module:attribute or "
                          "path/to/file.py:attribute")
    dirs = [pathlib.Path(d) for d in search] or [pathlib.Path.cwd()]
    looked = ", ".join(str(d) for d in dirs)
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = pathlib.Path(target).expanduser()
        candidates = [path] if path.is_absolute() else [d / path for d in dirs]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"config key {key!r}: no file {target!r}" + ("" if path.is_absolute() else
                                                                           f" (looked in {looked})"))
        module, where = _load_file(found.resolve()), f"file {str(found)!r}"
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name is None or not (target == e.name or target.startswith(e.name + ".")):
                raise  # the module exists but one of its own imports is missing
            relative = pathlib.Path(*target.split(".")).with_suffix(".py")
            found = next((d / relative for d in dirs if (d / relative).is_file()), None)
            if found is None:
                raise ConfigError(f"config key {key!r}: no module {target!r} (not importable, and no {relative} "
                                  f"in {looked})") from None
            module = _load_file(found.resolve())
        where = f"module {target!r}"
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"config key {key!r}: {where} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ConfigError(f"config key {key!r}: {target}:{attribute} is a {type(value).__name__}, not a class or "
                          "function")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The schema of a training config, and its validation (`validate_train_config`), run before any work starts.
# ---------------------------------------------------------------------------------------------------------------

AGGREGATIONS = ("example", "uniform")
# Upper bounds of integer keys, checked before any work: counts, rounds and sizes fit int32 (JAX's default integer);
# a seed fits uint32 (without jax_enable_x64, jax.random.PRNGKey(seed) keeps only the low 32 bits, so 2**32 and 0
# give the same key); a batch holds at most 2**24 examples (float32 counts them exactly up to there).
INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1
BATCH_SIZE_MAX = 2**24
NONFINITE_POLICIES = ("skip", "stop")  # config key nonfinite: a client update with NaN/Inf
SAMPLINGS = ("uniform", "poisson", "epochs")  # = fedstream.data.sampling.SAMPLINGS
CONV_IMPLS = ("auto", "xla", "patches")


def default_train_config() -> ml_collections.ConfigDict:
    """Every key a training config may have, with its default; a key's type is that of its default.

    A pipeline starts from this (usually through `pipelines/digits_fedavg.py`)
    and must at least set `data.path`. A new key belongs here, with its default
    and a comment, before any pipeline may set it.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds the model init, the cohorts, each client's example order and dropout
    c.num_rounds = 200  # rounds to train; may change on resume (extends or shortens a run)
    c.clients_per_round = 10
    # 'epochs': each epoch a shuffle of the clients cut into rounds of clients_per_round (each client at most once
    # per epoch; DP-FTRL's pattern)
    c.sampling = "uniform"  # 'uniform' (clients_per_round clients), 'poisson' (each with rate q) or 'epochs' (above)
    c.sampling_rate = 0.0  # Poisson q; 0 = clients_per_round / N (clients_per_round = expected cohort size)
    c.max_clients_per_round = 0  # Poisson slots per round (cap); 0 = smallest k with P(size > k) <= 1e-9
    c.aggregation = "example"  # 'example' (weight = examples) or 'uniform'
    c.nonfinite = "skip"  # a client update with NaN/Inf: 'skip' it (counted in the metrics) or 'stop' the run
    c.data_threads = 0  # reader threads; 0 = auto (a quarter of the CPU cores, at least 1)
    c.lanes = 0  # clients each device trains in lockstep (vmap); 0 = auto (1 on CPU, by model size on GPU/TPU)
    c.chunk_mb = 128  # packed client data per round call (MiB); a larger round runs as several calls; 0 = one call

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # preprocessed dataset directory (a pipeline must set it)
    c.data.recipe = ""  # preprocess it with this recipe if missing ('' = never)
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.augment = ""  # per-client augmentation in the pipeline ('' = none; 'crop_flip' for CIFAR)

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"  # a registered model (`fedstream list models`), module:attribute or path/to/file.py:attribute
    c.model.hidden = (200, 200)  # layer widths, for factories that take `hidden` (mlp)
    c.model.num_classes = 10
    c.model.conv_impl = "auto"  # convolutions, for factories that take `conv_impl`: 'auto', 'xla' or 'patches'
    c.model.input_key = "x"  # dataset feature holding the model's input
    c.model.label_key = "y"  # dataset feature holding the label
    c.model.options = ml_collections.ConfigDict()  # extra keyword arguments of the model's factory
    c.model.loss_mask_ids = ()  # label ids scored by neither loss nor accuracy (e.g. PAD)
    c.model.accuracy_mask_ids = ()  # label ids left out of the accuracy (e.g. BOS, EOS, OOV)

    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.name = "fedavg"  # a registered algorithm (`fedstream list algorithms`), module:attribute or file.py:attr
    c.algorithm.options = ml_collections.ConfigDict()  # its options (`fedstream list --algorithm NAME`)

    c.client = ml_collections.ConfigDict()
    c.client.optimizer = "sgd"  # sgd, adam, yogi or adagrad
    c.client.learning_rate = 0.1
    c.client.momentum = 0.0
    c.client.batch_size = 10
    c.client.epochs = 1
    c.client.max_examples = 0  # 0 = no cap
    c.client.max_steps = 0  # 0 = no cap

    c.server = ml_collections.ConfigDict()
    c.server.optimizer = "sgd"  # sgd with learning_rate 1.0 is plain FedAvg
    c.server.learning_rate = 1.0
    c.server.momentum = 0.0
    c.server.b1 = 0.9
    c.server.b2 = 0.999
    c.server.eps = 1e-3

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 25  # rounds between evaluations on the test split (0 = only at the end)
    c.eval.batch_size = 64
    c.eval.chunk_clients = 256
    c.eval.finetune_steps = 0  # > 0: also evaluate after this many local fine-tuning steps per client

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1  # rounds between Orbax checkpoints
    c.checkpoint.keep = 3

    # A simulated clock under the rounds (docs/simulated_clock.md): device speeds, availability, over-selection
    # and a deadline. Off: rounds are the idealized ones (every sampled client answers, instantly).
    c.clock = ml_collections.ConfigDict()
    c.clock.enabled = False  # run the rounds on the simulated clock (docs/simulated_clock.md)
    c.clock.over_selection = 1.0  # a round samples ceil(clients_per_round * this) online clients, keeps the first k
    c.clock.deadline = 0.0  # simulated seconds a round waits for its clients (0 = no deadline)
    c.clock.start_time = 0.0  # simulated time at which round 1 starts (seconds; shifts the diurnal cycle)
    c.clock.seconds_per_example = 0.01  # median compute seconds per example a client processes
    c.clock.speed_distribution = "lognormal"  # per-client slowness (median 1): 'lognormal' or 'pareto'
    c.clock.speed_sigma = 0.75  # lognormal: sigma of log(slowness)
    c.clock.pareto_shape = 2.0  # pareto: shape alpha (smaller = heavier tail)
    c.clock.network_seconds = 5.0  # median upload + download seconds per round
    c.clock.network_sigma = 0.5  # sigma of log(network time), fresh per (round, client)
    c.clock.availability = "always"  # 'always', 'diurnal' or 'trace'
    c.clock.day_seconds = 86400.0  # diurnal: the cycle's length
    c.clock.available_fraction = 0.5  # diurnal: fraction of the cycle each client is online
    c.clock.time_zones = 0  # diurnal: 0 = each client's phase uniform in the cycle; n = one of n time zones
    c.clock.trace = ""  # trace: JSON or CSV file of online intervals per client id
    c.clock.trace_period = 0.0  # trace: it repeats every this many seconds (0 = the file's 'period', or never)
    c.clock.trace_assign = "index"  # trace: 'index' (client c = id c) or 'cycle' (client c = the (c mod n)-th id)
    return c


def _type_ok(expected: Any, value: Any) -> bool:
    """Whether `value` may stand where the schema has `expected` (the override rules)."""
    if expected is None or value is None:
        return True
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) and isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    if isinstance(expected, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(expected))


def _check_keys_and_types(config: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> None:
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if _is_free_form(dotted):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a ConfigDict (keyword arguments), got {value!r}")
            continue
        if key not in schema:
            import difflib

            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {prefix}{close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; every key must exist in "
                              "fedstream.config.default_train_config()")
        expected = schema[key]
        if isinstance(expected, dict) != isinstance(value, dict):
            kind = "a section (ConfigDict)" if isinstance(expected, dict) else f"a {type(expected).__name__}"
            raise ConfigError(f"config key {dotted!r} must be {kind}, got {value!r}")
        if isinstance(value, dict):
            _check_keys_and_types(value, expected, dotted + ".")
        elif not _type_ok(expected, value):
            raise ConfigError(f"config key {dotted!r} expects {type(expected).__name__}, got {value!r}")


def validate_train_config(config: ml_collections.ConfigDict | Mapping[str, Any], num_train_clients: int | None = None,
                          *, search: Sequence[str | os.PathLike] | None = None) -> None:
    """Refuses a training config with an unknown key, a wrong type or an out-of-range value.

    Raises ConfigError naming the key. Keys and types are checked against
    `default_train_config()`; `model.options` is free-form, `algorithm.options`
    is checked against the selected algorithm's declared options (names and
    types). `model.name` and `algorithm.name` must be registered or resolve
    (`module:attribute`, `path/to/file.py:attribute`, looked up in `search`, by
    default the config's pipeline directory, then the cwd). With
    `num_train_clients` (the train split's population) it also runs
    `check_clients_per_round`. Cheap: no data is read.
    """
    import math

    is_config = isinstance(config, ml_collections.ConfigDict)
    flat_dict = config.to_dict() if is_config else dict(config)
    _check_keys_and_types(flat_dict, default_train_config().to_dict())
    values = flatten(flat_dict)
    dirs = tuple(search) if search is not None else search_dirs(config if is_config else None)

    def get(key: str) -> Any:
        return values.get(key)

    def need(key: str, ok: bool, what: str) -> None:
        if key in values and not ok:
            raise ConfigError(f"config key {key!r} must be {what}, got {values[key]!r}")

    def number(key: str) -> float | None:
        v = get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def positive_finite(key: str) -> None:
        v = number(key)
        need(key, v is not None and math.isfinite(v) and v > 0, "a finite number > 0")

    def in_unit_interval(key: str) -> None:  # [0, 1)
        v = number(key)
        need(key, v is not None and 0.0 <= v < 1.0, "in [0, 1)")

    def integer_in(key: str, low: int, high: int, why: str = "") -> None:
        v = get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > high:
            need(key, False, f"an integer in [{low}, {high}]{why}")
        need(key, isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}")

    for key in ("num_rounds", "data_threads", "lanes", "chunk_mb", "client.max_examples", "client.max_steps",
                "eval.every", "eval.finetune_steps", "max_clients_per_round"):
        integer_in(key, 0, INT32_MAX)
    for key in ("clients_per_round", "client.epochs", "eval.chunk_clients", "checkpoint.every", "checkpoint.keep"):
        integer_in(key, 1, INT32_MAX)
    integer_in("seed", 0, SEED_MAX, " (jax.random.PRNGKey keeps 32 bits of a seed: larger seeds would collide)")
    integer_in("model.num_classes", 1, INT32_MAX, " (labels are int32)")
    for key in ("client.batch_size", "eval.batch_size"):
        integer_in(key, 1, BATCH_SIZE_MAX, " (float32 counts a batch's examples exactly up to 2**24)")
    for key in ("client.learning_rate", "server.learning_rate", "server.eps"):
        positive_finite(key)
    for key in ("client.momentum", "server.momentum", "server.b1", "server.b2"):
        in_unit_interval(key)
    need("aggregation", get("aggregation") in AGGREGATIONS, f"one of {', '.join(AGGREGATIONS)}")
    need("nonfinite", get("nonfinite") in NONFINITE_POLICIES, f"one of {', '.join(NONFINITE_POLICIES)}")
    need("sampling", get("sampling") in SAMPLINGS, f"one of {', '.join(SAMPLINGS)}")
    rate = number("sampling_rate")
    need("sampling_rate", rate is not None and 0.0 <= rate <= 1.0, "in [0, 1] (0 = clients_per_round / N)")
    for key in ("data.path", "data.train_split", "data.test_split", "model.input_key", "model.label_key"):
        need(key, isinstance(get(key), str) and bool(get(key)), "a non-empty string")
    hidden = get("model.hidden")
    need("model.hidden", isinstance(hidden, list) and all(
        isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= INT32_MAX for h in hidden),
        f"a sequence of integers in [1, {INT32_MAX}]")
    need("model.conv_impl", get("model.conv_impl") in CONV_IMPLS, f"one of {', '.join(CONV_IMPLS)}")
    for key in ("model.loss_mask_ids", "model.accuracy_mask_ids"):
        ids = get(key)
        need(key, isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids),
             "a sequence of integers")
    if "model.name" in values:
        from fedstream.models import resolve_model

        resolve_model(get("model.name"), dirs)  # ConfigError naming model.name if it is neither registered nor found
    if "client.optimizer" in values or "server.optimizer" in values:
        from fedstream.algorithms.fedavg import OPTIMIZER_NAMES

        for key in ("client.optimizer", "server.optimizer"):
            need(key, get(key) in OPTIMIZER_NAMES, f"one of {', '.join(OPTIMIZER_NAMES)}")
    if "algorithm.name" in values:
        from fedstream.algorithms import check_options, resolve_algorithm

        name = get("algorithm.name")
        factory = resolve_algorithm(name, dirs)  # ConfigError naming algorithm.name
        options = flat_dict["algorithm"].get("options") or {}
        check_options(factory, options, types=True, context_ok=False, label=name)  # names algorithm.options.KEY
    if get("data.augment"):
        from fedstream.data.augment import AUGMENTATIONS

        need("data.augment", get("data.augment") in AUGMENTATIONS,
             f"'' or one of {', '.join(sorted(AUGMENTATIONS))}")
    if get("clock.enabled"):
        from fedstream.data.clock import ClockSettings

        need("sampling", get("sampling") == "uniform", "'uniform' with the simulated clock (clock.enabled: it "
             "samples among the clients online)")
        try:
            ClockSettings.from_config(flat_dict["clock"])  # names the clock.* key, or the trace file and line
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if num_train_clients is not None:
        check_clients_per_round(config, num_train_clients)


def check_clients_per_round(config: ml_collections.ConfigDict | Mapping[str, Any], num_train_clients: int) -> None:
    """Refuses a `clients_per_round` larger than the train split's population (the check that needs the data).

    Only this key is checked; the rest of the config is `validate_train_config`'s.
    """
    values = flatten(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
    clients = values.get("clients_per_round")
    if isinstance(clients, (int, float)) and not isinstance(clients, bool) and int(clients) > int(num_train_clients):
        split = values.get("data.train_split", values.get("train_split"))
        where = f" in {values['data.path']}" if values.get("data.path") else ""
        raise ConfigError(f"config key 'clients_per_round' is {clients}, more than the {num_train_clients} clients "
                          f"of split {split!r}{where}")
