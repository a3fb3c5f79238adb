"""Round-time overhead of every algorithm relative to FedAvg on the EMNIST-shaped workload.

Reproduce (defaults: the 2x200 dense model, 10 clients per round, 3 passes of
20 timed rounds; the first run also writes the ~2 GiB dataset once):

    python benchmarks/algorithm_overhead.py                    # ~15 min on a 2-core VM
    python benchmarks/algorithm_overhead.py --clients 50 --json overhead_50.jsonl
    python benchmarks/algorithm_overhead.py --mode paired      # round-by-round interleaving, ~3 min
    python benchmarks/algorithm_overhead.py --mode paired --model cnn --rounds 6

Data: a federated-EMNIST-shaped synthetic dataset written once with
`DatasetWriter` (cached under `<system temp dir>/fedstream_bench/emnist_like_domains`,
`--data-dir` to move it, reused while its generator parameters match):
3,400 train clients with log-normal example counts (sigma 0.6, mean ~200),
float32 28x28x1 pixels, 62 classes, and an int32 `domain_id` per example (2
domains: odd clients mostly domain 1, even clients mostly domain 0) so that
AgnosticFedAvg runs; a small test split (first 340 clients, ~20 examples
each) keeps the end-of-run evaluation short. Labels are random: only shapes
and client sizes matter for the time.

Workload: `emnist_fedadam`'s settings (batch 20, 1 local epoch, no per-client
cap as in that pipeline unless `--max-examples`, client SGD lr 10^-1.5, server
Adam lr 10^-2.5) with the 2x200 dense model (`--model mlp`, default) or the
EMNIST CNN (`--model cnn`), checkpoints every round (keep 3) as the pipelines
do, evaluation only after the last round.

What is timed: each algorithm runs through the real train loop,
`fedstream.training.train.train(config, workdir)`, in a fresh temporary
workdir, for `--warmup + --rounds` rounds. Per round the loop logs
`round_seconds` (the data pipeline's `next()`, the jitted round, for stateful
algorithms the client-state store read and write, the metrics' device->host
copy, and for DP the privacy accountant) and `data_wait_seconds` (time
inside `next()`). This script also records the wall time between consecutive
rounds' metric records (`loop_s`): `round_seconds` plus what the loop does
after it (the synchronous part of the Orbax checkpoint save, the store's
garbage collection, progress output). The first `--warmup` rounds, and every
round whose packed stream length did not occur in an earlier round (a new
XLA compilation), are left out; the same rounds are left out for every
algorithm (all see the same cohorts: same seed), so the medians compare the
same clients.

Interleaving: `--repeats` passes; each pass runs every algorithm once, in a
fresh seeded random order. Reported per algorithm: the median of its
per-round times over all passes, and the median over passes of
(its median in the pass) / (FedAvg's median in the same pass).
`--checkpoint-every N` (N above the rounds: only the final checkpoint) shows
the rounds without the per-round save.

`--mode paired` (see `run_paired`): all algorithms in one process on one
shared data pipeline, interleaved round by round on the same batch, without
checkpoints; ratio = median over rounds of the per-round ratio to FedAvg.
Finer interleaving than whole runs, so steadier ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from fedstream.data.cohort import ClientBatching, CohortPipeline, auto_data_threads
from fedstream.data.format import FeatureSpec
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DEFAULT_COMPRESSION, DatasetWriter
from fedstream.pipelines import emnist_fedadam
from fedstream.training.simulation import open_privacy_ledger
from fedstream.training import simulation as simulation_module
from fedstream.training import train as train_module
from fedstream.training.client_store import ClientStateStore
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch

NUM_CLIENTS = 3400
TEST_CLIENTS = 340
MEAN_EXAMPLES = 200
TEST_MEAN_EXAMPLES = 20
SIGMA = 0.6
NUM_CLASSES = 62
SHAPE = (28, 28, 1)
RECORDS_PER_SHARD = 4096

# name -> (algorithm.name, algorithm.options, config overrides)
ALGORITHMS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "fedavg": ("fedavg", {}, {}),
    "fedprox": ("fedprox", {"proximal_weight": 0.01}, {}),
    "fednova": ("fednova", {}, {}),
    "scaffold": ("scaffold", {}, {}),
    "mime": ("mime", {"server_learning_rate": 1.0}, {"client.momentum": 0.9}),
    "mimelite": ("mimelite", {"server_learning_rate": 1.0}, {"client.momentum": 0.9}),
    "agnostic_fedavg": ("agnostic_fedavg", {"init_domain_weights": (0.5, 0.5), "domain_learning_rate": 0.1,
                                            "domain_algorithm": "eg", "domain_window_size": 1}, {}),
    "hyp_cluster": ("hyp_cluster", {"num_clusters": 2}, {}),
    "ditto": ("ditto", {}, {}),
    "dp_fedavg": ("dp_fedavg", {"clip_norm": 1.0, "noise_multiplier": 1.0, "accountant": "rdp"},
                  {"sampling": "uniform"}),
    "quantize8_rotate": ("compressed_fedavg", {"compression": "quantize", "bits": 8, "rotate": True}, {}),
    "topk_ef": ("compressed_fedavg", {"compression": "topk", "topk_fraction": 0.05, "error_feedback": True}, {}),
}
STATEFUL = {"scaffold", "ditto", "topk_ef"}  # keep per-client state in the ClientStateStore


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def client_sizes(rng: np.random.Generator, n: int, mean: float) -> np.ndarray:
    """Log-normal example counts with the given mean (sigma SIGMA), at least 1."""
    return np.maximum(1, rng.lognormal(np.log(mean) - SIGMA**2 / 2, SIGMA, n).astype(int))


def dataset_dir(root: pathlib.Path, num_clients: int = NUM_CLIENTS) -> pathlib.Path:
    """Writes the EMNIST-shaped dataset with `domain_id` under `root` once; reuses it while its parameters match."""
    params = {"clients": num_clients, "test_clients": TEST_CLIENTS, "mean": MEAN_EXAMPLES,
              "test_mean": TEST_MEAN_EXAMPLES, "sigma": SIGMA, "classes": NUM_CLASSES, "domains": 2, "seed": 0,
              "compression": DEFAULT_COMPRESSION}
    path = root / ("emnist_like_domains" if num_clients == NUM_CLIENTS else f"emnist_like_domains_{num_clients}")
    if (path / "_SUCCESS").exists() and FederatedDataset(path).metadata.get("generator") == params:
        sizes = FederatedDataset(path).client_sizes("train")
        print(f"reusing {path}: {len(sizes)} train clients, {int(sizes.sum()):,} examples", flush=True)
        return path
    rng = np.random.default_rng(0)
    schema = {"x": FeatureSpec("float32", SHAPE), "y": FeatureSpec("int32", ()),
              "domain_id": FeatureSpec("int32", ())}
    t0 = time.perf_counter()
    splits = {"train": client_sizes(rng, num_clients, MEAN_EXAMPLES),
              "test": client_sizes(rng, min(TEST_CLIENTS, num_clients), TEST_MEAN_EXAMPLES)}
    with DatasetWriter(path, schema, metadata={"recipe": "benchmark", "generator": params},
                       records_per_shard=RECORDS_PER_SHARD) as writer:
        for split, sizes in splits.items():
            for i, n in enumerate(sizes):
                pixels = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8).astype(np.float32) / 255.0
                labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
                domains = (rng.random(n) < (0.85 if i % 2 else 0.15)).astype(np.int32)
                writer.add_client(split, f"c{i:05d}", {"x": pixels, "y": labels, "domain_id": domains})
    print(f"wrote {path}: {num_clients} train clients, {int(splits['train'].sum()):,} examples, "
          f"{_dir_bytes(path) / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def make_config(name: str, data_path: pathlib.Path, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """emnist_fedadam's config with the benchmark's model, cohort, rounds and the algorithm `name`."""
    c = emnist_fedadam.get_config()
    c.num_rounds = args.warmup + args.rounds
    c.clients_per_round = args.clients
    c.data.path = str(data_path)
    c.data.recipe = ""
    c.data_threads = args.data_threads
    c.model.name = args.model
    c.model.hidden = (200, 200)
    c.model.num_classes = NUM_CLASSES
    c.client.max_examples = args.max_examples
    c.eval.every = 0  # only after the last round
    c.checkpoint.every = args.checkpoint_every
    c.checkpoint.keep = 3
    algorithm, options, overrides = ALGORITHMS[name]
    c.algorithm.name = algorithm
    c.algorithm.options = ml_collections.ConfigDict(options)
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (c[section] if section else c)[leaf] = value
    return c


def stream_lengths(config: ml_collections.ConfigDict) -> list[int]:
    """The packed (bucketed) stream length of every round, as the train loop's pipeline will build them."""
    ds = FederatedDataset(config.data.path)
    batching = ClientBatching(int(config.client.batch_size), int(config.client.epochs),
                              int(config.client.max_examples), int(config.client.max_steps))
    devices = jax.device_count()
    pipeline = CohortPipeline(ds, config.data.train_split, ("x", "y"), seed=int(config.seed),
                              cohort_size=int(config.clients_per_round), batching=batching,
                              num_devices=devices, data_threads=0)
    return [min(pipeline.chunk_shapes([r])) for r in range(int(config.num_rounds))]


def timed_rounds(lengths: list[int], warmup: int) -> list[int]:
    """Rounds (1-based, as in metrics.jsonl) after the warm-up whose stream length was compiled before."""
    seen: set[int] = set()
    keep = []
    for r, length in enumerate(lengths, start=1):
        if r > warmup and length in seen:
            keep.append(r)
        seen.add(length)
    return keep


class _TimedMetricsLog(simulation_module.MetricsLog):
    """MetricsLog that notes the wall clock of every train record (to time the whole loop iteration)."""

    stamps: dict[int, float] = {}

    def write(self, round_index: int, kind: str, values: Any) -> None:
        if kind == "train":
            _TimedMetricsLog.stamps[int(round_index)] = time.perf_counter()
        super().write(round_index, kind, values)


def run_one(name: str, data_path: pathlib.Path, args: argparse.Namespace, keep: list[int],
            work: pathlib.Path) -> dict[str, Any]:
    """Trains `name` in a fresh workdir; its per-round times over the `keep` rounds."""
    config = make_config(name, data_path, args)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_", dir=work))
    _TimedMetricsLog.stamps = {}
    original = simulation_module.MetricsLog
    simulation_module.MetricsLog = _TimedMetricsLog
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the loop's progress lines
            result = train_module.train(config, workdir, log=lambda _: None)
    finally:
        simulation_module.MetricsLog = original
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = {r["round"]: r for r in records if r["kind"] == "train"}
    stamps = _TimedMetricsLog.stamps
    stateful = (workdir / "client_state").exists()
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "algorithm": name, "stateful": stateful, "wall_s": wall,
        "round_s": [train_records[r]["round_seconds"] for r in keep],
        "data_wait_s": [train_records[r]["data_wait_seconds"] for r in keep],
        "loop_s": [stamps[r] - stamps[r - 1] for r in keep],
        "steps": [train_records[r]["steps"] for r in keep],
        "final_accuracy": float(result.final_eval.get("accuracy", float("nan"))),
    }


def run_paired(names: list[str], data_path: pathlib.Path, args: argparse.Namespace, keep: list[int],
               work: pathlib.Path) -> list[dict[str, Any]]:
    """All algorithms in one process, interleaved round by round on the same batch (no checkpoints).

    Per round: one `next()` of a CohortPipeline that loads `domain_id` too
    (its time is the round's data wait, shared by all); then every algorithm,
    in a fresh random order, runs what the train loop runs for it between
    `next()` and the metrics record: `shard_batch`, the jitted round, for
    stateful algorithms the store read and write (plus the store's commit
    note and garbage collection, keep 3, as after a checkpoint), the metrics'
    device->host copy and, for DP, the privacy accountant. Per algorithm:
    median seconds and the median over rounds of the per-round ratio to FedAvg.
    """
    dataset = FederatedDataset(data_path)
    mesh = make_mesh()
    population = len(dataset.client_sizes("train"))
    runs = {}
    for name in names:
        config = make_config(name, data_path, args)
        algorithm = train_module.build_algorithm(config, dataset)
        state = replicate(algorithm.init(jax.random.PRNGKey(int(config.seed))), mesh)
        template = algorithm.client_state_template(state.params) if algorithm.has_client_state else None
        store = None
        if template is not None:
            store = ClientStateStore(work / name, jax.tree.map(np.asarray, jax.device_get(template)), population)
        runs[name] = {"algorithm": algorithm, "state": state, "store": store, "committed": [],
                      "round": build_train_round(algorithm, mesh, seed=int(config.seed)),
                      "ledger": open_privacy_ledger(algorithm.privacy_accounting()), "times": [],
                      "domain": "domain_id" in algorithm.extra_features}
    config = make_config("fedavg", data_path, args)
    batching = ClientBatching(int(config.client.batch_size), int(config.client.epochs),
                              int(config.client.max_examples), int(config.client.max_steps))
    pipeline = CohortPipeline(dataset, "train", ("x", "y", "domain_id"), seed=int(config.seed),
                              cohort_size=args.clients, batching=batching, num_devices=mesh.size,
                              data_threads=auto_data_threads(args.data_threads), chunk_bytes=0)
    iterator = pipeline.iterator(int(config.num_rounds))
    rng = np.random.default_rng(args.seed)
    waits = []
    for r in range(1, int(config.num_rounds) + 1):
        t0 = time.perf_counter()
        element = next(iterator)
        wait = time.perf_counter() - t0
        for name in (names[i] for i in rng.permutation(len(names))):
            run = runs[name]
            batch = element["batch"] if run["domain"] else {k: v for k, v in element["batch"].items()
                                                            if k != "domain_id"}
            t0 = time.perf_counter()
            store = run["store"]
            if store is None:
                run["state"], stats = run["round"](run["state"], shard_batch(batch, mesh))
            else:
                clients = np.where(batch["slot_steps"] > 0, batch["slot_client"], -1)
                run["state"], stats, new_states = run["round"](run["state"], shard_batch(batch, mesh),
                                                               shard_batch(store.read(clients), mesh))
                store.write(r, clients, clients >= 0, jax.device_get(new_states))
            record = {k: float(v) for k, v in stats["metrics"].compute().items()}  # what the loop logs
            record.update(run["algorithm"].log_values(jax.device_get(stats["logs"])),
                          nonfinite=int(stats["nonfinite_clients"]))
            if run["ledger"] is not None:
                run["ledger"].record_round()
                record["dp_epsilon"] = run["ledger"].epsilon()
            if store is not None:
                store.note_committed(r, store.index())
                run["committed"] = (run["committed"] + [r])[-3:]
                store.collect_garbage(run["committed"])
            if r in keep:
                run["times"].append(time.perf_counter() - t0)
        if r in keep:
            waits.append(wait)
    iterator.close()
    rows = []
    for name in names:
        times = runs[name]["times"]
        ratios = [t / f for t, f in zip(times, runs["fedavg"]["times"])]
        rows.append({"algorithm": name, "stateful": runs[name]["store"] is not None, "rounds": len(times),
                     "round_s_median": statistics.median(times), "paired_ratio_median": statistics.median(ratios),
                     "paired_ratio_q25": float(np.percentile(ratios, 25)),
                     "paired_ratio_q75": float(np.percentile(ratios, 75)),
                     "ratio_of_medians": statistics.median(times) / statistics.median(runs["fedavg"]["times"]),
                     "data_wait_s_median": statistics.median(waits), "round_s": times})
        if runs[name]["store"] is not None:
            runs[name]["store"].close()
    return rows


def paired_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the paired mode."""
    lines = ["| algorithm | store | round s (median) | **paired ratio to FedAvg** (median) | ratio IQR | "
             "ratio of medians |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {'yes' if r['stateful'] else '-'} | {r['round_s_median']:.4f} | "
                     f"**{r['paired_ratio_median']:.2f}** | {r['paired_ratio_q25']:.2f}-{r['paired_ratio_q75']:.2f} | "
                     f"{r['ratio_of_medians']:.2f} |")
    return "\n".join(lines)


def summarize(passes: list[dict[str, dict[str, Any]]], names: list[str]) -> list[dict[str, Any]]:
    """Per algorithm: medians over all timed rounds of all passes, and median over passes of the ratio to FedAvg."""
    rows = []
    for name in names:
        runs = [p[name] for p in passes if name in p]
        if not runs:
            continue
        row = {"algorithm": name, "stateful": runs[0]["stateful"], "passes": len(runs),
               "timed_rounds_per_pass": len(runs[0]["round_s"])}
        for key in ("round_s", "loop_s", "data_wait_s"):
            row[f"{key}_median"] = statistics.median(v for run in runs for v in run[key])
        for key in ("round_s", "loop_s"):
            ratios = [statistics.median(p[name][key]) / statistics.median(p["fedavg"][key])
                      for p in passes if name in p and "fedavg" in p]
            if ratios:
                row[f"{key}_ratio"] = statistics.median(ratios)
                row[f"{key}_ratio_min"], row[f"{key}_ratio_max"] = min(ratios), max(ratios)
        row["wall_s_median"] = statistics.median(run["wall_s"] for run in runs)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown results table."""
    lines = ["| algorithm | options | store | round s (median) | **ratio to FedAvg** | ratio range over passes | "
             "loop s (median) | loop ratio | data wait s (median) | wall s per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        algorithm, options, overrides = ALGORITHMS[r["algorithm"]]
        opts = ", ".join(f"{k}={v}" for k, v in {**options, **overrides}.items()
                         if k not in ("compression", "accountant", "sampling")) or "-"
        label = r["algorithm"] if algorithm == r["algorithm"] else f"{algorithm} ({options['compression']})"
        lines.append(f"| {label} | {opts} | {'yes' if r['stateful'] else '-'} | {r['round_s_median']:.4f} | "
                     f"**{r.get('round_s_ratio', float('nan')):.2f}** | "
                     f"{r.get('round_s_ratio_min', float('nan')):.2f}-{r.get('round_s_ratio_max', float('nan')):.2f} | "
                     f"{r['loop_s_median']:.4f} | {r.get('loop_s_ratio', float('nan')):.2f} | "
                     f"{r['data_wait_s_median']:.4f} | {r['wall_s_median']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="train", choices=("train", "paired"),
                        help="train: each algorithm through train() (checkpoints included), interleaved by pass; "
                             "paired: all algorithms in one loop, interleaved round by round, no checkpoints")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"), help="2x200 dense model or EMNIST CNN")
    parser.add_argument("--clients", type=int, default=10, help="clients per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per run after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first rounds (compilation)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes over all algorithms (train mode)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated; fedavg is always run")
    parser.add_argument("--max-examples", type=int, default=0, help="per-client example cap (0 = none, as EMNIST)")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="rounds between checkpoints (1 = every round, as the pipelines; a value above the "
                             "rounds = only the final one, to see the algorithms without the save)")
    parser.add_argument("--data-threads", type=int, default=0, help="reader threads (0 = auto, as the train loop)")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"))
    parser.add_argument("--population", type=int, default=NUM_CLIENTS, help="train clients of the dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-pass algorithm order")
    parser.add_argument("--json", default="", help="also append JSON lines (one per run and per algorithm) here")
    args = parser.parse_args()

    names = [n for n in args.algorithms.split(",") if n]
    unknown = sorted(set(names) - set(ALGORITHMS))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; known: {', '.join(ALGORITHMS)}")
    if "fedavg" not in names:
        names.insert(0, "fedavg")
    data_path = dataset_dir(pathlib.Path(args.data_dir), args.population)

    lengths = stream_lengths(make_config("fedavg", data_path, args))
    keep = timed_rounds(lengths, args.warmup)
    print(f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), "
          f"{os.cpu_count()} CPU cores; model={args.model} clients/round={args.clients} "
          f"rounds={args.warmup + args.rounds}; stream lengths {sorted(set(lengths))}; "
          f"timed rounds {len(keep)} (left out: the first {args.warmup} and "
          f"{args.rounds - len(keep)} that compile a new stream length)", flush=True)
    if not keep:
        raise SystemExit("no timed rounds left; raise --rounds")

    # Warm the page cache with the clients of these rounds (the first run would otherwise read cold files).
    warm = CohortPipeline(FederatedDataset(data_path), "train", ("x", "y", "domain_id"), seed=0,
                          cohort_size=args.clients, batching=ClientBatching(20, 1, args.max_examples),
                          num_devices=jax.device_count(), data_threads=0, chunk_bytes=0).iterator(len(lengths))
    for _ in lengths:
        next(warm)
    warm.close()

    out = open(args.json, "a") if args.json else None
    meta = {"mode": args.mode, "model": args.model, "clients_per_round": args.clients,
            "checkpoint_every": args.checkpoint_every, "rounds": args.rounds, "warmup": args.warmup,
            "timed_rounds": keep, "jax": jax.__version__, "cpu_cores": os.cpu_count(),
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    work = pathlib.Path(tempfile.mkdtemp(prefix="fedstream_overhead_"))
    rng = np.random.default_rng(args.seed)
    passes: list[dict[str, dict[str, Any]]] = []
    try:
        if args.mode == "paired":
            rows = run_paired(names, data_path, args, keep, work)
            print(paired_table(rows))
            if out:
                for row in rows:
                    out.write(json.dumps({**meta, "summary": True, **row}) + "\n")
            return
        for p in range(args.repeats):
            order = [names[i] for i in rng.permutation(len(names))]
            results: dict[str, dict[str, Any]] = {}
            for name in order:
                try:
                    run = run_one(name, data_path, args, keep, work)
                except Exception as e:  # report and go on with the other algorithms
                    print(f"pass={p} algorithm={name} FAILED: {type(e).__name__}: {e}", flush=True)
                    if out:
                        out.write(json.dumps({**meta, "pass": p, "algorithm": name, "error": repr(e)}) + "\n")
                    continue
                results[name] = run
                print(f"pass={p} algorithm={name} round_s={statistics.median(run['round_s']):.4f} "
                      f"loop_s={statistics.median(run['loop_s']):.4f} "
                      f"data_wait_s={statistics.median(run['data_wait_s']):.4f} wall_s={run['wall_s']:.1f}",
                      flush=True)
                if out:
                    out.write(json.dumps({**meta, "pass": p, **run}) + "\n")
            passes.append(results)
        rows = summarize(passes, names)
        print()
        print(table(rows))
        if out:
            for row in rows:
                out.write(json.dumps({**meta, "summary": True, **row}) + "\n")
    finally:
        if out:
            out.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
