"""The train loop: one obvious loop around the jitted round.

    state <- restore latest checkpoint, or init(seed)
    for r in rounds not done yet:
        batch <- next(cohort iterator)        # Grain, prefetched in threads
        state, stats <- round(state, batch)   # one sharded XLA program
        log metrics; async Orbax save; evaluate every k rounds
    final evaluation over all test clients

Running the same command on the same workdir resumes. Everything a round
computes is a function of (config, round, server state), so a resumed run
ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from fedstream.algorithms import build_algorithm as make_algorithm
from fedstream.algorithms.dp_fedavg import privacy_ledger, round_log
from fedstream.algorithms.fedavg import FedAvg, ServerState, make_optimizer
from fedstream.config import ConfigError, check_clients_per_round, flatten, validate_train_config
from fedstream.data.augment import get_augmentation
from fedstream.data.cohort import ClientBatching, CohortPipeline, EvalPipeline, auto_data_threads
from fedstream.models import get_model
from fedstream.training.checkpoint import CheckpointCorrupted, RunCheckpointer, check_config_unchanged
from fedstream.training.client_store import ClientStateStore
from fedstream.training.lock import locked_workdir
from fedstream.training.metrics_log import MetricsLog, Progress
from fedstream.training.personalized_eval import evaluate_finetuned, evaluate_personal
from fedstream.training.rounds import (EVAL_SUMS, build_eval, build_train_round, local_device_positions, make_mesh,
                                       replicate, shard_batch, summarize_eval)

# Test hook: SIGKILL to this process at a chosen point of round K, for the
# kill-and-resume tests and benchmarks/chaos_resume.py:
#   kill_in_data:K      as round K asks for its data (reader threads busy)
#   kill_in_round:K     while round K's jitted computation runs (dispatched, not finished)
#   kill_during_save:K  right after the asynchronous save of round K started
#   kill_after_round:K  after round K's checkpoint is committed
FAULT_ENV = "FEDSTREAM_FAULT"
FAULT_KINDS = ("kill_in_data", "kill_in_round", "kill_during_save", "kill_after_round")


@dataclasses.dataclass
class TrainResult:
    """What a finished `train` call returns."""

    state: ServerState
    rounds_done: int
    final_eval: dict[str, float]
    workdir: pathlib.Path


def open_dataset(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Any:
    """Opens `config.data.path`, preprocessing it first with `config.data.recipe` if missing."""
    from fedstream.data.reader import FederatedDataset

    path = pathlib.Path(config.data.path)
    if not (path / "_SUCCESS").exists() and config.data.recipe:
        from fedstream.data.preprocessing import run_preprocess

        log(f"dataset {path} not found: preprocessing recipe {config.data.recipe!r} into it")
        run_preprocess(config.data.recipe, path, progress=log)
    return FederatedDataset(path)


def build_algorithm(config: ml_collections.ConfigDict, dataset: Any) -> FedAvg:
    """The model and FedAvg/FedOpt algorithm the config describes."""
    schema = dataset.schema
    input_key, label_key = "x", "y"
    for key in (input_key, label_key):
        if key not in schema:
            raise ConfigError(f"dataset {config.data.path} has no feature {key!r} (features: {', '.join(schema)})")
    options = config.model.options.to_dict() if "options" in config.model else {}
    model = get_model(config.model.name, schema[input_key].shape, config.model.num_classes,
                      input_dtype=schema[input_key].dtype,
                      loss_mask_ids=tuple(config.model.get("loss_mask_ids", ())),
                      accuracy_mask_ids=tuple(config.model.get("accuracy_mask_ids", ())),
                      hidden=tuple(config.model.hidden), conv_impl=config.model.conv_impl, **options)
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
    built = make_algorithm(name, model, client_tx, server_tx, context=context, **options)
    for key in built.extra_features:
        if key not in schema:
            raise ConfigError(f"algorithm {name!r} needs the dataset feature {key!r}; {config.data.path} has "
                              f"{', '.join(schema)}")
    return built


class TrainingDiverged(RuntimeError):
    """The run produced non-finite values and stopped; the last saved checkpoint is intact."""


def _last_good(checkpointer: RunCheckpointer) -> str:
    """Which checkpoint survives a stop, in words."""
    checkpointer.wait()
    latest = checkpointer.latest_round()
    return "no checkpoint was saved yet" if latest is None else f"the checkpoint of round {latest} is intact"


def _fault_point() -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    kind, _, k = spec.partition(":")
    if kind not in FAULT_KINDS or not k.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected KIND:ROUND with KIND one of {', '.join(FAULT_KINDS)}")
    return kind, int(k)


def _kill_if(fault: tuple[str, int] | None, kind: str, round_done: int) -> None:
    """SIGKILL this process when the fault hook asks for `kind` at round `round_done`."""
    if fault == (kind, round_done):
        os.kill(os.getpid(), signal.SIGKILL)


def _open_client_store(algorithm: FedAvg, state: ServerState, dataset: Any, config: ml_collections.ConfigDict,
                       workdir: pathlib.Path, checkpointer: RunCheckpointer, latest: int | None) -> ClientStateStore | None:
    """The per-client state store of a stateful algorithm (None otherwise), in step with the latest checkpoint."""
    template = algorithm.client_state_template(state.params)
    if template is None:
        return None
    if jax.process_count() > 1:
        raise ConfigError(f"algorithm {config.algorithm.name!r} keeps per-client state, which multi-process runs "
                          "do not support yet; run it in one process")
    template = jax.tree.map(np.asarray, jax.device_get(template))
    store = ClientStateStore(workdir / "client_state", template, len(dataset.client_sizes(config.data.train_split)))
    if latest is None:
        store.restore(store.index(), 0)  # a fresh run: drop files of a run killed before its first checkpoint
    else:
        store.restore(checkpointer.restore_client_index(latest), latest)
        for step in checkpointer.all_steps():  # `latest` was verified; an older bad index is refused if used
            try:
                store.note_committed(step, checkpointer.restore_client_index(step))
            except CheckpointCorrupted:
                continue
    return store


def restore_intact(checkpointer: RunCheckpointer, like_state: ServerState, *, client_store: bool,
                   resume_last_good: bool, log: Callable[[str], None]) -> tuple[ServerState, dict[str, Any]] | None:
    """(state, meta) of the newest checkpoint that reads back intact, or None when there is none.

    A corrupted newest checkpoint stops the run with `CheckpointCorrupted`
    unless `resume_last_good`: then it is moved to `corrupted_checkpoints/`
    (kept for inspection) and the next older one is tried.
    """
    while (step := checkpointer.latest_round()) is not None:
        try:
            state, meta = checkpointer.restore(step, like_state)
            if client_store:
                checkpointer.restore_client_index(step)
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


def _local_devices(mesh: jax.sharding.Mesh) -> tuple[int, ...] | None:
    """This process's mesh positions in a multi-process run (it reads only their clients), else None."""
    return local_device_positions(mesh) if jax.process_count() > 1 else None


def client_eval_sums(algorithm: FedAvg, params: Any, dataset: Any, config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh, eval_fn: Callable | None = None,
                     split: str | None = None) -> dict[str, np.ndarray]:
    """Per-client evaluation sums (`EVAL_SUMS`) of `params` over every client of `split` (default: test)."""
    chunk = int(config.eval.chunk_clients)
    pipeline = EvalPipeline(dataset, split or config.data.test_split,
                            (algorithm.model.input_key, algorithm.model.label_key),
                            int(config.eval.batch_size), mesh.size, chunk,
                            auto_data_threads(int(config.data_threads)), local_devices=_local_devices(mesh))
    eval_fn = eval_fn or build_eval(algorithm, mesh, chunk)
    sums: dict[str, list[np.ndarray]] = {key: [] for key in EVAL_SUMS}
    for part in pipeline.chunks():
        out = jax.device_get(eval_fn(params, shard_batch(part["batch"], mesh)))
        for key in sums:
            sums[key].append(np.asarray(out[key])[: len(part["clients"])])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in sums.items()}


def evaluate(algorithm: FedAvg, params: Any, dataset: Any, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, eval_fn: Callable | None = None) -> dict[str, float]:
    """Loss and accuracy of one model over all clients of the test split (pooled and client-averaged)."""
    return summarize_eval(client_eval_sums(algorithm, params, dataset, config, mesh, eval_fn))


def evaluate_state(algorithm: FedAvg, state: ServerState, dataset: Any, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, eval_fn: Callable | None = None) -> dict[str, float]:
    """The test evaluation of a server state: its model, or for HypCluster each client's best cluster
    model (chosen by the lowest loss on the client's train data, as FedJAX's HypClusterEvaluator)."""
    if not hasattr(algorithm, "num_clusters"):
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


@locked_workdir
def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          log: Callable[[str], None] = print, *, resume_last_good: bool = False,
          validated: bool = False) -> TrainResult:
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
    multi-process run); `clients_per_round` is checked against the train
    split once the dataset is open.
    """
    if not validated:
        validate_train_config(config)
    workdir = pathlib.Path(workdir)
    primary = jax.process_index() == 0
    if not primary:
        log = lambda *_: None  # noqa: E731
    workdir.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()

    checkpointer = RunCheckpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep)
    latest = checkpointer.latest_round()
    if latest is not None:
        try:  # early, before any work; restore_intact below checks the checkpoint actually used
            check_config_unchanged(checkpointer.read_meta(latest)["config"], config_dict, workdir)
        except CheckpointCorrupted:
            pass

    dataset = open_dataset(config, log)
    check_clients_per_round(config, num_train_clients=dataset.num_clients(config.data.train_split))
    algorithm = build_algorithm(config, dataset)
    mesh = make_mesh()
    batching = ClientBatching(int(config.client.batch_size), int(config.client.epochs),
                              int(config.client.max_examples), int(config.client.max_steps))
    features = (algorithm.model.input_key, algorithm.model.label_key, *algorithm.extra_features)
    pipeline = CohortPipeline(dataset, config.data.train_split, features,
                              seed=int(config.seed), cohort_size=int(config.clients_per_round), batching=batching,
                              num_devices=mesh.size, uniform_weights=config.aggregation == "uniform",
                              data_threads=auto_data_threads(int(config.data_threads)),
                              local_devices=_local_devices(mesh),
                              augment=get_augmentation(str(config.data.get("augment", ""))),
                              sampling=str(config.get("sampling", "uniform")),
                              sampling_rate=float(config.get("sampling_rate", 0.0)),
                              max_cohort_size=int(config.get("max_clients_per_round", 0)))
    num_rounds = int(config.num_rounds)
    nonfinite_policy = str(config.get("nonfinite", "skip"))  # one of config.NONFINITE_POLICIES (validated)

    state = replicate(algorithm.init(jax.random.PRNGKey(int(config.seed))), mesh)
    start = 0
    iterator = pipeline.iterator(max(num_rounds, 1))
    saved_privacy = None
    restored = None
    if latest is not None:
        restored = restore_intact(checkpointer, state, client_store=algorithm.client_state_template(state.params)
                                  is not None, resume_last_good=resume_last_good, log=log)
        latest = checkpointer.latest_round()
    if restored is not None:
        state, meta = restored
        check_config_unchanged(meta["config"], config_dict, workdir)
        start = int(state.round)
        iterator.set_state(meta["data_iterator"])
        saved_privacy = meta.get("privacy")
        log(f"resumed {workdir} from the checkpoint after round {start}")
    ledger = privacy_ledger(algorithm, saved_privacy, start)  # None unless the algorithm is DP
    if ledger is not None and start == 0:
        log(f"DP-FedAvg: clip C={algorithm.clip_norm:g}, noise multiplier z={algorithm.noise_multiplier:.4g}, "
            f"denominator D={algorithm.denominator:g}, {ledger.mechanism.sampling} sampling, "
            f"{ledger.accountant} accountant, delta={ledger.target_delta:.3g}")
    metrics_log = MetricsLog(workdir, resume_round=start, enabled=primary)
    metrics_log.write_hparams(flatten(config_dict))
    if not metrics_log.tensorboard_enabled and start == 0:
        log("TensorBoard summaries off (install fedstream[tensorboard]); metrics go to metrics.jsonl")

    store = _open_client_store(algorithm, state, dataset, config, workdir, checkpointer, latest)
    train_round = build_train_round(algorithm, mesh, seed=int(config.seed))
    eval_fn = build_eval(algorithm, mesh, int(config.eval.chunk_clients))
    progress = Progress(num_rounds, start, enabled=primary)
    fault = _fault_point()
    final_eval: dict[str, float] = {}
    try:
        for r in range(start, num_rounds):
            t0 = time.perf_counter()
            _kill_if(fault, "kill_in_data", r + 1)
            element = next(iterator)
            if element["round"] != r:
                raise RuntimeError(f"data iterator yielded round {element['round']} for round {r}")
            t_data = time.perf_counter()
            batch = element["batch"]
            if store is None:
                state, stats = train_round(state, shard_batch(batch, mesh))
            else:  # per-client state: read for the cohort, written back after the round
                clients = np.where(batch["slot_steps"] > 0, batch["slot_client"], -1)
                state, stats, new_states = train_round(state, shard_batch(batch, mesh),
                                                       shard_batch(store.read(clients), mesh))
                store.write(r + 1, clients, clients >= 0, jax.device_get(new_states))
            _kill_if(fault, "kill_in_round", r + 1)
            train_metrics = {k: float(v) for k, v in stats["metrics"].compute().items()}
            nonfinite = int(stats["nonfinite_clients"])
            if nonfinite and nonfinite_policy == "stop":
                client = str(dataset.client_ids(config.data.train_split)[int(stats["nonfinite_client"])])
                raise TrainingDiverged(f"round {r + 1}: client {client!r} sent a non-finite (NaN/Inf) update "
                                       f"({nonfinite} such clients); stopping as config nonfinite='stop' asks "
                                       f"({_last_good(checkpointer)}); nonfinite='skip' leaves such clients out instead")
            transform_log = round_log(jax.device_get(stats["logs"]))  # bits sent, clipped fraction, ...
            if ledger is not None:
                ledger.record_round()
                transform_log.update(dp_epsilon=ledger.epsilon(), dp_delta=ledger.target_delta)
            seconds = time.perf_counter() - t0
            metrics_log.write(r + 1, "train", {
                **transform_log,
                "cohort_size": element["cohort_size"],
                **train_metrics,
                "clients": element["num_clients_trained"],
                "empty_clients_skipped": element["num_clients_empty"],
                "examples": element["num_examples"],
                "steps": element["num_steps"],
                "padding_waste": element["padding_waste"],
                "nonfinite_clients_skipped": nonfinite,
                "round_seconds": seconds,
                "data_wait_seconds": t_data - t0,
                "examples_per_second": element["num_examples"] / max(seconds, 1e-9),
            })
            done = r + 1
            evaluate_now = done == num_rounds or (config.eval.every and done % int(config.eval.every) == 0)
            if evaluate_now:
                final_eval = evaluate_state(algorithm, state, dataset, config, mesh, eval_fn)
                if int(config.eval.get("finetune_steps", 0)):  # "FedAvg + fine-tune" personalization
                    final_eval.update(evaluate_finetuned(algorithm, state.params, dataset, config, mesh,
                                                         int(config.eval.finetune_steps), round_index=done))
                if store is not None and hasattr(algorithm, "personal_model"):  # e.g. Ditto's v_i
                    final_eval.update(evaluate_personal(algorithm, state.params, store, dataset, config, mesh))
                metrics_log.write(done, "eval", final_eval)
                if not np.isfinite(final_eval["loss"]):
                    raise TrainingDiverged(f"evaluation after round {done}: test loss is {final_eval['loss']} "
                                           f"(diverged); stopping ({_last_good(checkpointer)}); lower the learning "
                                           "rates and start a new workdir")
                progress.last_eval = f"test acc {final_eval['accuracy']:.4f}"
            meta = {"config": config_dict, "round": done, "seed": int(config.seed),
                    "data_iterator": iterator.get_state()}
            if ledger is not None:
                meta["privacy"] = ledger.to_json()
            client_index = store.index() if store is not None else None
            saved = checkpointer.save(done, state, meta, force=done == num_rounds, client_index=client_index)
            if store is not None:
                if saved:
                    store.note_committed(done, client_index)
                store.collect_garbage(checkpointer.all_steps() + ([done] if saved else []))
            progress.update(done, element["num_examples"], train_metrics, force=bool(evaluate_now))
            if fault and fault[1] == done and saved:
                if fault[0] == "kill_after_round":
                    checkpointer.wait()
                os.kill(os.getpid(), signal.SIGKILL)
        if start >= num_rounds:
            final_eval = evaluate_state(algorithm, state, dataset, config, mesh, eval_fn)
            log(f"run already complete ({start} rounds); final evaluation repeated")
    finally:
        checkpointer.close()
        if store is not None:
            store.close()
        metrics_log.close()
        iterator.close() if hasattr(iterator, "close") else None
    if final_eval:
        log(f"final test accuracy {final_eval['accuracy']:.4f} (example-weighted), "
            f"{final_eval['client_mean_accuracy']:.4f} (client mean), loss {final_eval['loss']:.4f} "
            f"over {final_eval['num_clients']} clients / {final_eval['num_examples']} examples")
    return TrainResult(state, max(start, num_rounds), final_eval, workdir)
