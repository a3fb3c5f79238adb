"""`fedstream train`'s adapter: a pipeline config -> dataset, model, algorithm -> the same `Simulation`.

    dataset   <- config.data (preprocessed first with config.data.recipe if missing)
    algorithm <- config.model, config.client/server optimizers, config.algorithm
    Simulation(dataset, algorithm, <the config's cohort, client, eval and checkpoint keys>, workdir).run(num_rounds)

The loop itself lives in `fedstream.training.simulation`, where a script
builds the same objects by hand; both routes give bit-identical parameters.
Running the same command on the same workdir resumes.
"""

from __future__ import annotations

import os
import pathlib
import signal
from typing import Any, Callable

import ml_collections

from fedstream.algorithms import build_algorithm as make_algorithm
from fedstream.algorithms.base import Algorithm
from fedstream.algorithms.fedavg import make_optimizer
from fedstream.config import ConfigError, validate_train_config
from fedstream.data.clock import ClockSettings
from fedstream.models import get_model
from fedstream.training.checkpoint import CheckpointCorrupted, RunCheckpointer, check_config_unchanged
from fedstream.training.lock import locked_workdir
from fedstream.training.metrics_log import print_line
from fedstream.training.simulation import (Callback, Simulation, TrainingDiverged, TrainResult,  # noqa: F401
                                           client_eval_sums, evaluate, evaluate_state, restore_intact)

# Test hook: SIGKILL to this process at a chosen point of round K, for the
# kill-and-resume tests and benchmarks/chaos_resume.py:
#   kill_in_data:K      as round K asks for its data (reader threads busy)
#   kill_in_round:K     while round K's jitted computation runs (dispatched, not finished)
#   kill_during_save:K  right after the asynchronous save of round K started (the ones before it committed)
#   kill_after_round:K  after round K's checkpoint is committed
FAULT_ENV = "FEDSTREAM_FAULT"
FAULT_KINDS = ("kill_in_data", "kill_in_round", "kill_during_save", "kill_after_round")


def open_dataset(config: ml_collections.ConfigDict, log: Callable[[str], None] = print_line, *,
                 for_training: bool = True) -> Any:
    """Opens `config.data.path`, preprocessing it first with `config.data.recipe` if missing.

    For training (`for_training`), then checks that it has the train and test
    splits (`check_splits`) and `clients_per_round` against the train split's
    population (`check_clients_per_round`, naming the dataset's path).
    """
    from fedstream.config import check_clients_per_round
    from fedstream.data.reader import FederatedDataset

    path = pathlib.Path(config.data.path)
    if not (path / "_SUCCESS").exists() and config.data.recipe:
        from fedstream.data.preprocessing import run_preprocess

        log(f"dataset {path} not found: preprocessing recipe {config.data.recipe!r} into it")
        run_preprocess(config.data.recipe, path, progress=log)
    dataset = FederatedDataset(path)
    if for_training:
        check_splits(config, dataset)
        check_clients_per_round(config, num_train_clients=dataset.num_clients(str(config.data.train_split)))
    elif str(config.data.train_split) in dataset.splits:
        check_clients_per_round(config, num_train_clients=dataset.num_clients(str(config.data.train_split)))
    return dataset


def check_splits(config: ml_collections.ConfigDict, dataset: Any) -> None:
    """Raises a one-line ConfigError if the dataset lacks the train split or the test split the run
    evaluates on (every `eval.every` rounds and after the last one), naming the config key and the
    dataset's splits. Called as soon as the dataset is open, before any model is built.
    """
    have = ", ".join(dataset.splits)
    train_split, test_split = str(config.data.train_split), str(config.data.test_split)
    if train_split not in dataset.splits:
        raise ConfigError(f"{dataset.path} has no split {train_split!r} to train on (splits: {have}); set "
                          "data.train_split to one of them")
    if test_split not in dataset.splits:
        recipe = dataset.metadata.get("recipe")
        how = (" or preprocess it again with --config.test_fraction=0.2 (the arrays recipe writes only 'train' by "
               "default)" if recipe == "arrays" else "")
        raise ConfigError(f"{dataset.path} has no split {test_split!r} to evaluate on (splits: {have}); the run "
                          f"evaluates data.test_split every eval.every rounds and after the last: set "
                          f"data.test_split to one of the splits{how}")


def build_algorithm(config: ml_collections.ConfigDict, dataset: Any) -> Algorithm:
    """The model and algorithm the config describes.

    `model.name` and `algorithm.name` may be registered names or
    `module:attribute` / `path/to/file.py:attribute` (relative files are looked
    up next to the config's pipeline file first, then in the cwd). The model
    factory gets `hidden` and `conv_impl` only if its signature declares them,
    plus `model.options`; its input and label are the dataset features
    `model.input_key` and `model.label_key`.
    """
    import inspect

    from fedstream.algorithms import resolve_algorithm
    from fedstream.config import search_dirs
    from fedstream.models import resolve_model
    from fedstream.models.core import factory_accepts

    schema = dataset.schema
    search = search_dirs(config)
    input_key, label_key = str(config.model.get("input_key", "x")), str(config.model.get("label_key", "y"))
    for what, key in (("input_key", input_key), ("label_key", label_key)):
        if key not in schema:
            raise ConfigError(f"config key 'model.{what}': dataset {config.data.path} has no feature {key!r} "
                              f"(features: {', '.join(schema)})")
    factory = resolve_model(str(config.model.name), search)
    options = config.model.options.to_dict() if "options" in config.model else {}
    for key in options:
        if not factory_accepts(factory, key):
            known = ", ".join(list(inspect.signature(factory).parameters)[1:]) or "none"
            raise ConfigError(f"config key 'model.options.{key}': model {config.model.name!r} takes no option "
                              f"{key!r} (its parameters after num_classes: {known})")
    common = {"hidden": tuple(config.model.hidden), "conv_impl": config.model.conv_impl}
    options = {**{k: v for k, v in common.items() if factory_accepts(factory, k)}, **options}
    model = get_model(factory, schema[input_key].shape, config.model.num_classes, input_key, label_key,
                      input_dtype=schema[input_key].dtype,
                      loss_mask_ids=tuple(config.model.get("loss_mask_ids", ())),
                      accuracy_mask_ids=tuple(config.model.get("accuracy_mask_ids", ())), **options)
    client_tx = make_optimizer(config.client.optimizer, config.client.learning_rate, momentum=config.client.momentum)
    server_tx = make_optimizer(config.server.optimizer, config.server.learning_rate, momentum=config.server.momentum,
                               b1=config.server.b1, b2=config.server.b2, eps=config.server.eps)
    algorithm = config.get("algorithm")
    name = str(algorithm.name) if algorithm is not None else "fedavg"
    options = algorithm.options.to_dict() if algorithm is not None and "options" in algorithm else {}
    context = {"population": len(dataset.client_sizes(config.data.train_split)),
               "client_learning_rate": float(config.client.learning_rate),
               # the cohort facts DP-FedAvg needs (denominator, accounting, calibration)
               "sampling": str(config.get("sampling", "uniform")),
               "sampling_rate": float(config.get("sampling_rate", 0.0)),
               "clients_per_round": int(config.clients_per_round),
               "num_rounds": int(config.num_rounds)}
    built = make_algorithm(resolve_algorithm(name, search), model, client_tx, server_tx, context=context, **options)
    for key in built.extra_features:
        if key not in schema:
            raise ConfigError(f"algorithm {name!r} needs the dataset feature {key!r}; {config.data.path} has "
                              f"{', '.join(schema)}")
    return built


def fault_point() -> tuple[str, int] | None:
    """The kill point `FEDSTREAM_FAULT=KIND:ROUND` asks for, or None."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    kind, _, k = spec.partition(":")
    if kind not in FAULT_KINDS or not k.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected KIND:ROUND with KIND one of {', '.join(FAULT_KINDS)}")
    return kind, int(k)


class FaultInjector(Callback):
    """SIGKILLs this process at one point of one round (the kill-and-resume tests and chaos benchmark)."""

    def __init__(self, kind: str, round_index: int) -> None:
        self.kind, self.round_index = kind, round_index

    def _kill(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_round_start(self, round_index: int) -> None:
        if (self.kind, self.round_index) == ("kill_in_data", round_index):
            self._kill()

    def on_round_dispatched(self, round_index: int) -> None:
        if (self.kind, self.round_index) == ("kill_in_round", round_index):
            self._kill()

    def on_round_end(self, round_index: int, metrics: Any, saved: bool, checkpointer: RunCheckpointer | None) -> None:
        if round_index != self.round_index or not saved or self.kind not in ("kill_during_save", "kill_after_round"):
            return
        if checkpointer is not None:  # `saved`: handed to the saving thread; wait until Orbax has it
            if self.kind == "kill_after_round":
                checkpointer.wait()
            else:
                checkpointer.wait_started(round_index)
        self._kill()


def simulation_from_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
                           log: Callable[[str], None] = print_line, resume_last_good: bool = False,
                           callbacks: tuple[Callback, ...] = (), lock: bool = True, debug: bool = False) -> Simulation:
    """The `Simulation` a (validated) training config describes: dataset, model, algorithm and settings."""
    dataset = open_dataset(config, log)
    algorithm = build_algorithm(config, dataset)
    return Simulation(
        dataset, algorithm, clients_per_round=int(config.clients_per_round), batch_size=int(config.client.batch_size),
        epochs=int(config.client.epochs), max_examples=int(config.client.max_examples),
        max_steps=int(config.client.max_steps), seed=int(config.seed), sampling=str(config.sampling),
        sampling_rate=float(config.sampling_rate), max_clients_per_round=int(config.max_clients_per_round),
        aggregation=str(config.aggregation), train_split=str(config.data.train_split),
        test_split=str(config.data.test_split), augment=str(config.data.augment), eval_every=int(config.eval.every),
        eval_batch_size=int(config.eval.batch_size), eval_chunk_clients=int(config.eval.chunk_clients),
        finetune_steps=int(config.eval.finetune_steps), workdir=workdir,
        checkpoint_every=int(config.checkpoint.every), checkpoint_keep=int(config.checkpoint.keep),
        resume_last_good=resume_last_good, nonfinite=str(config.nonfinite), data_threads=int(config.data_threads),
        callbacks=callbacks, log=log, run_config=config.to_dict(), lock=lock, debug=debug,
        lanes=int(config.lanes) or "auto", chunk_bytes=int(config.chunk_mb) << 20, clock=clock_settings(config))


def clock_settings(config: ml_collections.ConfigDict) -> ClockSettings | None:
    """The simulated clock of a (validated) training config's `clock.*` keys, or None when `clock.enabled` is off."""
    clock = config.get("clock")
    if clock is None or not clock.get("enabled", False):
        return None
    try:
        return ClockSettings.from_config(clock)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@locked_workdir
def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          log: Callable[[str], None] = print_line, *, resume_last_good: bool = False,
          validated: bool = False, callbacks: tuple[Callback, ...] = (), debug: bool = False) -> TrainResult:
    """Runs (or resumes) the experiment `config` in `workdir`.

    Every restored checkpoint is checked against the digests recorded when it
    was saved. A corrupted one stops the run (`CheckpointCorrupted`, naming
    it) unless `resume_last_good`, which sets it aside and resumes from the
    newest intact checkpoint.

    In a multi-process run (after `jax.distributed.initialize`) every process
    calls this with the same config and workdir: each reads only its own
    devices' clients, all take part in Orbax's checkpointing, and process 0
    alone writes metrics and progress.

    The config is checked first (`validate_train_config`) unless `validated`
    says the caller has done so already (the CLI checks it before joining a
    multi-process run). The workdir's lock is held from the start, so a
    refused second run preprocesses nothing. `FEDSTREAM_FAULT=KIND:ROUND`
    adds a `FaultInjector`. `debug` runs each round eagerly, client by client (see `Simulation`).
    """
    if not validated:
        validate_train_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointer = RunCheckpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep)
    try:
        latest = checkpointer.latest_round()
        if latest is not None:  # early, before any data is read; the simulation checks the checkpoint it uses
            try:
                check_config_unchanged(checkpointer.read_meta(latest)["config"], config.to_dict(), workdir)
            except CheckpointCorrupted:
                pass
    finally:
        checkpointer.close()
    fault = fault_point()
    callbacks = (*callbacks, FaultInjector(*fault)) if fault else tuple(callbacks)
    simulation = simulation_from_config(config, workdir, log=log, resume_last_good=resume_last_good,
                                        callbacks=callbacks, lock=False, debug=debug)  # this call holds the lock
    return simulation.run(int(config.num_rounds))
