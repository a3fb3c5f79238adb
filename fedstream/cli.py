"""The `fedstream` command: preprocess, train, inspect.

    fedstream preprocess RECIPE --output DIR [--force] [--config.key=value ...]
    fedstream train PIPELINE --workdir DIR [--config.key=value ...]
    fedstream inspect DIR

RECIPE and PIPELINE are names (resolved in `preprocess/` and `pipelines/`)
or paths to `.py` files with a `get_config()`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.k=v` / `--config.k v` items from the other arguments."""
    rest, overrides = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--config."):
            if "=" in item:
                overrides.append(item[len("--config."):])
            elif i + 1 < len(items):
                overrides.append(f"{item[len('--config.'):]}={items[i + 1]}")
                i += 1
            else:
                raise SystemExit(f"fedstream: {item} needs a value")
        else:
            rest.append(item)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedstream", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preprocess", help="convert a dataset into the fedstream format, once")
    p.add_argument("recipe", help="recipe name (e.g. digits, synthetic, arrays) or path to a recipe .py")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument("--force", action="store_true", help="rewrite a complete output directory")
    p.add_argument("--compression", default="uncompressed",
                   help="shard compression: uncompressed (fastest to read, default), snappy, zstd:1, zstd:3, ...")
    t = sub.add_parser("train", help="run or resume an experiment")
    t.add_argument("pipeline", help="pipeline name (e.g. digits_fedavg) or path to a config .py")
    t.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics); resumed if it exists")
    i = sub.add_parser("inspect", help="summarise a preprocessed dataset")
    i.add_argument("path", help="dataset directory")
    i.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedstream` console script."""
    from fedstream.config import ConfigError
    from fedstream.data.format import DatasetFormatError

    args_list, overrides = _split_overrides(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    if overrides and args.command == "inspect":
        raise SystemExit("fedstream inspect takes no --config overrides")
    try:
        if args.command == "preprocess":
            from fedstream.data.preprocessing import run_preprocess

            run_preprocess(args.recipe, args.output, overrides, force=args.force, compression=args.compression)
        elif args.command == "train":
            from fedstream.config import load_config
            from fedstream.training.train import train

            config = load_config(args.pipeline, "fedstream.pipelines", overrides)
            train(config, args.workdir)
        else:
            from fedstream.data.inspect import describe_dataset
            from fedstream.data.reader import FederatedDataset

            print(describe_dataset(args.path))
            if args.verify:
                FederatedDataset(args.path).verify()
                print("verify: all shard checksums match")
    except (ConfigError, DatasetFormatError, FileNotFoundError, ValueError) as e:
        # Bad input (config, dataset, recipe arguments): one line, no traceback,
        # unless FEDSTREAM_DEBUG is set.
        if os.environ.get("FEDSTREAM_DEBUG"):
            raise
        print(f"fedstream: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
