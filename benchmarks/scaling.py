"""Scale and speed: round time vs clients per round, padding waste, and host device count.

Reproduce (2-core CPU VM; see benchmarks/README.md for the measured numbers):

    python benchmarks/scaling.py --quick                   # smoke test, tiny sizes (~1.5 min idle, 4 min loaded)
    python benchmarks/scaling.py --json scaling.jsonl      # parts b, c, f; 3 repetitions (63 min, loaded VM)
    python benchmarks/scaling.py --summarize scaling.jsonl # medians, fits and the plot again, from the JSON
    python benchmarks/scaling.py --parts c                 # only the padding-waste table (seconds)

Parts (letters of the "Scale and speed" issue):

* b: clients-per-round scaling. Median round time for 10 ... 5000 clients per
  round on two workloads: the EMNIST-shaped synthetic dataset of
  round_efficiency.py (its generator, with 10,000 clients so that 5000 can
  be sampled) with the 2x200 dense model and FedAdam as there (batch 20, 1
  epoch); and Synthetic(1, 1) of FedProx written by the `synthetic` recipe
  with 10,000 devices, multinomial logistic regression, FedAvg (batch 10,
  client SGD lr 0.01, server SGD lr 1; 1 local epoch instead of FedProx's 20,
  see SYNTHETIC_EPOCHS). Each configuration runs in its own subprocess (peak
  RSS per configuration), compiles every stream length its rounds use, runs
  one untimed round, then times rounds as the train loop runs them:
  `next(iterator)` + `shard_batch` + the jitted round + `block_until_ready`.
  Reported: examples and steps per round, median round time, the data-wait
  fraction (time inside `next(iterator)` / round time, summed over the timed
  rounds: part d of the issue), peak RSS, the bytes of one packed round. A
  least-squares line round_time = slope * examples + intercept is fitted per
  workload over every timed round and plotted (--plot).
* c: padding waste on Stack-Overflow-like client sizes (host-side only, no
  training): fedstream's packing (`pack_clients`, `bucket_steps`,
  `padding_waste`) against the vmap baseline that pads every client to the
  round's longest, over 200 rounds at 50 and 500 clients per round on 1, 8
  and 64 devices.
* f: 1 vs 2 vs 4 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N
  in the subprocess) on the EMNIST-shaped dense round at 50 and 500 clients
  per round: median round time and the largest parameter difference from the
  1-device run after the first round (same start, only the summation order
  differs) and after the last timed round. In the first repetition one more
  1-device run starts from parameters perturbed by 1e-8: how much training
  on random labels amplifies a change that small over the same rounds.

A configuration whose RSS passes the guard (--max-rss-gb) with the train
loop's prefetching pipeline is killed and rerun with the pipeline inside
`next()` (`pipeline=serial`: no read-ahead, less memory; its data cost then
shows as data wait).

Repetitions (`--repeats`, default 3) run the whole grid that many times,
interleaved (repetition is the outer loop), and the summaries give the
median over repetitions of each configuration's median round time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

# round_efficiency.py lives next to this file; running `python benchmarks/scaling.py` puts
# benchmarks/ first on sys.path.
import round_efficiency
from run_info import stamp
from fedstream.data.cohort import ClientBatching, bucket_steps, pack_clients, padding_waste, sample_cohort

COHORTS = (10, 50, 100, 500, 1000, 2000, 5000)
QUICK_COHORTS = (10, 100)
POPULATION = 10_000  # clients of both part-b datasets (5000 per round must be possible)
QUICK_POPULATION = 300
MAX_ROUNDS_SMALL = 25  # timed rounds for the smallest cohorts (noisy, cheap rounds)
QUICK_MAX_ROUNDS = 3

# Synthetic(1, 1): FedProx's batch and learning rate. FedProx trains 20 local epochs; the
# packed stream holds every epoch's copy of a client's examples, so 20 epochs at 5000
# clients per round would be ~9 GB per round. One epoch keeps "examples per round" the
# quantity the round time is fitted against.
SYNTHETIC_BATCH = 10
SYNTHETIC_EPOCHS = 1
SYNTHETIC_CLIENT_LR = 0.01
SYNTHETIC_SERVER_LR = 1.0

# Part c: Stack-Overflow-like client sizes. TFF's Stack Overflow has 342,477 training
# clients and 135,818,730 training examples (397 per client on average, a long tail);
# the standard next-word-prediction task caps a client at 1000 sentences
# (max_elements_per_user) and uses client batch 16 (Reddi et al., 2021).
SO_CLIENTS = 342_477
SO_MU, SO_SIGMA = 4.0, 2.0  # log-normal mean exp(mu + sigma^2 / 2) = 403 examples per client
SO_CAP = 1000
SO_BATCH = 16
SO_ROUNDS = 200
SO_COHORTS = (50, 500)
SO_DEVICES = (1, 8, 64)
WASTE_TARGET = 0.10
SHAPES_TARGET = 8

# Part f.
DEVICE_COUNTS = (1, 2, 4)
PERTURBATION = 1e-8  # scale of the perturbed-start reference run
F_COHORTS = (50, 500)
QUICK_F_COHORTS = (20,)

WORKLOADS = ("emnist_mlp", "synthetic_logistic")


# ----------------------------------------------------------------------------- helpers


def timed_rounds(cohort: int, minimum: int, maximum: int = MAX_ROUNDS_SMALL) -> int:
    """Timed rounds for a cohort size: at least `minimum`, more (up to `maximum`) for small, cheap, noisy rounds."""
    return max(minimum, min(maximum, 2000 // cohort))


def least_squares(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Fits y = slope * x + intercept; returns (slope, intercept, R^2)."""
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = ys - (slope * xs + intercept)
    total = ys - ys.mean()
    r2 = 1.0 - float(residual @ residual) / float(total @ total) if total.any() else float("nan")
    return float(slope), float(intercept), r2


def vmap_padding_waste(steps: Sequence[int], num_devices: int) -> float:
    """Waste of the vmap baseline: every client padded to the round's longest, slots spread evenly.

    The cohort is padded to a multiple of the device count, so a round costs
    `slots * max(steps)` client-steps of which `sum(steps)` are real.
    """
    counts = np.asarray(steps, np.int64)
    slots = -(-counts.size // num_devices) * num_devices
    executed = slots * int(counts.max()) if counts.size else 0
    return 1.0 - int(counts.sum()) / executed if executed else 0.0


def whole_client_waste_bound(steps: Sequence[int], num_devices: int) -> float:
    """Least padding waste of any assignment of whole clients to devices.

    The busiest device runs at least the longest client and at least the
    average load, so waste >= 1 - sum / (devices * max(longest, ceil(sum / devices))).
    """
    counts = np.asarray(steps, np.int64)
    total = int(counts.sum())
    busiest = max(int(counts.max()), -(-total // num_devices)) if counts.size else 0
    return 1.0 - total / (num_devices * busiest) if busiest else 0.0


def packed_round_plan(steps: Sequence[int], num_devices: int) -> tuple[float, int, float]:
    """fedstream's plan of one round: (padding waste, bucketed stream length, stream fill waste).

    Padding waste counts idle device-steps at the busiest device's length
    (`padding_waste`); the stream fill waste is the share of the bucketed
    stream that holds no step (allocated and transferred, never executed).
    """
    _, _, load = pack_clients(steps, num_devices)
    length = bucket_steps(int(load.max()) if load.size else 1)
    return padding_waste(load), length, 1.0 - int(load.sum()) / (num_devices * length)


def so_client_sizes(num_clients: int, mu: float, sigma: float, seed: int = 0) -> np.ndarray:
    """Example counts `max(1, floor(LogNormal(mu, sigma)))` of a Stack-Overflow-like population (uncapped)."""
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.lognormal(mu, sigma, num_clients).astype(np.int64))


def median_or_nan(values: Iterable[float]) -> float:
    """Median of the values, NaN if there are none."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def format_line(record: dict[str, Any], keys: Sequence[str]) -> str:
    """`key=value` for the given keys of a result (floats with 4 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return ",".join(fmt(x) for x in v)
        return str(v)
    return " ".join(f"{k}={fmt(record[k])}" for k in keys if k in record)


def meminfo_bytes(field: str) -> int:
    """A field of /proc/meminfo (e.g. MemTotal, MemAvailable) in bytes; 0 where it cannot be read."""
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_rss_bytes(pid: int) -> int:
    """Current resident set size of a process from /proc (0 if gone)."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def warm_page_cache(path: pathlib.Path, chunk: int = 1 << 24) -> float:
    """Reads every file under `path` once (so timed rounds read from the page cache); returns seconds."""
    t0 = time.perf_counter()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(chunk):
                    pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- datasets


def emnist_dataset(root: pathlib.Path, num_clients: int) -> pathlib.Path:
    """The EMNIST-shaped dataset of round_efficiency.py with `num_clients` clients (written once)."""
    return round_efficiency.dataset_dir(root, num_clients)


def synthetic_dataset(root: pathlib.Path, num_devices: int) -> pathlib.Path:
    """Synthetic(1, 1) with `num_devices` devices through the `synthetic` recipe (a no-op when up to date)."""
    from fedstream.data.preprocessing import run_preprocess

    return run_preprocess("synthetic", root / f"synthetic_1_1_{num_devices}", [f"num_devices={num_devices}"],
                          progress=None)


# ----------------------------------------------------------------------------- worker (one configuration)


def make_workload(name: str) -> tuple[Any, ClientBatching]:
    """(FedAvg algorithm, client batching) of a part-b workload."""
    from fedstream.algorithms.fedavg import FedAvg, make_optimizer
    from fedstream.models import get_model

    if name == "emnist_mlp":
        return round_efficiency.make_algorithm("mlp"), ClientBatching(round_efficiency.BATCH, 1)
    if name == "synthetic_logistic":
        from fedstream.recipes import synthetic

        model = get_model("logistic", (synthetic.DIMENSION,), synthetic.NUM_CLASSES)
        algorithm = FedAvg(model, make_optimizer("sgd", SYNTHETIC_CLIENT_LR),
                           make_optimizer("sgd", SYNTHETIC_SERVER_LR))
        return algorithm, ClientBatching(SYNTHETIC_BATCH, SYNTHETIC_EPOCHS)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def measure_rounds(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one configuration in this process and returns its measurements.

    `spec`: workload, data (dataset path), cohort, rounds (timed), warmup,
    data_threads (0 = auto, -1 = none: the pipeline runs inside `next()`),
    params_out / params_first_out (optional .npz paths for the parameters
    after the last / the first round), perturb (optional: add
    perturb * N(0, 1) to the initial parameters). Compiles every stream
    length ahead of time (abstract arguments: no round-sized dummy batch is
    allocated), runs `warmup` untimed rounds, then times `rounds` rounds.
    """
    import jax

    from fedstream.data.cohort import CohortPipeline, auto_data_threads
    from fedstream.data.reader import FederatedDataset
    from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch

    compiles = [0]

    def count_compiles(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(count_compiles)
    t_start = time.perf_counter()
    ds = FederatedDataset(spec["data"])
    algorithm, batching = make_workload(spec["workload"])
    mesh = make_mesh()
    cohort, rounds, warmup = int(spec["cohort"]), int(spec["rounds"]), int(spec["warmup"])
    total = warmup + rounds
    threads = int(spec.get("data_threads", 0))
    pipe = CohortPipeline(ds, "train", ("x", "y"), seed=0, cohort_size=cohort, batching=batching,
                          num_devices=mesh.size, data_threads=0 if threads < 0 else auto_data_threads(threads),
                          chunk_bytes=0)
    round_fn = build_train_round(algorithm, mesh, seed=0)
    state = algorithm.init(jax.random.PRNGKey(0))
    if spec.get("perturb"):
        noise = np.random.default_rng(1)
        state = state.replace(params=jax.tree.map(
            lambda a: a + (spec["perturb"] * noise.standard_normal(a.shape)).astype(a.dtype), state.params))
    state = replicate(state, mesh)

    t0 = time.perf_counter()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients"))
    lengths = sorted(round_efficiency.round_shapes(pipe, range(total)))
    for shape in lengths:
        # np.zeros is not touched, so this costs no memory; the compiled program lands in
        # jax's cache and the first real call of that shape reuses it.
        dummy = pipe.empty_chunk(shape)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in dummy.items()}
        round_fn.lower(state, abstract).compile()
    compile_s = time.perf_counter() - t0
    compiles_before = compiles[0]

    iterator = pipe.iterator(total)
    round_s, wait_s, examples, steps, packed, stream = [], [], [], [], [], []
    for r in range(total):
        t0 = time.perf_counter()
        element = next(iterator)
        t1 = time.perf_counter()
        state, stats = round_fn(state, shard_batch(element["batch"], mesh))
        jax.block_until_ready((state, stats))
        t2 = time.perf_counter()
        if r == 0 and spec.get("params_first_out"):
            save_params(state.params, spec["params_first_out"])
        if r < warmup:
            compiles_before = compiles[0]  # the first real call may compile tiny helpers
            continue
        round_s.append(t2 - t0)
        wait_s.append(t1 - t0)
        examples.append(int(element["num_examples"]))
        steps.append(int(element["num_steps"]))
        packed.append(int(sum(v.nbytes for v in element["batch"].values())))
        stream.append(int(element["stream_length"]))
        # `element` stays referenced while the next round is produced, as in the train loop.
    iterator.close()
    if spec.get("params_out"):
        save_params(state.params, spec["params_out"])
    return {
        "workload": spec["workload"], "clients_per_round": cohort, "rounds": rounds, "warmup_rounds": warmup,
        "devices": mesh.size, "data_threads": pipe.data_threads,
        "examples_per_round": median_or_nan(examples), "steps_per_round": median_or_nan(steps),
        "round_median_s": median_or_nan(round_s), "round_min_s": min(round_s),
        "data_wait_frac": sum(wait_s) / sum(round_s), "data_wait_median_s": median_or_nan(wait_s),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "packed_bytes": median_or_nan(packed), "stream_lengths": sorted(set(stream)),
        "compiled_lengths": len(lengths), "compile_s": compile_s,
        "compiles_during_timed": compiles[0] - compiles_before,
        "round_s": round_s, "wait_s": wait_s, "examples": examples, "steps": steps,
        "worker_s": time.perf_counter() - t_start,
    }


def save_params(params: Any, path: str) -> None:
    """Writes the leaves of a parameter tree to an .npz file (arrays only, no pickle)."""
    import jax

    np.savez(path, *[np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(params))])


def worker_main(spec_json: str) -> None:
    """Entry point of a configuration subprocess: measures, then writes the result JSON to spec['out']."""
    spec = json.loads(spec_json)
    result = measure_rounds(spec)
    pathlib.Path(spec["out"]).write_text(json.dumps(result))


@dataclasses.dataclass
class Launcher:
    """Runs configurations in subprocesses, each with its own peak RSS, under an RSS guard."""

    workdir: pathlib.Path
    max_rss_bytes: int
    timeout_s: float = 1800.0
    counter: int = 0

    def run(self, spec: dict[str, Any], host_devices: int | None = None) -> dict[str, Any]:
        """Runs `measure_rounds(spec)` in a fresh Python; `host_devices` sets XLA's host device count.

        The child is killed (by its PID, which this object started) if its
        RSS exceeds `max_rss_bytes` or it runs past `timeout_s`; the result
        then holds `error`.
        """
        self.counter += 1
        out = self.workdir / f"result_{self.counter}.json"
        log = self.workdir / f"worker_{self.counter}.log"
        spec = dict(spec, out=str(out))
        env = dict(os.environ)
        if host_devices is not None:
            flag = f"--xla_force_host_platform_device_count={host_devices}"
            env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flag) if f)
        t0 = time.perf_counter()
        peak_seen = 0
        error = None
        with open(log, "w") as log_file:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                    env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    peak_seen = max(peak_seen, process_rss_bytes(proc.pid))
                    if peak_seen > self.max_rss_bytes:
                        error = (f"killed: RSS {peak_seen / 2**30:.1f} GiB over the "
                                 f"{self.max_rss_bytes / 2**30:.1f} GiB guard")
                    elif time.perf_counter() - t0 > self.timeout_s:
                        error = f"killed: ran past {self.timeout_s:.0f} s"
                    if error:
                        break
                    time.sleep(0.25)
            finally:
                if proc.poll() is None:  # guard tripped, or this process is being interrupted
                    proc.kill()
                    proc.wait()
        wall = time.perf_counter() - t0
        if error is None and (proc.returncode != 0 or not out.exists()):
            tail = log.read_text()[-2000:]
            error = f"worker exited with {proc.returncode}: {tail}"
        if error:
            return {**{k: spec[k] for k in ("workload", "cohort") if k in spec}, "error": error,
                    "rss_seen_bytes": peak_seen, "wall_s": wall}
        result = json.loads(out.read_text())
        result["wall_s"] = wall
        return result


# ----------------------------------------------------------------------------- part b


B_KEYS = ("part", "workload", "rep", "clients_per_round", "pipeline", "rounds", "examples_per_round", "steps_per_round",
          "round_median_s", "data_wait_frac", "peak_rss_mb", "packed_mb", "stream_lengths", "compile_s",
          "compiles_during_timed", "wall_s")


def add_units(r: dict[str, Any]) -> dict[str, Any]:
    """Adds MB views of the byte counts for printing."""
    if "peak_rss_bytes" in r:
        r["peak_rss_mb"] = round(r["peak_rss_bytes"] / 2**20)
    if "packed_bytes" in r:
        r["packed_mb"] = r["packed_bytes"] / 2**20
    return r


def part_b(launcher: Launcher, datasets: dict[str, pathlib.Path], cohorts: Sequence[int], min_rounds: int,
           max_rounds: int, rep: int, emit: Callable[[dict[str, Any]], None],
           serial: set[tuple[str, int]], force_serial: bool = False,
           workloads: Sequence[str] = WORKLOADS) -> list[dict[str, Any]]:
    """One repetition of the clients-per-round grid on both workloads.

    A configuration killed by the RSS guard with the train loop's default
    pipeline (reader threads, one packed round prefetched) is run again with
    the pipeline inside `next()` (no prefetching: less memory, the whole data
    cost shows as data wait), and so in later repetitions (`serial` holds them).
    `force_serial` runs every configuration that way.
    """
    results = []
    for workload in workloads:
        for cohort in cohorts:
            spec = {"workload": workload, "data": str(datasets[workload]), "cohort": cohort,
                    "rounds": timed_rounds(cohort, min_rounds, max_rounds), "warmup": 1}
            attempts = [("prefetch", 0), ("serial", -1)]
            if force_serial or (workload, cohort) in serial:
                attempts = attempts[1:]
            for pipeline, threads in attempts:
                r = add_units(launcher.run(dict(spec, data_threads=threads)))
                r.update(part="b", rep=rep, workload=workload, clients_per_round=cohort, pipeline=pipeline)
                emit(r)
                results.append(r)
                if not r.get("error", "").startswith("killed: RSS"):
                    break
                serial.add((workload, cohort))
    return results


def summarize_b(results: Sequence[dict[str, Any]], emit: Callable[[dict[str, Any]], None],
                fit_cohorts: Sequence[int] = ()) -> dict[str, Any]:
    """Per configuration: medians over repetitions; per workload: the least-squares fit over every timed round.

    The fit uses the rounds of the default (prefetching) pipeline only, and
    of the `fit_cohorts` cohort sizes if given.
    """
    fits = {}
    for workload in WORKLOADS:
        ok = [r for r in results if r["workload"] == workload and "error" not in r]
        for cohort, pipeline in sorted({(r["clients_per_round"], r["pipeline"]) for r in ok}):
            runs = [r for r in ok if r["clients_per_round"] == cohort and r["pipeline"] == pipeline]
            medians = [r["round_median_s"] for r in runs]
            compute = [statistics.median(t - w for t, w in zip(r["round_s"], r["wait_s"])) for r in runs]
            emit(add_units({
                "part": "b_summary", "workload": workload, "clients_per_round": cohort, "pipeline": pipeline,
                "repeats": len(runs), "examples_per_round": runs[0]["examples_per_round"],
                "steps_per_round": runs[0]["steps_per_round"],
                "round_median_s": statistics.median(medians), "round_median_min_s": min(medians),
                "round_median_max_s": max(medians), "round_minus_wait_median_s": statistics.median(compute),
                "us_per_example": 1e6 * statistics.median(medians) / runs[0]["examples_per_round"],
                "data_wait_frac": statistics.median(r["data_wait_frac"] for r in runs),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                "packed_bytes": runs[0]["packed_bytes"], "stream_lengths": runs[0]["stream_lengths"],
            }))
        fitted = [r for r in ok if r["pipeline"] == "prefetch"
                  and (not fit_cohorts or r["clients_per_round"] in fit_cohorts)]
        x = [e for r in fitted for e in r["examples"]]
        y = [t for r in fitted for t in r["round_s"]]
        if len(set(x)) >= 2:
            slope, intercept, r2 = least_squares(x, y)
            fits[workload] = {"slope_s_per_example": slope, "intercept_s": intercept, "r2": r2,
                              "cohorts": sorted({r["clients_per_round"] for r in fitted})}
            emit({"part": "b_fit", "workload": workload, "points": len(x),
                  "clients_per_round": sorted({r["clients_per_round"] for r in fitted}),
                  "slope_us_per_example": 1e6 * slope, "intercept_ms": 1e3 * intercept, "r2": r2})
    return fits


def plot_b(results: Sequence[dict[str, Any]], fits: dict[str, dict[str, float]], path: pathlib.Path) -> None:
    """Round time vs examples per round, log-log: every timed round, per-configuration medians, fit lines.

    Filled markers: the default prefetching pipeline; hollow squares: the
    serial pipeline (configurations the default ran out of memory on).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for workload, color in zip(WORKLOADS, ("tab:blue", "tab:orange")):
        ok = [r for r in results if r["workload"] == workload and "error" not in r]
        if not ok:
            continue
        x = np.array([e for r in ok for e in r["examples"]], float)
        y = np.array([t for r in ok for t in r["round_s"]], float)
        ax.scatter(x, y, s=6, alpha=0.25, color=color)
        for pipeline, marker, face in (("prefetch", "o", color), ("serial", "s", "none")):
            runs = [r for r in ok if r["pipeline"] == pipeline]
            cohorts = sorted({r["clients_per_round"] for r in runs})
            if not cohorts:
                continue
            mx = [next(r for r in runs if r["clients_per_round"] == c)["examples_per_round"] for c in cohorts]
            my = [statistics.median(r["round_median_s"] for r in runs if r["clients_per_round"] == c)
                  for c in cohorts]
            ax.plot(mx, my, marker, color=color, markerfacecolor=face, linestyle="none",
                    label=f"{workload}, {pipeline} pipeline (median per clients/round)")
            for c, xx, yy in zip(cohorts, mx, my):
                ax.annotate(str(c), (xx, yy), textcoords="offset points", xytext=(5, -11), fontsize=7, color=color)
        if workload in fits:
            f = fits[workload]
            grid = np.geomspace(x.min(), x.max(), 200)
            line = f["slope_s_per_example"] * grid + f["intercept_s"]
            shown = line > 0.5 * y.min()  # a negative intercept would plunge off the log axis
            ax.plot(grid[shown], line[shown], "-", color=color, alpha=0.7,
                    label=f"fit over {f['cohorts'][0]}-{f['cohorts'][-1]} clients/round: "
                          f"{1e6 * f['slope_s_per_example']:.2f} µs/example "
                          f"{1e3 * f['intercept_s']:+.1f} ms (R² {f['r2']:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples per round")
    ax.set_ylabel("round time (s)")
    ax.set_title("fedstream round time vs examples per round (labels: clients per round)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- part c


C_KEYS = ("part", "clients_per_round", "devices", "rounds", "packed_waste_median", "packed_waste_max",
          "packed_shapes", "bound_waste_median", "bound_waste_max", "packed_stream_fill_waste_median",
          "vmap_waste_median", "vmap_waste_max", "vmap_shapes", "target_met")


def part_c(num_clients: int, mu: float, sigma: float, cap: int, batch: int, rounds: int, cohorts: Sequence[int],
           devices: Sequence[int], emit: Callable[[dict[str, Any]], None], seed: int = 0) -> list[dict[str, Any]]:
    """Padding waste and compiled shapes of fedstream's packing vs the vmap baseline (host-side only)."""
    sizes = so_client_sizes(num_clients, mu, sigma, seed)
    batching = ClientBatching(batch, 1, max_examples=cap)
    steps_of = np.array([batching.num_steps(int(n)) for n in sizes], np.int64)
    emit({"part": "c_workload", "clients": num_clients, "lognormal_mu": mu, "lognormal_sigma": sigma,
          "cap_examples": cap, "batch": batch, "mean_examples_uncapped": float(sizes.mean()),
          "median_examples": float(np.median(sizes)), "max_examples_uncapped": int(sizes.max()),
          "share_capped": float((sizes > cap).mean()), "mean_steps": float(steps_of.mean()),
          "max_steps": int(steps_of.max())})
    results = []
    for cohort in cohorts:
        cohort_steps = [steps_of[sample_cohort(seed, r, num_clients, cohort)] for r in range(rounds)]
        for d in devices:
            plans = [packed_round_plan(s, d) for s in cohort_steps]
            vmap = [vmap_padding_waste(s, d) for s in cohort_steps]
            packed_waste = [p[0] for p in plans]
            bound = [whole_client_waste_bound(s, d) for s in cohort_steps]
            r = {"part": "c", "clients_per_round": cohort, "devices": d, "rounds": rounds,
                 "packed_waste_median": statistics.median(packed_waste), "packed_waste_max": max(packed_waste),
                 "packed_shapes": len({p[1] for p in plans}),
                 "bound_waste_median": statistics.median(bound), "bound_waste_max": max(bound),
                 "packed_stream_fill_waste_median": statistics.median(p[2] for p in plans),
                 "vmap_waste_median": statistics.median(vmap), "vmap_waste_max": max(vmap),
                 "vmap_shapes": len({int(s.max()) for s in cohort_steps})}
            r["target_met"] = ("yes" if r["packed_waste_median"] <= WASTE_TARGET and r["packed_shapes"] <= SHAPES_TARGET
                               else "no")
            emit(r)
            results.append(r)
    return results


# ----------------------------------------------------------------------------- part f


F_KEYS = ("part", "rep", "clients_per_round", "devices", "perturbed_start", "rounds", "steps_per_round",
          "round_median_s", "speedup_vs_1", "param_diff_first_round", "param_diff_last_round", "data_wait_frac",
          "peak_rss_mb", "wall_s")


def max_abs_diff(a: pathlib.Path, b: pathlib.Path) -> float:
    """Largest absolute difference between the arrays of two .npz files of the same parameter tree."""
    with np.load(a) as x, np.load(b) as y:
        return max(float(np.max(np.abs(x[k] - y[k]))) for k in x.files)


def part_f(launcher: Launcher, data: pathlib.Path, cohorts: Sequence[int], device_counts: Sequence[int],
           min_rounds: int, max_rounds: int, rep: int, emit: Callable[[dict[str, Any]], None],
           perturbed_reference: bool) -> list[dict[str, Any]]:
    """One repetition: the EMNIST-shaped dense round on N host devices, compared with the first N.

    Parameter differences are taken after the first round (from identical
    initial parameters: only the summation order differs) and after the last
    timed round. With `perturbed_reference`, one more 1-device run starts from
    parameters perturbed by 1e-8 * N(0, 1): its difference from the 1-device
    run shows how much the training itself amplifies a 1e-8 change over the
    same rounds.
    """
    results = []
    for cohort in cohorts:
        rounds = max(min(5, max_rounds), timed_rounds(cohort, min_rounds, max_rounds))
        runs: list[tuple[int, float]] = [(n, 0.0) for n in device_counts]
        if perturbed_reference:
            runs.append((device_counts[0], PERTURBATION))
        base: dict[str, Any] | None = None
        base_params: list[pathlib.Path] = []
        for i, (n, perturb) in enumerate(runs):
            params = [launcher.workdir / f"params_f_{rep}_{cohort}_{i}_{which}.npz" for which in ("first", "last")]
            spec = {"workload": "emnist_mlp", "data": str(data), "cohort": cohort, "rounds": rounds, "warmup": 1,
                    "params_first_out": str(params[0]), "params_out": str(params[1]), "perturb": perturb}
            r = add_units(launcher.run(spec, host_devices=n))
            r.update(part="f", rep=rep, clients_per_round=cohort, devices=n, perturbed_start=perturb,
                     pipeline="prefetch")
            if "error" not in r:
                if base is None:
                    base, base_params = r, params
                if not perturb:
                    r["speedup_vs_1"] = base["round_median_s"] / r["round_median_s"]
                r["param_diff_first_round"] = max_abs_diff(base_params[0], params[0])
                r["param_diff_last_round"] = max_abs_diff(base_params[1], params[1])
            emit(r)
            results.append(r)
    return results


def summarize_f(results: Sequence[dict[str, Any]], emit: Callable[[dict[str, Any]], None]) -> None:
    """Medians over repetitions per (clients per round, devices); parameter differences: the largest."""
    ok = [r for r in results if "error" not in r]
    for cohort in sorted({r["clients_per_round"] for r in ok}):
        for n, perturb in sorted({(r["devices"], r["perturbed_start"]) for r in ok}):
            runs = [r for r in ok if r["clients_per_round"] == cohort and r["devices"] == n
                    and r["perturbed_start"] == perturb]
            if not runs:
                continue
            emit({"part": "f_summary", "clients_per_round": cohort, "devices": n, "perturbed_start": perturb,
                  "repeats": len(runs), "rounds": runs[0]["rounds"] + runs[0]["warmup_rounds"],
                  "steps_per_round": runs[0]["steps_per_round"],
                  "round_median_s": statistics.median(r["round_median_s"] for r in runs),
                  "speedup_vs_1": median_or_nan(r["speedup_vs_1"] for r in runs if "speedup_vs_1" in r),
                  "param_diff_first_round": max(r["param_diff_first_round"] for r in runs),
                  "param_diff_last_round": max(r["param_diff_last_round"] for r in runs)})


# ----------------------------------------------------------------------------- main


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="b,c,f", help="comma-separated: b (clients per round), "
                        "c (padding waste), f (host device count)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_POPULATION}-client datasets, cohorts {QUICK_COHORTS}, one repetition")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds for the largest cohorts; smaller cohorts get up to "
                             f"{MAX_ROUNDS_SMALL} (2000 // clients per round)")
    parser.add_argument("--repeats", type=int, default=0, help="repetitions of parts b and f (0 = 3, 1 with --quick)")
    parser.add_argument("--cohorts", default="", help=f"part b clients per round (default {COHORTS})")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"),
                        help="cache directory of the datasets (shared with round_efficiency.py)")
    parser.add_argument("--so-lognormal", default=f"{SO_MU},{SO_SIGMA}",
                        help="part c: mu,sigma of the log-normal client sizes")
    parser.add_argument("--so-cap", type=int, default=SO_CAP, help="part c: examples per client at most")
    parser.add_argument("--max-rss-gb", type=float, default=0.0,
                        help="kill a configuration whose RSS passes this (0 = 70%% of the memory, at most "
                             "the available memory less 2 GiB)")
    parser.add_argument("--pipeline", choices=("auto", "serial"), default="auto",
                        help="part b: auto = the train loop's prefetching pipeline, serial where the RSS guard "
                             "killed it; serial = every configuration without read-ahead")
    parser.add_argument("--no-warm-cache", action="store_true", help="do not read the datasets once before timing")
    parser.add_argument("--plot", default=str(pathlib.Path(__file__).resolve().parent / "results" / "scaling.png"),
                        help="PNG of part b")
    parser.add_argument("--json", help="also append every result as a JSON line to this file")
    parser.add_argument("--fit-cohorts", default="",
                        help="part b: fit only these clients-per-round values (default: all)")
    parser.add_argument("--summarize", metavar="JSONL",
                        help="run nothing: summarize, fit and plot the part b and f results of a --json file "
                             "(e.g. several runs appended to one file)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="part b workloads, comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return

    fit_cohorts = [int(c) for c in args.fit_cohorts.split(",")] if args.fit_cohorts else []
    if args.summarize:
        records = [json.loads(line) for line in pathlib.Path(args.summarize).read_text().splitlines() if line]
        b_results = [r for r in records if r.get("part") == "b"]
        f_results = [r for r in records if r.get("part") == "f"]
        show = lambda r: print(format_line(r, tuple(r)), flush=True)  # noqa: E731
        if b_results:
            plot_b(b_results, summarize_b(b_results, show, fit_cohorts), pathlib.Path(args.plot))
            print(f"plot: {args.plot}", flush=True)
        if f_results:
            summarize_f(f_results, show)
        return

    import jax

    parts = set(args.parts.split(","))
    if unknown := parts - {"b", "c", "f"}:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from b, c, f")
    workloads = [w for w in args.workloads.split(",") if w]
    if unknown := set(workloads) - set(WORKLOADS):
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    repeats = args.repeats or (1 if args.quick else 3)
    population = QUICK_POPULATION if args.quick else POPULATION
    cohorts = ([int(c) for c in args.cohorts.split(",")] if args.cohorts
               else list(QUICK_COHORTS if args.quick else COHORTS))
    f_cohorts = QUICK_F_COHORTS if args.quick else F_COHORTS
    max_rounds = QUICK_MAX_ROUNDS if args.quick else MAX_ROUNDS_SMALL
    mu, sigma = (float(v) for v in args.so_lognormal.split(","))
    root = pathlib.Path(args.data_dir)
    start = time.perf_counter()
    json_file = open(args.json, "a") if args.json else None

    def emit(record: dict[str, Any]) -> None:
        keys = {"b": B_KEYS, "c": C_KEYS, "f": F_KEYS}.get(record["part"], tuple(record))
        line = format_line(record, keys)
        if "error" in record:
            line += f" error={record['error'][:300]!r}"
        print(line, flush=True)
        if json_file:
            json_file.write(json.dumps(stamp(record)) + "\n")
            json_file.flush()

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores, "
          f"{meminfo_bytes('MemTotal') / 2**30:.1f} GiB memory, load average {os.getloadavg()[0]:.2f}, "
          f"repeats={repeats} (interleaved; summaries are medians over repetitions)", flush=True)

    if "c" in parts:
        print(f"part c: Stack-Overflow-like sizes: {SO_CLIENTS:,} clients, floor(LogNormal(mu={mu}, sigma={sigma})) "
              f"examples (at least 1), capped at {args.so_cap} per client, batch {SO_BATCH}, 1 epoch, "
              f"{SO_ROUNDS} rounds; waste = idle device-steps / device-steps executed; target: median waste <= "
              f"{WASTE_TARGET:.0%} and <= {SHAPES_TARGET} compiled stream lengths; bound = least waste of any "
              f"whole-client assignment; stream_fill = share of the bucketed stream holding no step", flush=True)
        part_c(SO_CLIENTS, mu, sigma, args.so_cap, SO_BATCH, SO_ROUNDS, SO_COHORTS, SO_DEVICES, emit)

    b_results: list[dict[str, Any]] = []
    f_results: list[dict[str, Any]] = []
    if parts & {"b", "f"}:
        datasets = {}
        if "f" in parts or "emnist_mlp" in workloads:
            datasets["emnist_mlp"] = emnist_dataset(root, population)
        if "b" in parts and "synthetic_logistic" in workloads:
            datasets["synthetic_logistic"] = synthetic_dataset(root, population)
        if not args.no_warm_cache:
            for path in datasets.values():
                print(f"page cache: read {path.name} in {warm_page_cache(path):.0f} s", flush=True)
        # Default guard: 70% of the memory, and no more than what is available now less 2 GiB.
        max_rss = (int(args.max_rss_gb * 2**30) if args.max_rss_gb else
                   int(min(0.7 * meminfo_bytes("MemTotal"), meminfo_bytes("MemAvailable") - 2 * 2**30)) or 2**40)
        print(f"RSS guard: a configuration above {max_rss / 2**30:.1f} GiB is killed", flush=True)
        if "b" in parts:
            print(f"part b: workloads: emnist_mlp = EMNIST-shaped synthetic data ({population:,} clients, "
                  f"round_efficiency.py's generator), 2x200 dense model, FedAdam (batch {round_efficiency.BATCH}, "
                  f"1 epoch, client SGD 10^-1.5, server Adam 10^-2.5); synthetic_logistic = FedProx Synthetic(1,1) "
                  f"({population:,} devices, recipe `synthetic`), logistic regression, FedAvg (batch "
                  f"{SYNTHETIC_BATCH}, {SYNTHETIC_EPOCHS} epoch, client SGD {SYNTHETIC_CLIENT_LR}, server SGD "
                  f"{SYNTHETIC_SERVER_LR}). The EMNIST CNN is not run: at ~19 ms per step on this CPU, 5000 "
                  f"clients/round (~52k steps) would take ~16 minutes per round.", flush=True)
        serial: set[tuple[str, int]] = set()
        with tempfile.TemporaryDirectory(prefix="fedstream_scaling_") as tmp:
            launcher = Launcher(pathlib.Path(tmp), max_rss)
            for rep in range(1, repeats + 1):
                if "b" in parts:
                    b_results += part_b(launcher, datasets, cohorts, args.rounds, max_rounds, rep, emit,
                                        serial, force_serial=args.pipeline == "serial", workloads=workloads)
                if "f" in parts:
                    f_results += part_f(launcher, datasets["emnist_mlp"], f_cohorts, DEVICE_COUNTS, args.rounds,
                                        max_rounds, rep, emit, perturbed_reference=rep == 1 and not args.quick)
    if b_results:
        fits = summarize_b(b_results, emit, fit_cohorts)
        plot_b(b_results, fits, pathlib.Path(args.plot))
        plot = pathlib.Path(args.plot).resolve()
        shown = plot.relative_to(pathlib.Path.cwd()) if plot.is_relative_to(pathlib.Path.cwd()) else plot
        print(f"plot: {shown}", flush=True)
    if f_results:
        summarize_f(f_results, emit)
    if json_file:
        json_file.close()
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
