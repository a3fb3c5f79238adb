"""`fedstream preprocess`: run a recipe once into a dataset directory.

A recipe is a module (in `preprocess/`, installed as `fedstream.recipes`, or
any `.py` file; see preprocess/README.md) with:

    get_config() -> ml_collections.ConfigDict       # every knob, incl. seed
    schema(config) -> Schema                        # feature name -> FeatureSpec
    generate(config) -> Iterator[(split, client_id, {feature: array[n, ...]})]
    SOURCE: str                                     # provenance and license
    expected_counts(config) -> {split: (clients, examples)}   # optional check
    counts_hint(config, counts) -> str                        # optional: explains a count mismatch
    fingerprint(config) -> str                      # optional: identity of the inputs

The output is streamed through `DatasetWriter` (temporary directory renamed
into place at the end, so a failure leaves nothing behind). Rerunning onto a
complete output made by the same recipe, config, input fingerprint and
compression is a no-op; a different one needs `force`. A directory that is
not a fedstream dataset is never replaced.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from fedstream import __version__
from fedstream.config import ConfigError, apply_overrides, load_module, to_json
from fedstream.data.format import METADATA_FILE, SUCCESS_FILE
from fedstream.data.writer import DEFAULT_COMPRESSION, DatasetWriter, recover_interrupted_swap, shard_compression

RECIPES_PACKAGE = "fedstream.recipes"
PROGRESS_EVERY_S = 2.0


def recipe_name(recipe: str) -> str:
    """The name recorded in the metadata: the module name, or a recipe file's stem."""
    if recipe.endswith(".py") or "/" in recipe:
        return pathlib.Path(recipe).stem
    return recipe.replace("-", "_")


def up_to_date(output: pathlib.Path, name: str, config_json: Any, fingerprint: str | None, compression: str,
               force: bool, say: Callable[[str], None]) -> bool:
    """True (and says so) if `output` already holds this recipe's dataset from the same config, input and
    compression; False if there is none, or `force`. Raises ConfigError for another dataset without `force`."""
    existing = _existing_metadata(output, force)
    if existing is None:
        return False
    same = (existing.get("recipe") == name and existing.get("config") == config_json
            and existing.get("input_fingerprint") == fingerprint
            and shard_compression(existing.get("shard_options", "")) == compression)
    if same and not force:
        say(f"{output} is up to date ({name}, same config); pass --force to rebuild it")
        return True
    if not force:
        raise ConfigError(f"{output} already holds a dataset from recipe {existing.get('recipe')!r} with a "
                          "different config, input or compression; pass --force to replace it or choose "
                          "another --output")
    return False


def _existing_metadata(output: pathlib.Path, force: bool) -> dict[str, Any] | None:
    """Metadata of a complete dataset at `output`, None if there is nothing to compare with.

    Refuses (even with `force`) to replace anything that is not a fedstream dataset. An earlier
    `--force` replacement that a kill interrupted is finished or rolled back first.
    """
    recover_interrupted_swap(output)
    if not output.exists():
        return None
    if not output.is_dir():
        raise ConfigError(f"{output} exists and is not a directory; choose another --output")
    if (output / SUCCESS_FILE).exists():
        try:
            return json.loads((output / METADATA_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            if force:
                return None
            raise ConfigError(f"{output / METADATA_FILE}: unreadable ({e}); "
                              "pass --force to replace the dataset") from None
    if not any(output.iterdir()):
        return None
    if (output / METADATA_FILE).exists() and force:
        return None  # an incomplete fedstream dataset
    raise ConfigError(f"{output} is a non-empty directory but not a complete fedstream dataset; refusing to "
                      "replace it (remove it yourself or choose another --output)")


def run_preprocess(
    recipe: str,
    output: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    force: bool = False,
    compression: str = DEFAULT_COMPRESSION,
    progress: Callable[[str], None] | None = print,
) -> pathlib.Path:
    """Writes the dataset of `recipe` (name or .py path) with config `overrides` into `output`.

    Overrides are `key=value` strings (an unknown key is a ConfigError naming it).
    `compression` is the shards' ArrayRecord compression (see `DatasetWriter`).
    Returns the output path.
    """
    say = progress or (lambda _: None)
    module = load_module(recipe, RECIPES_PACKAGE)
    for attr in ("get_config", "schema", "generate"):
        if not callable(getattr(module, attr, None)):
            raise ConfigError(f"recipe {recipe!r} has no {attr}() function")
    if not isinstance(getattr(module, "SOURCE", None), str):
        raise ConfigError(f"recipe {recipe!r} has no SOURCE string (one line of provenance and license)")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"recipe {recipe!r}: get_config() must return an ml_collections.ConfigDict")
    config = apply_overrides(config, overrides)
    name = recipe_name(recipe)
    config_json = json.loads(to_json(config))
    fingerprint = str(module.fingerprint(config)) if callable(getattr(module, "fingerprint", None)) else None
    output = pathlib.Path(output)

    if up_to_date(output, name, config_json, fingerprint, compression, force, say):
        return output

    metadata = {"recipe": name, "config": config_json, "source": module.SOURCE, "seed": config_json.get("seed"),
                "fedstream_version": __version__}
    if fingerprint is not None:
        metadata["input_fingerprint"] = fingerprint
    schema = module.schema(config)
    say(f"preprocessing {name} into {output}")
    counts: dict[str, list[int]] = {}  # split -> [clients, examples]
    start = last = time.perf_counter()
    with DatasetWriter(output, schema, metadata=metadata, compression=compression) as writer:
        for split, client_id, data in module.generate(config):
            writer.add_client(split, client_id, data)
            tally = counts.setdefault(split, [0, 0])
            tally[0] += 1
            tally[1] += len(next(iter(data.values())))
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                clients, examples = (sum(t[i] for t in counts.values()) for i in (0, 1))
                say(f"  {clients:,} clients written ({examples:,} examples, {examples / (now - start):,.0f} ex/s)")
        if callable(getattr(module, "assets", None)):  # e.g. a vocabulary, stored as assets/<name>
            for asset_name, data in module.assets(config).items():
                writer.add_asset(asset_name, data)
        if callable(getattr(module, "expected_counts", None)):
            # A recipe's `check_counts` config key set to False turns a mismatch into a warning; its optional
            # `counts_hint(config, counts)` explains a mismatch (e.g. the other variant of a dataset).
            advice = (module.counts_hint(config, {k: tuple(v) for k, v in counts.items()})
                      if callable(getattr(module, "counts_hint", None)) else "")
            _check_counts(counts, module.expected_counts(config), name, strict=bool(config.get("check_counts", True)),
                          hint=advice + (" (--config.check_counts=False accepts other counts)"
                                         if "check_counts" in config else ""))
    summary = "; ".join(f"{split}: {c:,} clients / {n:,} examples" for split, (c, n) in counts.items())
    say(f"wrote {summary or 'no clients'} to {output} in {time.perf_counter() - start:.1f} s")
    return output


def _check_counts(counts: Mapping[str, Sequence[int]], expected: Mapping[str, tuple[int, int]], recipe: str,
                  strict: bool = True, hint: str = "") -> None:
    """Raises (or, if not `strict`, warns) if the written (clients, examples) per split differ from the expectation."""
    for split in sorted(set(expected) | set(counts)):
        got = tuple(counts.get(split, (0, 0)))
        want = tuple(expected.get(split, (0, 0)))
        if got != want:
            message = (f"recipe {recipe!r}: split {split!r} has {got[0]} clients / {got[1]} examples, "
                       f"expected {want[0]} / {want[1]}")
            if strict:
                raise ValueError(message + hint)
            warnings.warn(message, stacklevel=2)
