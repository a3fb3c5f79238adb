"""Federated algorithms, selectable by name from a pipeline config (`config.algorithm`).

Every algorithm implements the interface `fedstream.algorithms.base.Algorithm`
(its docstring is the contract: hooks, `Contribution`, capabilities); the
round runner executes them sharded over devices, streamed and checkpointed.

An algorithm is a class or factory `f(model, client_optimizer,
server_optimizer, **options)`. Its options are declared by its signature:
the dataclass fields of an algorithm class (or the keyword parameters of a
factory) after those three, with their types and defaults, documented in an
`Options:` (or `Attributes:`) section of its docstring; `algorithm_options`
lists them and `fedstream list --algorithm NAME` prints them. Parameters named
like the facts of the run in `CONTEXT_KEYS` are filled in by the train loop
and are not options.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import numbers
import re
import types
import typing
from typing import Any, Callable, Mapping, Sequence

import optax

from fedstream.algorithms.base import Algorithm, Contribution, RoundTotal
from fedstream.algorithms.fedavg import OPTIMIZER_NAMES, FedAvg, ServerState, make_optimizer
from fedstream.algorithms.scaffold import Scaffold
from fedstream.config import ConfigError, is_attribute_name, load_attribute
from fedstream.models import Model

AlgorithmFactory = Callable[..., Algorithm]
_ALGORITHMS: dict[str, tuple[AlgorithmFactory, str]] = {
    "fedavg": (FedAvg, "FedAvg / FedOpt (McMahan et al. 2017; Reddi et al. 2021): server optimizer on the mean delta"),
    "scaffold": (Scaffold, "SCAFFOLD (Karimireddy et al. 2020), option II control variates in the client-state store"),
}
# Facts of the run that the train loop passes to a factory whose signature asks for them (`context`).
CONTEXT_KEYS = ("population", "client_learning_rate", "sampling", "sampling_rate", "clients_per_round", "num_rounds")
# The positional arguments every algorithm takes first.
_BUILT_FROM = ("model", "client_optimizer", "server_optimizer")
REQUIRED = inspect.Parameter.empty  # the `default` of an option without one


def register_algorithm(name: str, factory: AlgorithmFactory, description: str) -> None:
    """Adds `factory(model, client_optimizer, server_optimizer, **options)` under `name`."""
    _ALGORITHMS[name] = (factory, description)


def algorithm_names() -> dict[str, str]:
    """Registered algorithm names and one-line descriptions."""
    return {name: description for name, (_, description) in sorted(_ALGORITHMS.items())}


def resolve_algorithm(name: str | AlgorithmFactory, search: Sequence[Any] = ()) -> AlgorithmFactory:
    """The class or factory that `name` (config key `algorithm.name`) stands for.

    `name` is a registered name, `module:attribute` or `path/to/file.py:attribute`
    (a relative file is looked up in `search`, by default the cwd); a callable is
    returned as is. Raises a one-line ConfigError naming the key.
    """
    if callable(name):
        return name
    if name in _ALGORITHMS:
        return _ALGORITHMS[name][0]
    if is_attribute_name(name):
        return load_attribute(name, "algorithm.name", search)
    raise ConfigError(f"config key 'algorithm.name' must be one of {', '.join(sorted(_ALGORITHMS))} (registered), "
                      f"module:attribute or path/to/file.py:attribute, got {name!r} (unknown algorithm)")


# --- declared options ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One declared option of an algorithm: its name, type, default and one-line doc."""

    name: str
    annotation: Any  # the resolved type (typing form), or Any when undeclared or unresolvable
    type_name: str  # the annotation as written, e.g. 'float' or 'Sequence[float] | None'
    default: Any  # REQUIRED when the option has no default
    doc: str

    @property
    def required(self) -> bool:
        """Whether the option has no default."""
        return self.default is REQUIRED

    def accepts(self, value: Any) -> bool:
        """Whether `value` (a config value: a literal, list, tuple or dict) fits the declared type.

        An int is accepted for a float, a list or tuple for a sequence, a dict for a mapping.
        """
        return _accepts(self.annotation, value)


def _accepts(tp: Any, value: Any) -> bool:
    if tp is Any or tp is REQUIRED or isinstance(tp, (str, typing.TypeVar)):
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is typing.ClassVar or origin is typing.Annotated:
        return _accepts(args[0], value) if args else True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    container = origin or tp
    if container in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_accepts(a, v) for a, v in zip(args, value))
        return not args or all(_accepts(args[0], v) for v in value)
    if container in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return isinstance(value, collections.abc.Mapping)
    if isinstance(container, type):
        return isinstance(value, container)
    return True


_SECTION = re.compile(r"^(\s*)(Options|Attributes)\b[^:\n]*:\s*$")
_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*/\s*[A-Za-z_]\w*)*)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def docstring_options(doc: str | None) -> dict[str, str]:
    """`name: text` entries of the `Options:` and `Attributes:` sections of a Google-style docstring.

    Continuation lines (indented deeper) are joined; `a / b: text` documents both.
    """
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    i = 0
    while i < len(lines):
        section = _SECTION.match(lines[i])
        i += 1
        if not section:
            continue
        header_indent, entry_indent, current = len(section.group(1)), None, []
        while i < len(lines):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            if line.strip() and indent <= header_indent:
                break
            i += 1
            if not line.strip():
                continue
            entry = _ENTRY.match(line)
            if entry and (entry_indent is None or indent <= entry_indent):
                entry_indent = indent
                current = [n.strip() for n in entry.group(2).split("/")]
                for name in current:
                    out.setdefault(name, entry.group(3).strip())
            elif current:
                for name in current:
                    out[name] = f"{out[name]} {line.strip()}".strip()
    return out


def _unwrap(factory: Any) -> tuple[Any, dict[str, Any]]:
    """The function or class under `functools.partial` layers, and the keywords they bind."""
    bound: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        bound = {**factory.keywords, **bound}
        factory = factory.func
    return factory, bound


def _type_hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj.__init__ if isinstance(obj, type) and not dataclasses.is_dataclass(obj)
                                     else obj)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: its option is checked loosely
        return {}


def _docs(target: Any) -> dict[str, str]:
    docs: dict[str, str] = {}
    sources = [c.__doc__ for c in inspect.getmro(target)] if isinstance(target, type) else [target.__doc__]
    if isinstance(target, type) and not dataclasses.is_dataclass(target):
        sources.insert(1, getattr(target.__init__, "__doc__", None))
    for doc in sources:
        for name, text in docstring_options(doc).items():
            docs.setdefault(name, text)
    return docs


def _signature(factory: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def accepts_any_option(factory: Any) -> bool:
    """Whether a factory takes `**kwargs` (then any option name is passed on unchecked)."""
    signature = _signature(factory)
    return signature is not None and any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def algorithm_options(name: str | AlgorithmFactory, search: Sequence[Any] = ()) -> dict[str, OptionSpec]:
    """The options an algorithm declares (`algorithm.options.KEY`), by name, in declaration order.

    For an algorithm class (a dataclass): its fields after model,
    client_optimizer and server_optimizer; for a factory: its parameters after
    those three. Parameters bound by `functools.partial`, `**kwargs`, and the
    train loop's `CONTEXT_KEYS` are not options. Docs come from the `Options:`
    or `Attributes:` section of the class's (or a base class's) or factory's
    docstring.
    """
    factory = resolve_algorithm(name, search)
    target, bound = _unwrap(factory)
    hints, docs = _type_hints(target), _docs(target)
    specs: dict[str, OptionSpec] = {}
    if isinstance(target, type) and dataclasses.is_dataclass(target):
        for f in dataclasses.fields(target):
            if not f.init or f.name in _BUILT_FROM or f.name in CONTEXT_KEYS or f.name in bound:
                continue
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED)
            type_name = f.type if isinstance(f.type, str) else _type_name(f.type)
            specs[f.name] = OptionSpec(f.name, hints.get(f.name, Any), type_name, default, docs.get(f.name, ""))
        return specs
    signature = _signature(factory)
    if signature is None:
        return specs
    positional = 0
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional < len(_BUILT_FROM):
            positional += 1
            continue
        if p.name in CONTEXT_KEYS or p.name in bound:
            continue
        annotation = p.annotation
        type_name = ("" if annotation is p.empty else annotation if isinstance(annotation, str)
                     else _type_name(annotation))
        specs[p.name] = OptionSpec(p.name, hints.get(p.name, Any), type_name, p.default, docs.get(p.name, ""))
    return specs


def _label(factory: Any) -> str:
    """A factory's registered name, or its qualified name."""
    for name, (registered, _) in _ALGORITHMS.items():
        if registered is factory:
            return name
    target, _ = _unwrap(factory)
    return getattr(target, "__qualname__", repr(factory))


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def check_options(name: str | AlgorithmFactory, options: Mapping[str, Any], *, types: bool = False,
                  context_ok: bool = True, label: str | None = None, search: Sequence[Any] = ()) -> None:
    """Refuses options that `name` does not declare (ConfigError naming `algorithm.options.KEY` and the known
    ones), a missing required option, and, with `types`, a value of the wrong type.

    With `context_ok`, the train loop's facts (`CONTEXT_KEYS`) that the factory
    takes may be given too (the Python API). A factory with `**kwargs` takes any
    other name. `label` names the algorithm in messages (default: `name`).
    """
    factory = resolve_algorithm(name, search)
    label = label or (name if isinstance(name, str) else _label(factory))
    specs = algorithm_options(factory)
    signature = _signature(factory)
    parameters = signature.parameters if signature is not None else {}
    for key, value in options.items():
        spec = specs.get(key)
        if spec is None:
            if context_ok and key in CONTEXT_KEYS and key in parameters:
                continue
            if key in CONTEXT_KEYS and key in parameters:
                raise ConfigError(f"config key 'algorithm.options.{key}': {key} is a fact of the run, set by the "
                                  f"train loop, not an option of algorithm {label!r}")
            if accepts_any_option(factory):
                continue
            known = f"its options: {', '.join(specs)}" if specs else "it has no options"
            raise ConfigError(f"config key 'algorithm.options.{key}': algorithm {label!r} has no option {key!r} "
                              f"({known})")
        if types and not spec.accepts(value):
            raise ConfigError(f"config key 'algorithm.options.{key}' expects {spec.type_name or 'any'}, got "
                              f"{value!r}")
    missing = [k for k, spec in specs.items() if spec.required and k not in options]
    if missing:
        raise ConfigError(f"config key 'algorithm.options.{missing[0]}' is required by algorithm {label!r} "
                          f"({specs[missing[0]].type_name or 'any'}, no default)")


def build_algorithm(name: str | AlgorithmFactory, model: Model, client_optimizer: optax.GradientTransformation,
                    server_optimizer: optax.GradientTransformation, *, context: dict[str, Any] | None = None,
                    **options: Any) -> Algorithm:
    """Builds the algorithm `name` (registered, `module:attribute`, `file.py:attribute`, or the class or factory
    itself) with its options (config key `algorithm.options`).

    Option names are checked against the declared ones first (`check_options`);
    an error the factory raises itself (ValueError, TypeError, ...) propagates
    unchanged. `context` holds facts of the run (`CONTEXT_KEYS`: population,
    client_learning_rate, ...), passed to factories whose signature asks for them.
    """
    factory = resolve_algorithm(name)
    check_options(factory, options, label=name if isinstance(name, str) else None)
    signature = _signature(factory)
    accepted = signature.parameters if signature is not None else {}
    extra = {k: v for k, v in (context or {}).items() if k in accepted and k not in options}
    return factory(model, client_optimizer, server_optimizer, **extra, **options)


# These modules call register_algorithm on import, so they come after it.
from fedstream.algorithms import agnostic_fedavg, fednova, fedprox, hyp_cluster, mime, mimelite  # noqa: E402,F401
from fedstream.algorithms import dp_fedavg  # noqa: E402,F401  (dp_fedavg, compressed_fedavg)
from fedstream.algorithms import dp_ftrl  # noqa: E402,F401  (dp_ftrl)
from fedstream.algorithms import ditto  # noqa: E402,F401
from fedstream.algorithms import apfl  # noqa: E402,F401
from fedstream.algorithms import fedbuff  # noqa: E402,F401

__all__ = ["Algorithm", "Contribution", "RoundTotal", "FedAvg", "ServerState", "make_optimizer",
           "OPTIMIZER_NAMES", "register_algorithm", "algorithm_names", "build_algorithm", "resolve_algorithm",
           "algorithm_options", "check_options", "OptionSpec", "CONTEXT_KEYS", "REQUIRED", "docstring_options",
           "accepts_any_option"]
