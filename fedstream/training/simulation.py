"""The simulation: federated rounds of an algorithm over a dataset, in memory or resumable in a workdir.

    sim = Simulation(dataset, algorithm, clients_per_round=10, batch_size=10)
    for metrics in sim.rounds(100):        # one dict per round (train metrics; eval ones every `eval_every`)
        print(metrics["round"], metrics["train"]["loss"])
    print(sim.evaluate())                  # loss and accuracy on the test split

Each round samples a cohort from (seed, round), streams its clients' data
onto the devices through the Grain cohort pipeline, runs one sharded XLA
program and applies the server update. Given a `workdir`, the simulation
also holds the workdir's lock, checkpoints the server state (Orbax) every
`checkpoint_every` rounds, writes `metrics.jsonl` (and TensorBoard, if
installed) and resumes from the latest checkpoint when created again:
everything a round computes is a function of (settings, round, server
state), so a resumed run ends bit-identical to an uninterrupted one.

`fedstream train` builds a `Simulation` from a pipeline config
(`fedstream.training.train.simulation_from_config`) and runs it; both
routes give the same parameters.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from fedstream.algorithms.aggregators import Aggregator
from fedstream.algorithms.base import Algorithm, ServerState
from fedstream.algorithms.privacy import PrivacyLedger, PrivacyLedgerError, TreeMechanism
from fedstream.config import ConfigError, check_clients_per_round, flatten, validate_train_config
from fedstream.data.async_schedule import AsyncSchedule
from fedstream.data.augment import get_augmentation
from fedstream.data.clock import ClockSettings
from fedstream.data.packed import idle_step_fraction
from fedstream.data.sampling import rounds_per_epoch
from fedstream.data.cohort import (DEFAULT_CHUNK_BYTES, ClientBatching, CohortPipeline, EvalPipeline,
                                   auto_data_threads)
from fedstream.training.checkpoint import CheckpointCorrupted, RunCheckpointer, check_config_unchanged
from fedstream.training.client_store import ClientStateStore
from fedstream.training.limits import check_run_sizes, fit_eval_batch
from fedstream.training.lock import WorkdirLock
from fedstream.training.metrics_log import MetricsLog, Progress, print_line
from fedstream.training.personalized_eval import evaluate_finetuned, evaluate_personal
from fedstream.training.rounds import (EVAL_SUMS, build_debug_round, build_eval, build_train_round,
                                       local_device_positions, make_mesh, replicate, resolve_lanes, shard_batch,
                                       summarize_eval)


class TrainingDiverged(RuntimeError):
    """The run produced non-finite values and stopped; the last saved checkpoint is intact."""


@dataclasses.dataclass
class TrainResult:
    """What a finished `Simulation.run` (or `train`) returns."""

    state: ServerState
    rounds_done: int
    final_eval: dict[str, float]
    workdir: pathlib.Path | None


@dataclasses.dataclass
class _Dispatched:
    """A round whose computation is dispatched and whose results have not been read yet."""

    index: int  # 0-based: the round that makes `index + 1` rounds done
    element: dict[str, Any]  # host statistics of the round's data (summed over its chunks)
    state: ServerState  # the server state after the round (a future until computed)
    stats: dict[str, Any]
    state_before: ServerState  # to roll back to if the round is abandoned
    started: float  # perf_counter when the round asked for its data
    data_wait: float


class Callback:
    """Hooks into the round loop (all optional): subclass and override what you need.

    The tests' fault injection (a SIGKILL at a chosen point of a round) is a
    callback; so is anything a researcher wants to watch or stop.

    Rounds are pipelined (except for algorithms with per-client state): round
    r + 1 starts and is dispatched before round r's metrics are read, so
    `on_round_start(r + 1)` and `on_round_dispatched(r + 1)` come before
    `on_round_end(r)`. For each round the three come in that order.
    """

    def on_round_start(self, round_index: int) -> None:
        """Round `round_index` (1-based) is about to ask for its data."""

    def on_round_dispatched(self, round_index: int) -> None:
        """Round `round_index`'s computation has been dispatched (it may still be running)."""

    def on_round_end(self, round_index: int, metrics: Mapping[str, Any], saved: bool,
                     checkpointer: RunCheckpointer | None) -> None:
        """Round `round_index` is done and logged; `saved` says whether its checkpoint save started.

        The save runs on the checkpointer's thread: `checkpointer.wait()` blocks until it is committed.
        """


# ---------------------------------------------------------------------------------------------------------------
# Evaluation over every client of a split
# ---------------------------------------------------------------------------------------------------------------

def _local_devices(mesh: jax.sharding.Mesh) -> tuple[int, ...] | None:
    """This process's mesh positions in a multi-process run (it reads only their clients), else None."""
    return local_device_positions(mesh) if jax.process_count() > 1 else None


def client_eval_sums(algorithm: Algorithm, params: Any, dataset: Any, config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh, eval_fn: Callable | None = None,
                     split: str | None = None) -> dict[str, np.ndarray]:
    """Per-client evaluation sums (`EVAL_SUMS`) of `params` over every client of `split` (default: test)."""
    chunk = int(config.eval.chunk_clients)
    split = split or config.data.test_split
    batch = fit_eval_batch(int(config.eval.batch_size), dataset.client_sizes(split))  # no larger than a client
    pipeline = EvalPipeline(dataset, split, (algorithm.model.input_key, algorithm.model.label_key), batch,
                            mesh.size, chunk,
                            auto_data_threads(int(config.data_threads)), local_devices=_local_devices(mesh))
    eval_fn = eval_fn or build_eval(algorithm, mesh, chunk)
    sums: dict[str, list[np.ndarray]] = {key: [] for key in EVAL_SUMS}
    for part in pipeline.chunks():
        out = jax.device_get(eval_fn(params, shard_batch(part["batch"], mesh)))
        for key in sums:
            sums[key].append(np.asarray(out[key])[: len(part["clients"])])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in sums.items()}


def evaluate(algorithm: Algorithm, params: Any, dataset: Any, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, eval_fn: Callable | None = None) -> dict[str, float]:
    """Loss and accuracy of one model over all clients of the test split (pooled and client-averaged)."""
    return summarize_eval(client_eval_sums(algorithm, params, dataset, config, mesh, eval_fn))


def evaluate_state(algorithm: Algorithm, state: ServerState, dataset: Any, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, eval_fn: Callable | None = None) -> dict[str, float]:
    """The test evaluation of a server state: its model, or for HypCluster each client's best cluster
    model (chosen by the lowest loss on the client's train data, as FedJAX's HypClusterEvaluator)."""
    if not algorithm.is_clustered:
        return evaluate(algorithm, state.params, dataset, config, mesh, eval_fn)
    from fedstream.algorithms.hyp_cluster import cluster_params, combine_cluster_evals

    test_ids = dataset.client_ids(config.data.test_split)
    train_position = {str(c): i for i, c in enumerate(dataset.client_ids(config.data.train_split))}
    rows = np.array([train_position.get(str(c), -1) for c in test_ids])
    train_sums, test_sums = [], []
    for j in range(int(algorithm.num_clusters)):
        params = cluster_params(state, j)
        on_train = client_eval_sums(algorithm, params, dataset, config, mesh, eval_fn, config.data.train_split)
        # Aligned to the test clients; a client without train data scores 0 everywhere (-> cluster 0).
        train_sums.append({k: np.where(rows >= 0, v[np.maximum(rows, 0)], 0.0) for k, v in on_train.items()})
        test_sums.append(client_eval_sums(algorithm, params, dataset, config, mesh, eval_fn))
    combined, assignment = combine_cluster_evals(train_sums, test_sums)
    return {**summarize_eval(combined), **{f"clients_in_cluster_{j}": int((assignment == j).sum())
                                           for j in range(int(algorithm.num_clusters))}}


# ---------------------------------------------------------------------------------------------------------------
# Restoring a run
# ---------------------------------------------------------------------------------------------------------------

def restore_intact(checkpointer: RunCheckpointer, like_state: ServerState, *, client_store: bool,
                   resume_last_good: bool, log: Callable[[str], None]) -> tuple[ServerState, dict[str, Any]] | None:
    """(state, meta) of the newest checkpoint that reads back intact, or None when there is none.

    Every byte is checked: the meta's own digest, the state's, the client
    index's and each client-state file's (`RunCheckpointer`), and a DP run's
    privacy ledger must reproduce the epsilon recorded with it
    (`check_privacy_meta`). A corrupted newest checkpoint stops the run with
    `CheckpointCorrupted` unless `resume_last_good`: then it is moved to
    `corrupted_checkpoints/` (kept for inspection), one line says which step,
    why and where it went, and the next older one is tried. A checkpoint of an
    older fedstream version (its meta has no digest) is used with a one-line
    warning.
    """
    while (step := checkpointer.latest_round()) is not None:
        try:
            state, meta = checkpointer.restore(step, like_state)
            if client_store:
                checkpointer.restore_client_index(step)
            check_privacy_meta(meta, step, checkpointer.step_path(step) / "meta",
                               sealed=step not in checkpointer.legacy_steps)
            if step in checkpointer.legacy_steps:
                log(f"warning: the checkpoint of round {step} was written by an older fedstream version: its "
                    "metadata has no digest and is trusted unchecked (the state's digest is checked)")
            return state, meta
        except CheckpointCorrupted as e:
            if not resume_last_good:
                older = [k for k in checkpointer.all_steps() if k < step]
                hint = (f"rerun with --resume-last-good to set it aside and resume from an older checkpoint "
                        f"(rounds {', '.join(map(str, older))} are on disk)" if older else
                        "no older checkpoint is on disk; --resume-last-good would set it aside and start over")
                raise CheckpointCorrupted(e.step, e.path, f"{e.why}; {hint}") from None
            if jax.process_count() > 1:
                raise ConfigError(f"{e}; --resume-last-good moves checkpoints in single-process runs only: move "
                                  f"{checkpointer.step_path(step)} out of {checkpointer.directory} by hand (e.g. "
                                  "into corrupted_checkpoints/) and relaunch") from None
            log(f"{e}; moved to {checkpointer.quarantine(step)}; trying the previous checkpoint")
    return None


def check_privacy_meta(meta: Mapping[str, Any], step: int, path: pathlib.Path, *, sealed: bool = True) -> None:
    """Refuses (`CheckpointCorrupted`) a checkpoint whose privacy ledger does not give the epsilon saved with it.

    The ledger's epsilon is recomputed from its events (mechanisms and round
    counts) and must equal `meta["privacy"]["epsilon"]`, so a ledger whose
    noise or rounds were altered cannot lower the reported epsilon. Meta items
    without a ledger pass; `sealed=False` (an older version's checkpoint)
    accepts a ledger saved without its epsilon.
    """
    saved = meta.get("privacy")
    if saved is None:
        return
    try:
        if not isinstance(saved, Mapping):
            raise ValueError("it is not a JSON object")
        epsilon = PrivacyLedger.from_json(saved).epsilon()
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointCorrupted(step, path, f"its privacy ledger is unreadable: {e}") from None
    recorded = saved.get("epsilon")
    if recorded is None and not sealed:
        return
    if (not isinstance(recorded, (int, float)) or isinstance(recorded, bool)
            or not _same_epsilon(epsilon, float(recorded))):
        raise CheckpointCorrupted(step, path, f"its privacy ledger gives epsilon {epsilon!r}, but {recorded!r} was "
                                              "recorded with it (the ledger was altered)")


def _same_epsilon(a: float, b: float) -> bool:
    """Equal epsilons (both infinite, or within float rounding)."""
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-9 * max(abs(a), abs(b)))


def check_accounted_participation(algorithm: Algorithm, pipeline: CohortPipeline) -> None:
    """Refuses (ConfigError) a DP-FTRL algorithm whose accounted epochs are not the run's cohorts.

    Its `TreeMechanism` assumes sampling 'epochs' over the train split's N
    clients in rounds of `clients_per_round` (each client once per epoch of
    floor(N / m) rounds); anything else would make the logged epsilon wrong.
    """
    accounting = algorithm.privacy_accounting()
    mechanism = getattr(accounting, "mechanism", None)
    if not isinstance(mechanism, TreeMechanism):
        return
    population = len(pipeline.sizes)
    if pipeline.sampling != "epochs":
        raise ConfigError(f"config key 'sampling' is {pipeline.sampling!r}, but DP-FTRL's privacy accounting assumes "
                          "'epochs' (each client at most once per epoch)")
    epoch_rounds = rounds_per_epoch(population, pipeline.cohort_size)
    if (mechanism.population, mechanism.epoch_rounds) != (population, epoch_rounds):
        raise ConfigError(f"DP-FTRL was built for {mechanism.population} clients in epochs of "
                          f"{mechanism.epoch_rounds} rounds, but the run has {population} clients, "
                          f"clients_per_round={pipeline.cohort_size} (epochs of {epoch_rounds} rounds)")


def open_privacy_ledger(accounting: Any, saved: Mapping[str, Any] | None = None,
                        rounds_done: int = 0) -> PrivacyLedger | None:
    """The run's privacy ledger for an algorithm's declared `accounting` (`Algorithm.privacy_accounting()`).

    None when `accounting` is None (not DP, or no sampling facts). `saved` is
    the checkpoint's meta["privacy"] on resume: the resumed ledger must hold
    exactly `rounds_done` rounds, with the same accountant and delta; later
    rounds use the current mechanism (a new segment if it changed, with a
    warning). The Simulation records a round after each and saves `to_json()`
    in the checkpoint's meta.
    """
    if accounting is None:
        return None
    fresh = accounting.new_ledger()
    if saved is None:
        if rounds_done:
            raise ValueError(f"resuming a DP run after {rounds_done} rounds, but its checkpoint has no privacy ledger")
        return fresh
    ledger = PrivacyLedger.from_json(saved, fresh.mechanism)
    if ledger.rounds != rounds_done:
        raise ValueError(f"privacy ledger holds {ledger.rounds} rounds, the checkpoint {rounds_done}")
    if (ledger.accountant, ledger.target_delta) != (fresh.accountant, fresh.target_delta):
        raise ValueError("the run's accountant or target_delta changed since its checkpoint")
    if ledger.segments and ledger.segments[-1][0] != fresh.mechanism:
        warnings.warn(f"DP mechanism changed on resume ({ledger.segments[-1][0]} -> {fresh.mechanism}), e.g. z "
                      "recalibrated for a new num_rounds (pin it with algorithm.options.calibration_rounds); the "
                      "ledger accounts the rounds of each exactly, but epsilon may end above target_epsilon",
                      stacklevel=2)
    return ledger


def _last_good(checkpointer: RunCheckpointer | None) -> str:
    """Which checkpoint survives a stop, in words."""
    if checkpointer is None:
        return "no workdir, nothing saved"
    checkpointer.wait()
    latest = checkpointer.latest_round()
    return "no checkpoint was saved yet" if latest is None else f"the checkpoint of round {latest} is intact"


def _describe_object(obj: Any) -> Any:
    """A JSON description of an aggregator (or a dataclass inside one: a codec, a DP mechanism)."""
    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    if isinstance(obj, (tuple, list)):
        return [_describe_object(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"class": type(obj).__qualname__,
                **{f.name: _describe_object(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    return repr(obj)


def describe_algorithm(algorithm: Algorithm) -> dict[str, Any]:
    """A JSON description of an algorithm object: its class and the options (dataclass fields) JSON can hold.

    Stored with a run built in Python, so that resuming it with different
    options is refused. Optimizers are not described (optax transformations
    keep their hyperparameters in closures).
    """
    options = {}
    for field in dataclasses.fields(algorithm) if dataclasses.is_dataclass(algorithm) else ():
        value = getattr(algorithm, field.name)
        if isinstance(value, (bool, int, float, str, type(None))):
            options[field.name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            options[field.name] = list(value)
        elif isinstance(value, Algorithm) and field.name != "model":  # e.g. the base of an Aggregated chain
            options[field.name] = {k: v for k, v in describe_algorithm(value).items() if k != "model"}
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, Aggregator) for v in value):
            options[field.name] = [_describe_object(v) for v in value]
    model = getattr(algorithm, "model", None)
    return {"class": f"{type(algorithm).__module__}.{type(algorithm).__qualname__}", "options": options,
            "model": repr(getattr(model, "module", model))}


# ---------------------------------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------------------------------

class Simulation:
    """Federated rounds of `algorithm` over `dataset`; checkpointed and resumable when given a `workdir`.

    Args:
      dataset: a `FederatedDataset` (a preprocessed directory) or an `InMemoryDataset`.
      algorithm: a built algorithm (e.g. `fedstream.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0))`).
      clients_per_round: cohort size (the expected size under Poisson sampling).
      batch_size, epochs, max_examples, max_steps: each client's local training (0 = no cap).
      seed: the run's seed: initial model, cohorts, example orders and dropout keys derive from it.
      sampling: 'uniform' (exactly `clients_per_round` clients), 'poisson' (each client with rate q) or 'epochs'
        (each epoch a shuffle of the clients cut into rounds: each client at most once per epoch).
      sampling_rate: Poisson q (0 = clients_per_round / population); max_clients_per_round: Poisson slots.
      aggregation: 'example' (client weight = its examples) or 'uniform'.
      train_split, test_split: split names of `dataset`.
      augment: per-client augmentation in the pipeline ('' = none).
      eval_every: rounds between test evaluations (0 = only at the end of `run`).
      eval_batch_size, eval_chunk_clients: evaluation batch and clients per evaluation program.
      finetune_steps: > 0 also evaluates "FedAvg + fine-tune" with this many local steps per client.
      workdir: directory for checkpoints, `metrics.jsonl`, TensorBoard and the lock (None: in memory only).
      checkpoint_every, checkpoint_keep: Orbax checkpoint interval and how many to keep.
      resume_last_good: a corrupted latest checkpoint is set aside and the newest intact one is used.
      nonfinite: a client update with NaN/Inf is 'skip'ped (counted) or 'stop's the run.
      data_threads: reader threads (0 = auto).
      num_devices: devices of the `('clients',)` mesh (None: all).
      callbacks: `Callback` objects called around each round.
      log: where progress and messages go (printed by default; `lambda _: None` for silence).
      run_config: the JSON-able record of the run kept in its checkpoints and compared on resume
        (default: these settings plus a description of the algorithm; `fedstream train` passes its config).
      lock: take the workdir's lock (False only when the caller already holds it, as `train` does).
      debug: run each round eagerly, client by client (`print` and `pdb` work inside an algorithm's
        hooks; results equal the compiled round's to float rounding; slow).
      clock: run the rounds on a simulated clock (`fedstream.data.clock.ClockSettings`: device speeds,
        availability, over-selection, a deadline); each round's train metrics then carry `simulated_time`
        and its dropped clients. None: the idealized rounds. An asynchronous algorithm (FedBuff) always runs
        on a clock (None: `ClockSettings()`): a round is then one server step, its cohort the K =
        `clients_per_round` updates that arrive for it (`fedstream.data.async_schedule`).
    """

    def __init__(self, dataset: Any, algorithm: Algorithm, *, clients_per_round: int = 10, batch_size: int = 10,
                 epochs: int = 1, max_examples: int = 0, max_steps: int = 0, seed: int = 0,
                 sampling: str = "uniform", sampling_rate: float = 0.0, max_clients_per_round: int = 0,
                 aggregation: str = "example", train_split: str = "train", test_split: str = "test",
                 augment: str = "", eval_every: int = 0, eval_batch_size: int = 64, eval_chunk_clients: int = 256,
                 finetune_steps: int = 0, workdir: str | os.PathLike | None = None, checkpoint_every: int = 1,
                 checkpoint_keep: int = 3, resume_last_good: bool = False, nonfinite: str = "skip",
                 data_threads: int = 0, num_devices: int | None = None, callbacks: Sequence[Callback] = (),
                 log: Callable[[str], None] = print_line, run_config: Mapping[str, Any] | None = None,
                 lock: bool = True, debug: bool = False, lanes: int | str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, clock: ClockSettings | None = None) -> None:
        self.dataset, self.algorithm = dataset, algorithm
        self.settings = _settings(
            seed=seed, clients_per_round=clients_per_round, sampling=sampling, sampling_rate=sampling_rate,
            max_clients_per_round=max_clients_per_round, aggregation=aggregation, nonfinite=nonfinite,
            data_threads=data_threads, train_split=train_split, test_split=test_split, augment=augment,
            batch_size=batch_size, epochs=epochs, max_examples=max_examples, max_steps=max_steps,
            eval_every=eval_every, eval_batch_size=eval_batch_size, eval_chunk_clients=eval_chunk_clients,
            finetune_steps=finetune_steps, checkpoint_every=checkpoint_every, checkpoint_keep=checkpoint_keep,
            lanes=0 if lanes == "auto" else lanes, chunk_mb=-(-int(chunk_bytes) // (1 << 20)), clock=clock)
        for split in (train_split, test_split):
            if split not in dataset.splits:
                raise ConfigError(f"the dataset has no split {split!r} (splits: {', '.join(dataset.splits)})")
        check_clients_per_round(self.settings, num_train_clients=dataset.num_clients(train_split))
        features = (algorithm.model.input_key, algorithm.model.label_key, *algorithm.extra_features)
        for key in features:
            if key not in dataset.schema:
                raise ConfigError(f"the dataset has no feature {key!r} (features: {', '.join(dataset.schema)})")
        self.workdir = pathlib.Path(workdir) if workdir is not None else None
        self.resume_last_good = resume_last_good
        self.take_lock = lock
        self.callbacks = tuple(callbacks)
        self.primary = jax.process_index() == 0
        self.log = log if self.primary else (lambda *_: None)
        self.run_config = dict(run_config) if run_config is not None else {
            **self.settings.to_dict(), "algorithm": describe_algorithm(algorithm)}
        self.mesh = make_mesh(num_devices)
        s = self.settings
        param_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                          for a in jax.tree.leaves(jax.eval_shape(algorithm.model.init, jax.random.PRNGKey(0))))
        # before anything allocates: a model too large for the device is refused, a batch larger than any
        # client's round is cut to it (same steps and examples, less padding)
        train_batch = check_run_sizes(s, dataset, algorithm.model, param_bytes)
        self.lanes = resolve_lanes(lanes, self.mesh, param_bytes)
        if debug or algorithm.uses_prepass:  # a prepass needs the whole round; the debug round takes one call
            chunk_bytes = 0
        batching = ClientBatching(train_batch, epochs, max_examples, max_steps)
        self.pipeline = CohortPipeline(
            dataset, train_split, features, seed=seed, cohort_size=clients_per_round,
            batching=batching, num_devices=self.mesh.size,
            uniform_weights=aggregation == "uniform", data_threads=auto_data_threads(data_threads),
            local_devices=_local_devices(self.mesh), augment=get_augmentation(augment), sampling=sampling,
            sampling_rate=sampling_rate, max_cohort_size=max_clients_per_round, label_range=_label_range(algorithm),
            lanes=self.lanes, chunk_bytes=_count("chunk_bytes", chunk_bytes, low=0),
            clock=None if algorithm.is_asynchronous else clock)
        if algorithm.is_asynchronous:  # its own clock: the server steps of the asynchronous schedule
            self.pipeline = dataclasses.replace(self.pipeline, schedule=self._async_schedule(clock))
        self.schedule = self.pipeline.schedule
        check_accounted_participation(algorithm, self.pipeline)
        self.state: ServerState = replicate(algorithm.init(jax.random.PRNGKey(int(s.seed))), self.mesh)
        self.debug = debug
        self._train_round = (build_debug_round(algorithm, seed=int(s.seed)) if debug
                             else build_train_round(algorithm, self.mesh, seed=int(s.seed), lanes=self.lanes))
        self._eval_fn = build_eval(algorithm, self.mesh, int(s.eval.chunk_clients))
        self._opened = False
        self._lock: WorkdirLock | None = None
        self._checkpointer: RunCheckpointer | None = None
        self._store: ClientStateStore | None = None
        self._store_tmp: tempfile.TemporaryDirectory | None = None
        self._ledger = None
        self._epsilon = 0.0  # the ledger's epsilon after the latest round (it may never decrease)
        self._iterator: Any = None
        self._iterator_rounds = (0, 0)  # (first, end) rounds of the open iterator
        self._metrics_log: MetricsLog | None = None
        self._last_finished_at = 0.0  # perf_counter when the latest round's metrics were read

    def _async_schedule(self, clock: ClockSettings | None) -> AsyncSchedule:
        """The server steps of an asynchronous algorithm on the simulated clock (FedBuff)."""
        s, algorithm = self.settings, self.algorithm
        clock = clock if clock is not None else ClockSettings()
        if clock.over_selection != 1.0 or clock.deadline:
            raise ConfigError(f"config keys clock.over_selection and clock.deadline describe synchronous rounds; "
                              f"algorithm {type(algorithm).__name__} is asynchronous (set them to 1 and 0)")
        if s.sampling != "uniform":
            raise ConfigError(f"algorithm {type(algorithm).__name__} chooses its clients on the simulated clock; "
                              "config key sampling must be 'uniform'")
        try:
            return AsyncSchedule(int(s.seed), self.pipeline.client_work, int(algorithm.concurrency),
                                 int(s.clients_per_round), int(algorithm.max_staleness), clock.profile,
                                 clock.availability, start_time=clock.start_time)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # --- public ------------------------------------------------------------------------------------------------

    @property
    def params(self) -> Any:
        """The server model's parameters now."""
        return self.state.params

    @property
    def rounds_done(self) -> int:
        """Rounds completed so far (restored from the workdir's checkpoint when resuming)."""
        self._open()
        return int(self.state.round)

    def rounds(self, num_rounds: int) -> Iterator[dict[str, Any]]:
        """Runs rounds until `num_rounds` are done in total, yielding each round's metrics as it ends.

        A yielded dict holds `round`, `train` (loss, accuracy, clients, examples, ...)
        and, on evaluation rounds (every `eval_every` and the last), `eval`.
        """
        num_rounds = _count("num_rounds", num_rounds, low=0)
        self._open()
        self._ensure_iterator(num_rounds)
        start = self.rounds_done
        progress = Progress(num_rounds, start, enabled=self.primary, emit=self.log)
        # Round r + 1 is dispatched before round r is finished (metrics read, logged, evaluated, saved), so the
        # host's work on round r overlaps the device's on round r + 1. Not with per-client state: round r + 1
        # reads the client states round r writes.
        pipelined = self._store is None
        finished: _Dispatched | None = None  # dispatched, waiting to be finished
        in_flight: _Dispatched | None = None  # dispatched after `finished`; rolled back if the loop stops
        self._last_finished_at = time.perf_counter()
        try:
            for r in range(start, num_rounds):
                try:
                    in_flight = self._start_round(r)
                except BaseException:
                    if finished is not None:  # finish the previous round as an unpipelined loop would have
                        pending, finished = finished, None
                        self._finish_round(pending, num_rounds)
                    raise
                if not pipelined:
                    finished, in_flight = in_flight, None
                if finished is not None:
                    pending, finished = finished, None
                    yield self._report(progress, self._finish_round(pending, num_rounds))
                finished, in_flight = in_flight, None
            if finished is not None:
                pending, finished = finished, None
                yield self._report(progress, self._finish_round(pending, num_rounds))
        except BaseException:  # including the consumer closing the generator: undo the unfinished round
            if in_flight is not None:
                self._abandon(in_flight)
            elif finished is not None:
                self._abandon(finished)
            raise

    def _report(self, progress: Progress, metrics: dict[str, Any]) -> dict[str, Any]:
        """Updates the progress line with a finished round's metrics; returns them."""
        progress.last_eval = (f"test acc {metrics['eval']['accuracy']:.4f} (round {metrics['round']})"
                              if "eval" in metrics else progress.last_eval)
        progress.update(metrics["round"], metrics["train"]["examples"], metrics["train"], force="eval" in metrics)
        return metrics

    def run(self, num_rounds: int) -> TrainResult:
        """Runs (or resumes) until `num_rounds` rounds are done, evaluates, closes the workdir; returns the result."""
        final_eval: dict[str, float] = {}
        try:
            start = self.rounds_done
            for metrics in self.rounds(num_rounds):
                final_eval = metrics.get("eval", final_eval)
            if self._metrics_log is not None and self.rounds_done > start:
                self._metrics_log.write_plot(self.rounds_done)  # TensorBoard's image of the run's curves
            if start >= num_rounds:
                final_eval = self.evaluate()
                self.log(f"run already complete ({start} rounds); final evaluation repeated")
        finally:
            self.close()
        if final_eval:
            self.log(f"final test accuracy {final_eval['accuracy']:.4f} (example-weighted), "
                     f"{final_eval['client_mean_accuracy']:.4f} (client mean), loss {final_eval['loss']:.4f} "
                     f"over {final_eval['num_clients']} clients / {final_eval['num_examples']} examples")
        return TrainResult(self.state, max(int(self.state.round), num_rounds), final_eval, self.workdir)

    def evaluate(self, split: str | None = None, dataset: Any = None, params: Any = None) -> dict[str, float]:
        """Loss and accuracy of the server model (or `params`) over every client of `split` of `dataset`.

        Defaults: the test split of the simulation's dataset. Returns example-weighted
        (`loss`, `accuracy`) and client-averaged (`client_mean_*`) numbers and counts.
        """
        config = ml_collections.ConfigDict(self.settings.to_dict())
        config.data.test_split = split or self.settings.data.test_split
        dataset = self.dataset if dataset is None else dataset
        if config.data.test_split not in dataset.splits:
            raise ConfigError(f"the dataset has no split {config.data.test_split!r} (splits: "
                              f"{', '.join(dataset.splits)})")
        if params is not None:
            return evaluate(self.algorithm, params, dataset, config, self.mesh, self._eval_fn)
        return evaluate_state(self.algorithm, self.state, dataset, config, self.mesh, self._eval_fn)

    def close(self) -> None:
        """Waits for the last checkpoint and releases the workdir (the simulation can be opened again)."""
        try:
            if self._checkpointer is not None:
                self._checkpointer.close()
            if self._store is not None:
                self._store.close()
            if self._metrics_log is not None:
                self._metrics_log.close()
            if self._iterator is not None and hasattr(self._iterator, "close"):
                self._iterator.close()
        finally:
            if self._store_tmp is not None:
                self._store_tmp.cleanup()
            if self._lock is not None:
                self._lock.release()
            self._checkpointer = self._store = self._metrics_log = self._iterator = None
            self._store_tmp = self._lock = None
            self._opened = False

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------------------

    def _open(self) -> None:
        """Takes the workdir (lock, checkpoints, metrics) and restores its latest intact checkpoint, once."""
        if self._opened:
            return
        self._opened = True
        s, algorithm = self.settings, self.algorithm
        saved_privacy, meta, start = None, None, 0
        template = algorithm.client_state_template(self.state.params) if algorithm.has_client_state else None
        try:
            if self.workdir is not None:
                self.workdir.mkdir(parents=True, exist_ok=True)
                self._lock = WorkdirLock(self.workdir, enabled=self.primary and self.take_lock).acquire()
                self._checkpointer = RunCheckpointer(self.workdir, every=int(s.checkpoint.every),
                                                     keep=int(s.checkpoint.keep))
                if self._checkpointer.latest_round() is not None:
                    restored = restore_intact(self._checkpointer, self.state, client_store=template is not None,
                                              resume_last_good=self.resume_last_good, log=self.log)
                    if restored is not None:
                        self.state, meta = restored
                        check_config_unchanged(meta["config"], self.run_config, self.workdir)
                        self._check_clock(meta, self._checkpoint_path(int(self.state.round)))
                        start = int(self.state.round)
                        saved_privacy = meta.get("privacy")
                        self.log(f"resumed {self.workdir} from the checkpoint after round {start}")
            accounting = algorithm.privacy_accounting()  # None unless the algorithm is DP
            self._ledger = open_privacy_ledger(accounting, saved_privacy, start)
            if self._ledger is not None and saved_privacy is not None:  # as saved (`restore_intact` checked it)
                saved_epsilon = saved_privacy.get("epsilon")
                self._epsilon = float(saved_epsilon) if saved_epsilon is not None else self._ledger.epsilon()
            if self._ledger is not None and start == 0 and accounting.description:
                self.log(accounting.description)
            if self.workdir is not None:
                self._metrics_log = MetricsLog(self.workdir, resume_round=start, enabled=self.primary)
                self._metrics_log.write_hparams(flatten(self.run_config))
                if not self._metrics_log.tensorboard_enabled and start == 0:
                    self.log("TensorBoard summaries off (install fedstream[tensorboard]); metrics go to metrics.jsonl")
            if template is not None:
                self._store = self._open_client_store(template, start)
        except BaseException:
            self.close()
            raise

    def _open_client_store(self, template: Any, start: int) -> ClientStateStore:
        """The per-client state store of a stateful algorithm, in step with the latest checkpoint."""
        if jax.process_count() > 1:
            raise ConfigError(f"algorithm {type(self.algorithm).__name__} keeps per-client state, which "
                              "multi-process runs do not support yet; run it in one process")
        template = jax.tree.map(np.asarray, jax.device_get(template))
        if self.workdir is None:
            self._store_tmp = tempfile.TemporaryDirectory(prefix="fedstream-client-state-")
            directory = pathlib.Path(self._store_tmp.name)
        else:
            directory = self.workdir / "client_state"
        store = ClientStateStore(directory, template, self.dataset.num_clients(self.settings.data.train_split))
        checkpointer = self._checkpointer
        if start == 0 or checkpointer is None:
            store.restore(store.index(), 0)  # a fresh run: drop files of a run killed before its first checkpoint
        else:
            # `start` was verified with its files by `restore_intact`; an older bad index is refused if used
            store.restore(checkpointer.restore_client_index(start, check_files=False), start,
                          checkpointer.client_files(start))
            for step in checkpointer.all_steps():
                try:
                    store.note_committed(step, checkpointer.restore_client_index(step, check_files=False))
                except CheckpointCorrupted:
                    continue
        return store

    def _ensure_iterator(self, num_rounds: int) -> None:
        """The cohort iterator, positioned at the next round (rebuilt when asked for other rounds).

        Its position is the round alone: chunks are a function of (seed, round).
        """
        start = int(self.state.round)
        if self._iterator is not None and self._iterator_rounds == (start, max(num_rounds, start)):
            return
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = self.pipeline.iterator(max(num_rounds, start), start_round=start)
        self._iterator_rounds = (start, max(num_rounds, start))

    def _dispatch(self, r: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Round r + 1's chunks through the compiled round; returns (device stats, host statistics of its data).

        A round of one chunk is one program. A longer round runs chunk after
        chunk, each call carrying the lanes' running sums, with at most two
        chunks in flight so the process holds a bounded amount of data; the
        server update follows the last chunk. Per-client states are read for
        each chunk and written once the round is done.
        """
        mesh, store = self.mesh, self._store
        host = {"cohort_size": 0, "num_clients_trained": 0, "num_clients_empty": 0, "num_examples": 0,
                "num_steps": 0, "executed_step_slots": 0, "chunks": 0, "data_wait_seconds": 0.0}
        carry = previous = None
        written: list[tuple[np.ndarray, Any]] = []
        stats: dict[str, Any] = {}
        while True:
            t0 = time.perf_counter()
            element = next(self._iterator)
            host["data_wait_seconds"] += time.perf_counter() - t0
            if element["round"] != r or element["chunk"] != host["chunks"]:
                raise RuntimeError(f"data iterator yielded round {element['round']} chunk {element['chunk']} for "
                                   f"round {r} chunk {host['chunks']}")
            for key in ("cohort_size", "num_clients_trained", "num_clients_empty", "num_examples", "num_steps",
                        "executed_step_slots"):
                host[key] += element[key]
            host["chunks"] += 1
            batch = element["batch"]
            clients = _cohort_clients(batch)
            stored = None if store is None else shard_batch(store.read(clients), mesh)
            last = element["chunk"] == element["num_chunks"] - 1
            if last and carry is None:  # the whole round in one program
                out = self._train_round(self.state, shard_batch(batch, mesh), *(() if store is None else (stored,)))
                self.state, stats = out[0], out[1]
                if store is not None:
                    written.append((clients, out[2]))
                break
            on_device = shard_batch(batch, mesh)
            if carry is None:
                carry = self._train_round.init(self.state, on_device, stored)
            carry, new_states = self._train_round.chunk(self.state, carry, on_device, stored)
            if store is not None:
                written.append((clients, new_states))
            if previous is not None:
                jax.block_until_ready(previous)  # keep at most two chunks in flight
            previous = carry
            if last:
                self.state, stats = self._train_round.finish(self.state, carry)
                break
        if store is not None:
            flat = np.concatenate([c.reshape(-1) for c, _ in written])
            states = jax.tree.map(lambda *leaves: np.concatenate(
                [np.asarray(leaf).reshape(-1, *leaf.shape[3:]) for leaf in leaves]),
                *[jax.device_get(s) for _, s in written])
            store.write(r + 1, flat, flat >= 0, states)
        return stats, host

    def _start_round(self, r: int) -> _Dispatched:
        """Round r + 1 up to its dispatch: its data and compiled round, chunk by chunk; the client states it writes."""
        for callback in self.callbacks:
            callback.on_round_start(r + 1)
        started = time.perf_counter()
        state_before = self.state
        stats, element = self._dispatch(r)
        for callback in self.callbacks:
            callback.on_round_dispatched(r + 1)
        return _Dispatched(r, element, self.state, stats, state_before, started, element["data_wait_seconds"])

    def _abandon(self, round_: _Dispatched) -> None:
        """Undoes a dispatched round that will not be finished: the state before it (the data follows the round)."""
        self.state = round_.state_before
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None  # rebuilt at the state's round by the next `_ensure_iterator`

    def _finish_round(self, round_: _Dispatched, num_rounds: int) -> dict[str, Any]:
        """A dispatched round's end: its metrics read and logged, evaluation, checkpoint, `on_round_end`."""
        s, r, element, stats = self.settings, round_.index, round_.element, round_.stats
        train_metrics = {k: float(v) for k, v in stats["metrics"].compute().items()}
        nonfinite = int(stats["nonfinite_clients"])
        if nonfinite and s.nonfinite == "stop":
            client = str(self.dataset.client_ids(s.data.train_split)[int(stats["nonfinite_client"])])
            raise TrainingDiverged(f"round {r + 1}: client {client!r} sent a non-finite (NaN/Inf) update "
                                   f"({nonfinite} such clients); stopping as config nonfinite='stop' asks "
                                   f"({_last_good(self._checkpointer)}); nonfinite='skip' leaves such clients "
                                   "out instead")
        trained = int(element["num_clients_trained"])
        if nonfinite and nonfinite >= trained:  # nonfinite='skip', and nothing was left: the round changed nothing
            raise TrainingDiverged(f"round {r + 1}: all {trained} clients sent non-finite (NaN/Inf) updates and were "
                                   f"skipped, so the round trained nothing; stopping "
                                   f"({_last_good(self._checkpointer)}); lower the learning rates and start a new "
                                   "workdir")
        transform_log = self.algorithm.log_values(jax.device_get(stats["logs"]))  # its metrics: bits sent, clipped, ...
        if self._ledger is not None:
            self._ledger.record_round()
            epsilon = self._ledger.epsilon()
            if epsilon < self._epsilon and not _same_epsilon(epsilon, self._epsilon):
                raise PrivacyLedgerError(f"round {r + 1}: the privacy ledger's epsilon fell from {self._epsilon!r} "
                                         f"to {epsilon!r}; epsilon can only grow, so the ledger is wrong; stopping "
                                         f"({_last_good(self._checkpointer)})")
            self._epsilon = epsilon
            transform_log.update(dp_epsilon=epsilon, dp_delta=self._ledger.target_delta)
        # With pipelining a round's span overlaps the previous one's end; count it from the later of its start and
        # the previous round's end, so that round seconds add up to the loop's time.
        now = time.perf_counter()
        seconds = now - max(round_.started, self._last_finished_at)
        self._last_finished_at = now
        train = {
            **transform_log,
            "cohort_size": element["cohort_size"],
            **train_metrics,
            "clients": trained - nonfinite,  # whose updates were used; the skipped ones are counted below
            "empty_clients_skipped": element["num_clients_empty"],
            "examples": element["num_examples"],
            "steps": element["num_steps"],
            "padding_waste": idle_step_fraction(element["executed_step_slots"], element["num_steps"]),
            "round_chunks": element["chunks"],
            "nonfinite_clients_skipped": nonfinite,
            "round_seconds": seconds,
            "data_wait_seconds": round_.data_wait,
            "examples_per_second": element["num_examples"] / max(seconds, 1e-9),
        }
        if self.schedule is not None:  # simulated time, staleness and dropped clients of the server step
            train.update(self.schedule.metrics(r))
        elif self.pipeline.round_clock is not None:
            train.update(self.pipeline.round_clock.metrics(r))
        if self._metrics_log is not None:
            self._metrics_log.write(r + 1, "train", train)
        done = r + 1
        result: dict[str, Any] = {"round": done, "train": train}
        every = int(s.eval.every)
        if done == num_rounds or (every and done % every == 0):
            result["eval"] = self._evaluate_round(done, round_.state)
        saved = False
        if self._checkpointer is not None:
            meta = {"config": self.run_config, "round": done, "seed": int(s.seed),
                    "data_iterator": {"next_round": done}}
            if self._ledger is not None:
                meta["privacy"] = {**self._ledger.to_json(), "epsilon": self._epsilon}  # checked on resume
            if self.pipeline.round_clock is not None or self.schedule is not None:
                meta["clock"] = {"simulated_time": self._simulated_time(r)}  # checked on resume
            client_index = self._store.index() if self._store is not None else None
            client_files = self._store.file_digests(client_index) if self._store is not None else None
            saved = self._checkpointer.save(done, round_.state, meta, force=done == num_rounds,
                                            client_index=client_index, client_files=client_files)
            if self._store is not None:
                if saved:
                    self._store.note_committed(done, client_index)
                self._store.collect_garbage(self._checkpointer.all_steps() + ([done] if saved else []))
        elif self._store is not None:
            self._store.note_committed(done, self._store.index())
            self._store.collect_garbage([done])
        for callback in self.callbacks:
            callback.on_round_end(done, result, saved, self._checkpointer)
        return result

    def _checkpoint_path(self, step: int) -> pathlib.Path | None:
        """Where the checkpoint of round `step` lives (None without a workdir)."""
        return None if self._checkpointer is None else self._checkpointer.step_path(step)

    def _simulated_time(self, r: int) -> float:
        """Simulated seconds at the end of round r + 1 (0-based r): the synchronous clock's or the server step's."""
        if self.schedule is not None:
            return self.schedule.step(r).time
        return self.pipeline.round_clock.outcome(r).end_time

    def _check_clock(self, meta: Mapping[str, Any], path: pathlib.Path | None) -> None:
        """Refuses to resume when the clock recomputed from round 1 disagrees with the checkpoint's simulated time.

        The config names a trace file, not its content: a trace edited since the
        run started would silently change the cohorts of the rounds still to run.
        """
        done = int(self.state.round)
        saved = meta.get("clock")
        if (self.pipeline.round_clock is None and self.schedule is None) or done == 0:
            return
        if not isinstance(saved, Mapping) or "simulated_time" not in saved:
            raise ConfigError(f"the checkpoint of round {done} in {path} has no simulated time, but the run uses the "
                              "simulated clock (config key clock.enabled)")
        now = self._simulated_time(done - 1)
        if saved["simulated_time"] != now:
            raise ConfigError(f"the simulated clock after round {done} is at {now!r} s, but the checkpoint in {path} "
                              f"recorded {saved['simulated_time']!r} s: the clock's inputs changed since the run "
                              "started (e.g. the availability trace file, config key clock.trace); restore them or "
                              "start a new workdir")

    def _evaluate_round(self, done: int, state: ServerState) -> dict[str, float]:
        """The test evaluation of `state`, after round `done` (plus fine-tuned / personal models where configured)."""
        s, algorithm = self.settings, self.algorithm
        result = evaluate_state(algorithm, state, self.dataset, s, self.mesh, self._eval_fn)
        if int(s.eval.finetune_steps):  # "FedAvg + fine-tune" personalization
            result.update(evaluate_finetuned(algorithm, state.params, self.dataset, s, self.mesh,
                                             int(s.eval.finetune_steps), round_index=done))
        if self._store is not None and algorithm.has_personal_models:  # e.g. Ditto's v_i
            result.update(evaluate_personal(algorithm, state.params, self._store, self.dataset, s, self.mesh))
        if self._metrics_log is not None:
            self._metrics_log.write(done, "eval", result)
        if not np.isfinite(result["loss"]):
            raise TrainingDiverged(f"evaluation after round {done}: test loss is {result['loss']} (diverged); "
                                   f"stopping ({_last_good(self._checkpointer)}); lower the learning rates and "
                                   "start a new workdir")
        return result


def _cohort_clients(batch: Mapping[str, Any]) -> np.ndarray:
    """The client of each slot of a chunk that trains (-1: an empty or padding slot)."""
    return np.where(batch["slot_steps"] > 0, batch["slot_client"], -1)


def _label_range(algorithm: Algorithm) -> tuple[str, int] | None:
    """(label feature, classes) of a classifier whose labels must index its logits; None if unknown."""
    classes = getattr(algorithm.model, "num_classes", None)
    return (algorithm.model.label_key, int(classes)) if isinstance(classes, int) and classes > 0 else None


def _count(name: str, value: Any, low: int) -> int:
    """An integer argument >= low (bools and floats refused), or ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise ConfigError(f"Simulation argument {name!r} must be an integer >= {low}, got {value!r}")
    return int(value)


def _settings(**kw: Any) -> ml_collections.ConfigDict:
    """The simulation's settings in the layout of a training config (checked by the same validation)."""
    c = ml_collections.ConfigDict()
    for key in ("seed", "clients_per_round", "sampling", "sampling_rate", "max_clients_per_round", "aggregation",
                "nonfinite", "data_threads", "lanes", "chunk_mb"):
        c[key] = kw[key]
    c.data = ml_collections.ConfigDict({"train_split": kw["train_split"], "test_split": kw["test_split"],
                                        "augment": kw["augment"]})
    c.client = ml_collections.ConfigDict({k: kw[k] for k in ("batch_size", "epochs", "max_examples", "max_steps")})
    c.eval = ml_collections.ConfigDict({"every": kw["eval_every"], "batch_size": kw["eval_batch_size"],
                                        "chunk_clients": kw["eval_chunk_clients"],
                                        "finetune_steps": kw["finetune_steps"]})
    c.checkpoint = ml_collections.ConfigDict({"every": kw["checkpoint_every"], "keep": kw["checkpoint_keep"]})
    if kw["clock"] is not None:  # only then: a run without the clock keeps the settings (and run_config) it had
        c.clock = ml_collections.ConfigDict(kw["clock"].to_config())
    validate_train_config(c)  # the keys present are checked; a bad value is named by its config key
    return c
