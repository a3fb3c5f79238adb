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


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value else None
    except ValueError:
        raise SystemExit(f"fedstream: environment variable {name}={value!r} is not an integer") from None


def init_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process JAX run when asked to; must run before any other JAX call."""
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if not args.distributed and any(v is None for v in explicit):
        raise SystemExit("fedstream: a multi-process run needs --coordinator-address, --num-processes and "
                         "--process-id together (or --distributed on a cluster JAX detects)")
    import jax

    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedstream", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preprocess", help="convert a dataset into the fedstream format, once")
    p.add_argument("recipe", help="recipe name (e.g. digits, synthetic, arrays) or path to a recipe .py")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument("--force", action="store_true", help="rewrite a complete output directory")
    p.add_argument("--source", help="an already-downloaded upstream file or directory for recipes that download "
                                    "(the same as --config.source=...)")
    p.add_argument("--compression", default="uncompressed",
                   help="shard compression: uncompressed (fastest to read, default), snappy, zstd:1, zstd:3, ...")
    t = sub.add_parser("train", help="run or resume an experiment")
    t.add_argument("pipeline", help="pipeline name (e.g. digits_fedavg) or path to a config .py")
    t.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics); resumed if it exists")
    d = t.add_argument_group("multi-process (one command per host; see docs/multihost.md)")
    d.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with the cluster's auto-detected settings "
                        "(TPU pods, SLURM, Open MPI, ...)")
    d.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="host:port of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    d.add_argument("--num-processes", type=int, default=_env_int("FEDSTREAM_NUM_PROCESSES"),
                   help="number of processes (env FEDSTREAM_NUM_PROCESSES)")
    d.add_argument("--process-id", type=int, default=_env_int("FEDSTREAM_PROCESS_ID"),
                   help="this process's id, 0..num_processes-1 (env FEDSTREAM_PROCESS_ID)")
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

            if args.source:
                overrides.append(f"source={args.source}")
            run_preprocess(args.recipe, args.output, overrides, force=args.force, compression=args.compression)
        elif args.command == "train":
            from fedstream.config import load_config
            from fedstream.training.train import train

            config = load_config(args.pipeline, "fedstream.pipelines", overrides)
            init_distributed(args)
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
