"""`fedstream eval`: evaluate a saved checkpoint of a run on any split of its dataset.

    fedstream eval digits_fedavg --workdir checkpoints/digits --split train --step 50

The pipeline and `--config` overrides are those of the run (as for resuming:
only num_rounds, data_threads, eval.* and checkpoint.* may differ; a key that
changes the model is refused, naming it). The checkpoint is opened read-only,
so evaluating a run that is still training is safe: nothing in the workdir is
written or cleaned up.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Mapping

import ml_collections
import orbax.checkpoint as ocp

from fedstream.config import ConfigError, validate_train_config
from fedstream.training.checkpoint import RunCheckpointer, check_config_unchanged


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


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, split: str | None = None,
                        step: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluates checkpoint `step` (default: the latest) of the run in `workdir` on `split`
    (default: `config.data.test_split`).

    Returns the summary of `train.evaluate_state` (loss, accuracy, client means,
    counts) plus `round` and `split`. Raises ConfigError for a missing
    checkpoint, step or split and for a config that is not the run's.
    """
    import jax

    from fedstream.training.rounds import make_mesh, replicate
    from fedstream.training.train import build_algorithm, evaluate_state, open_dataset

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
        check_config_unchanged(checkpointer.read_meta(step)["config"], config.to_dict(), workdir,
                               hint="eval needs the run's pipeline and overrides")

        dataset = open_dataset(config, log)
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
