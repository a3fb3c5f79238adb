"""`fedstream eval`: evaluate a saved checkpoint of a run on any split of its dataset; the stored run's config.

    fedstream eval --workdir checkpoints/digits --split train --step 50
    fedstream eval digits_fedavg --workdir checkpoints/digits --config.data.path=data/digits

Without a pipeline, the config is the one stored in the checkpoint, with any
`--config` overrides on top. With a pipeline, the pipeline and overrides must be
those of the run. Either way only keys that do not change the trained model may
differ from the run's (num_rounds, data_threads, eval.*, checkpoint.*, and for
eval data.path: a moved dataset); any other is refused, naming it. The
checkpoint is opened read-only, so evaluating a run that is still training is
safe: nothing in the workdir is written or cleaned up.

`read_run_config` and `resume_config` give `fedstream train` (and `fedstream
config`) the config of a run already in a workdir.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping

import ml_collections
import orbax.checkpoint as ocp

from fedstream.config import ConfigError, apply_overrides, flatten, set_value, validate_train_config
from fedstream.training.checkpoint import (RESUMABLE_KEYS, RESUME_HINT, RunCheckpointer, check_config_unchanged,
                                           check_meta)

EVAL_HINT = "eval compares the given pipeline and overrides with the run's (without a pipeline it uses the run's config)"


def read_run_config(workdir: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
    """(step, config) of the newest committed checkpoint in `workdir` whose metadata reads back intact, or None.

    Reads the JSON metadata item of Orbax's step directory directly, without
    JAX, so that a command can decide on its config before joining a
    multi-process run.
    """
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)
    for step in steps:  # a committed step is a directory named by its number (Orbax renames it atomically)
        try:
            meta = json.loads((directory / str(step) / "meta" / "metadata").read_text())
            check_meta(meta)  # its digest: a damaged config is not taken for the run's
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return step, meta["config"]
    return None


def _overridden(key: str, overrides: Iterable[str]) -> bool:
    names = [item.split("=", 1)[0].removeprefix("--").removeprefix("config.") for item in overrides]
    return any(key == n or key.startswith(n + ".") for n in names)


def resume_config(saved: Mapping[str, Any], config: ml_collections.ConfigDict | None, overrides: Iterable[str],
                  workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config that continues the run whose stored config is `saved`.

    Without `config` (no pipeline): `saved` with `overrides` applied. With
    `config` (the pipeline's, overrides applied): it must agree with `saved` on
    every key that changes results (ConfigError naming the first that does not),
    and keys that may change on resume (num_rounds, data_threads, eval.*,
    checkpoint.*) keep the run's values unless `overrides` name them. So a
    resume never silently extends a run to the pipeline's num_rounds.
    """
    overrides = list(overrides)
    if config is None:
        resumed = apply_overrides(ml_collections.ConfigDict(dict(saved)), overrides)
    else:
        check_config_unchanged(saved, config.to_dict(), workdir,
                               hint=f"{RESUME_HINT}; without a pipeline, 'fedstream train --workdir {workdir}' "
                                    "resumes with the run's own config")
        resumed = apply_overrides(config, [])
        present = flatten(resumed.to_dict())
        for key, value in flatten(dict(saved)).items():
            resumable = any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_KEYS)
            if resumable and key in present and not _overridden(key, overrides):
                set_value(resumed, key, value)
    check_config_unchanged(saved, resumed.to_dict(), workdir)
    return resumed


class ReadOnlyCheckpointer(RunCheckpointer):
    """A RunCheckpointer that never saves, deletes or cleans up temporary directories (safe on a live run)."""

    def __init__(self, workdir: str | os.PathLike) -> None:  # noqa: D107 - no super(): a different manager
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        if not self.directory.is_dir():
            raise ConfigError(f"{workdir}: no checkpoints/ directory (not a fedstream workdir, or no round saved yet)")
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
                                               cleanup_tmp_directories=False, enable_async_checkpointing=False)
        from absl import logging as absl_logging

        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns that a read-only directory is read-only
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        finally:
            absl_logging.set_verbosity(verbosity)

    def steps(self) -> list[int]:
        """Complete checkpoint steps (rounds completed), ascending."""
        return sorted(int(s) for s in self.manager.all_steps())

    def close(self) -> None:
        self.manager.close()


def evaluate_checkpoint(config: ml_collections.ConfigDict | None, workdir: str | os.PathLike, *,
                        split: str | None = None, step: int | None = None, log: Callable[[str], None] = print,
                        overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Evaluates checkpoint `step` (default: the latest) of the run in `workdir` on `split`
    (default: `config.data.test_split`).

    `config` None means the run's own config, stored in the checkpoint
    (`RunCheckpointer.read_meta(step)["config"]`), with `overrides` on top.
    Returns the summary of `train.evaluate_state` (loss, accuracy, client means,
    counts) plus `round` and `split`. Raises ConfigError for a missing
    checkpoint, step or split and for a config that is not the run's (only
    `RESUMABLE_KEYS` and data.path may differ).
    """
    import jax

    from fedstream.training.rounds import make_mesh, replicate
    from fedstream.training.train import build_algorithm, evaluate_state, open_dataset

    if config is not None:
        validate_train_config(config)
    checkpointer = ReadOnlyCheckpointer(workdir)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise ConfigError(f"{workdir}: no complete checkpoint yet")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ConfigError(f"{workdir}: no checkpoint of step {step}; kept steps: {', '.join(map(str, steps))}")
        saved = checkpointer.read_meta(step)["config"]
        if config is None:
            config = apply_overrides(ml_collections.ConfigDict(saved), overrides)
            validate_train_config(config)
        # A moved dataset is the same data: data.path may differ.
        same_data = {**saved, "data": {**saved.get("data", {}), "path": config.data.path}}
        check_config_unchanged(same_data, config.to_dict(), workdir, hint=EVAL_HINT)

        dataset = open_dataset(config, log, for_training=False)
        split = split or str(config.data.test_split)
        if split not in dataset.splits:
            raise ConfigError(f"dataset {config.data.path} has no split {split!r} (splits: {', '.join(dataset.splits)})")
        algorithm = build_algorithm(config, dataset)
        mesh = make_mesh()
        like = replicate(algorithm.init(jax.random.PRNGKey(int(config.seed))), mesh)
        state, _ = checkpointer.restore(step, like)
    finally:
        checkpointer.close()
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.data.test_split = split
    result = evaluate_state(algorithm, state, dataset, eval_config, mesh)  # per-cluster models for HypCluster
    return {"round": int(step), "split": split, **result}


def format_result(result: Mapping[str, Any], workdir: str | os.PathLike) -> str:
    """One line for the terminal."""
    return (f"{workdir} after round {result['round']}, split {result['split']!r}: accuracy "
            f"{result['accuracy']:.4f} (example-weighted), {result['client_mean_accuracy']:.4f} (client mean), "
            f"loss {result['loss']:.4f} over {result['num_clients']} clients / {result['num_examples']} examples")
