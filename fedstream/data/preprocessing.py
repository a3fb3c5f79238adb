"""`fedstream preprocess`: run a recipe once into a dataset directory.

A recipe is a module (in `preprocess/`, installed as `fedstream.recipes`, or
any `.py` file) with:

    get_config() -> ml_collections.ConfigDict       # every knob, incl. seed
    schema(config) -> Schema                        # feature name -> FeatureSpec
    generate(config) -> Iterator[(split, client_id, {feature: array[n, ...]})]
    SOURCE: str                                     # provenance and license
    expected_counts(config) -> {split: (clients, examples)}   # optional check

The output is streamed through `DatasetWriter` (temporary directory renamed
into place at the end). Rerunning onto a complete output made by the same
recipe and config is a no-op; a different one needs `force`.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Callable, Sequence

from fedstream import __version__
from fedstream.config import ConfigError, load_config, load_module, to_json
from fedstream.data.format import METADATA_FILE, SUCCESS_FILE
from fedstream.data.writer import DEFAULT_COMPRESSION, DatasetWriter

RECIPES_PACKAGE = "fedstream.recipes"


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

    `compression` is the shards' ArrayRecord compression (see `DatasetWriter`).
    """
    say = progress or (lambda _: None)
    module = load_module(recipe, RECIPES_PACKAGE)
    for attr in ("get_config", "schema", "generate"):
        if not hasattr(module, attr):
            raise ConfigError(f"recipe {recipe!r} has no {attr}() function")
    config = load_config(recipe, RECIPES_PACKAGE, overrides)
    recipe_name = pathlib.Path(recipe).stem if recipe.endswith(".py") else recipe.replace("-", "_")
    config_json = json.loads(to_json(config))
    output = pathlib.Path(output)

    if (output / SUCCESS_FILE).exists():
        existing = json.loads((output / METADATA_FILE).read_text())
        same = (existing.get("recipe") == recipe_name and existing.get("config") == config_json
                and existing.get("shard_options") == f"group_size:1,{compression}")
        if same and not force:
            say(f"{output} is up to date ({recipe_name}); pass --force to rebuild it")
            return output
        if not force:
            raise ConfigError(f"{output} already holds a dataset from recipe {existing.get('recipe')!r} with a "
                              "different config or compression; pass --force to replace it or choose another --output")

    metadata = {"recipe": recipe_name, "config": config_json, "source": getattr(module, "SOURCE", ""),
                "seed": config_json.get("seed"), "fedstream_version": __version__}
    say(f"preprocessing {recipe_name} into {output}")
    start = last = time.perf_counter()
    clients = examples = 0
    with DatasetWriter(output, module.schema(config), metadata=metadata, compression=compression) as writer:
        for split, client_id, data in module.generate(config):
            writer.add_client(split, client_id, data)
            clients += 1
            examples += len(next(iter(data.values())))
            now = time.perf_counter()
            if now - last > 2.0:
                last = now
                say(f"  {clients:,} client splits, {examples:,} examples written ({examples / (now - start):,.0f} ex/s)")
        if hasattr(module, "expected_counts"):
            _check_counts(writer, module.expected_counts(config), recipe_name)
        summary = "; ".join(f"{split}: {len(state.client_ids):,} clients / {sum(state.count):,} examples"
                            for split, state in writer._splits.items())
    say(f"wrote {summary} to {output} in {time.perf_counter() - start:.1f} s")
    return output


def _check_counts(writer: DatasetWriter, expected: dict, recipe: str) -> None:
    for split, (num_clients, num_examples) in expected.items():
        state = writer._splits.get(split)
        got = (len(state.client_ids), sum(state.count)) if state else (0, 0)
        if got != (num_clients, num_examples):
            raise ValueError(f"recipe {recipe!r}: split {split!r} has {got[0]} clients / {got[1]} examples, "
                             f"expected {num_clients} / {num_examples}")
