"""`fedstream list`: what can be named on the command line and in configs, with one-line descriptions.

Recipes (`preprocess/`, for `fedstream preprocess`) and pipelines (`pipelines/`,
for `fedstream train`) are described by the first line of their module
docstring, read without importing them; models by their factory's or
module's docstring; algorithms by their registry; optimizers by a table.
`algorithm_options_text` describes one algorithm's declared options.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re

SECTIONS = ("recipes", "pipelines", "models", "algorithms", "optimizers")
OPTIMIZER_DESCRIPTIONS = {
    "sgd": "SGD with optional momentum; on the server at learning rate 1.0 it is plain FedAvg",
    "adam": "Adam (FedAdam on the server, Reddi et al. 2021)",
    "yogi": "Yogi (FedYogi on the server, Reddi et al. 2021)",
    "adagrad": "Adagrad (FedAdagrad on the server, Reddi et al. 2021)",
}


def _first_line(doc: str | None) -> str:
    """The first non-empty line of a docstring, without a trailing period."""
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip().rstrip(".")
    return ""


def package_modules(package: str) -> dict[str, str]:
    """Public modules of `package` (no leading underscore) -> first docstring line, without importing them.

    A recipe is listed under the name its docstring gives ("Recipe `fedjax-sqlite`: ..."), the spelling
    of the README, when that name is its module name with dashes for underscores; both spellings are
    accepted wherever a recipe or pipeline is named (`fedstream.config.load_module`).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return {}
    out: dict[str, str] = {}
    for location in spec.submodule_search_locations:
        for path in sorted(pathlib.Path(location).glob("*.py")):
            if path.stem.startswith("_") or path.stem in out or path.stem.replace("_", "-") in out:
                continue
            try:
                doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            except (OSError, SyntaxError, UnicodeDecodeError):
                doc = None
            # Recipes start "Recipe `name`: ..."; the name is already in the listing.
            line = _first_line(doc)
            match = re.match(r"^Recipe `([^`]*)`:\s*", line)
            name = match.group(1) if match and match.group(1).replace("-", "_") == path.stem else path.stem
            out[name] = line[match.end():] if match else line
    return out


def model_descriptions() -> dict[str, str]:
    """Registered model names -> a line from the factory's docstring or the module class's docstring."""
    from fedstream.models import model_factories

    out = {}
    for name, factory in sorted(model_factories().items()):
        doc = factory.__doc__ if getattr(factory, "__name__", "") != "<lambda>" else None
        if not doc:
            try:
                doc = type(factory(10)).__doc__
            except Exception:  # noqa: BLE001 - a factory that needs more arguments: no description
                doc = None
        out[name] = _first_line(doc)
    return out


def algorithm_descriptions() -> dict[str, str]:
    """Registered algorithms and their one-line descriptions (`fedstream.algorithms.algorithm_names()`)."""
    from fedstream.algorithms import algorithm_names

    return algorithm_names()


def algorithm_options_text(name: str) -> str:
    """The text `fedstream list --algorithm NAME` prints: the algorithm's description and its options
    (`algorithm.options.KEY`) with type, default and doc."""
    from fedstream.algorithms import accepts_any_option, algorithm_names, algorithm_options, resolve_algorithm
    from fedstream.config import search_dirs

    factory = resolve_algorithm(name, search_dirs())
    target = getattr(factory, "func", factory)  # a functools.partial's function
    description = algorithm_names().get(name) or _first_line(getattr(target, "__doc__", None))
    specs = algorithm_options(factory)
    lines = [f"{name}: {description}".rstrip(": "), ""]
    if not specs:
        lines.append("options: none" + (" declared (takes any keyword option)" if accepts_any_option(factory) else ""))
        return "\n".join(lines)
    lines.append("options (--config.algorithm.options.NAME=VALUE):")
    rows = [("NAME", "TYPE", "DEFAULT", "DOC")] + [
        (spec.name, spec.type_name or "any", "(required)" if spec.required else repr(spec.default), spec.doc)
        for spec in specs.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        lines.append("  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(row[:3], widths)) + f"  {row[3]}".rstrip())
    return "\n".join(lines)


def optimizer_descriptions() -> dict[str, str]:
    """Optimizer names accepted by client.optimizer and server.optimizer."""
    from fedstream.algorithms import OPTIMIZER_NAMES

    return {name: OPTIMIZER_DESCRIPTIONS.get(name, "") for name in OPTIMIZER_NAMES}


def catalog(sections: tuple[str, ...] = SECTIONS) -> str:
    """The text `fedstream list` prints."""
    headers = {
        "recipes": ("recipes", ("fedstream preprocess NAME --output DIR; - and _ alike in NAME; or a path to your "
                                "own recipe .py"),
                    lambda: package_modules("fedstream.recipes")),
        "pipelines": ("pipelines", "fedstream train NAME --workdir DIR; or a path to your own config .py",
                      lambda: package_modules("fedstream.pipelines")),
        "models": ("models", "config key model.name", model_descriptions),
        "algorithms": ("algorithms", "config key algorithm.name; options: fedstream list --algorithm NAME",
                       algorithm_descriptions),
        "optimizers": ("optimizers", "config keys client.optimizer and server.optimizer", optimizer_descriptions),
    }
    blocks = []
    for section in sections:
        title, usage, entries = headers[section]
        items = entries()
        width = max((len(n) for n in items), default=0)
        lines = [f"{title} ({usage}):"] + [f"  {name:<{width}}  {text}".rstrip() for name, text in items.items()]
        if not items:
            lines.append("  (none)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
