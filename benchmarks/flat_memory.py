"""Flat memory in the cohort size: training peak RSS and round time at 1,000 / 10,000 / 50,000 clients per round.

Reproduce (on a busy 2-core VM: the datasets took 8 minutes to write, the quick runs 10
minutes, the 50,000-client FedProx round, 41M SGD steps, 12 minutes plus compilation):

    python benchmarks/flat_memory.py --quick             # 1,000 and 10,000 clients per round
    python benchmarks/flat_memory.py                     # also 50,000
    python benchmarks/flat_memory.py --setups emnist --chunk-mb 32 --baseline-clients ''
    python benchmarks/flat_memory.py --max-minutes 60 --json benchmarks/results/flat_memory.jsonl

Goal (issue "flat memory"): training peak RSS flat in the cohort size: at
10,000 and 50,000 clients per round <= 1.5 GB and within 1.3x of the
1,000-client figure; round time still linear in the examples trained.

Two set-ups, each dataset generated once into a cache directory (default
`<system temp dir>/fedstream_bench`, `--data-dir` to move it) and reused while
its generator config matches:

* `fedprox`: the FedProx paper's Synthetic(1, 1) (`synthetic` recipe, as
  `pipelines/synthetic_fedprox_setup.py`) with `--devices` devices (60,000 by
  default: enough for 50,000 clients per round; ~27.8M examples, client sizes
  floor(LogNormal(4, 2)) + 50, so a few clients hold 100,000s of examples);
  multinomial logistic regression, batch 10, 20 local epochs, client SGD lr
  0.01, server SGD lr 1 (FedAvg).
* `emnist`: an EMNIST-shaped dataset (28x28x1 float32, 62 classes) of
  `--emnist-clients` (60,000) small clients, log-normal sizes with mean 20,
  written with `DatasetWriter` by `round_efficiency.dataset_dir`; the dense
  2x200 model, batch 20, 1 local epoch, client SGD lr 10^-1.5, server SGD lr 1.

Each measurement runs in its own fresh interpreter (so its peak RSS,
`getrusage(RUSAGE_SELF).ru_maxrss`, is that run's alone): it builds a
`fedstream.Simulation` (FedAvg, seed 0, `chunk_bytes` = `--chunk-mb`, lanes
auto), compiles every chunk shape round 1 will use (on all-padding chunks,
which run no step), and times round 1 of `Simulation.rounds` as the train loop
runs it (Grain reads, packing and prefetching included; no evaluation). It
records the RSS after each phase (imports, dataset open, client sizes,
simulation built, cohort planned, compiled, round done: `VmRSS`, and the peak
so far, `VmHWM`, from /proc/self/status) and the highest RSS sampled every
50 ms during the round. Reported per run: peak RSS, round seconds, examples,
SGD steps, example-steps (examples x epochs: the per-example gradients of the
round) and seconds per 1M example-steps (flat = linear in examples), chunks
per round and clients per chunk.

`--chunk-mb 0` (one call per round, the whole round's packed data at once) is
the "before"-like comparison; it runs at 1,000 clients only unless
`--baseline-clients` says otherwise (10,000 would not fit in RAM).

`--max-minutes` caps the whole benchmark: a run whose time, extrapolated
linearly in clients per round from the previous run of its set-up and budget
in the same invocation, would not fit in what is left is skipped and reported
as such (and every run is killed at the deadline).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

SETUPS = ("fedprox", "emnist")
COHORTS = (1000, 10000, 50000)
QUICK_COHORTS = (1000, 10000)
DEFAULT_DEVICES = 60000
DEFAULT_EMNIST_CLIENTS = 60000
EMNIST_MEAN = 20
RESULT = "RESULT "


# --------------------------------------------------------------------------- datasets (parent process)


def synthetic_dir(root: pathlib.Path, num_devices: int) -> pathlib.Path:
    """Synthetic(1, 1) with `num_devices` devices under `root`, written by the `synthetic` recipe once."""
    from fedstream.data.preprocessing import run_preprocess

    path = root / f"synthetic_1_1_{num_devices}"
    t0 = time.perf_counter()
    run_preprocess("synthetic", path, [f"num_devices={num_devices}"], progress=_progress_every(30.0))
    print(f"synthetic(1,1), {num_devices:,} devices: {_dir_bytes(path) / 2**30:.2f} GiB at {path.name} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return path


def emnist_dir(root: pathlib.Path, num_clients: int) -> pathlib.Path:
    """The EMNIST-shaped dataset of `num_clients` clients of mean size EMNIST_MEAN (round_efficiency's writer)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from round_efficiency import dataset_dir

    return dataset_dir(root, num_clients, mean=EMNIST_MEAN)


def _progress_every(seconds: float) -> Any:
    """A progress printer that lets through one message per `seconds` (and every non-progress line)."""
    last = [0.0]

    def say(message: str) -> None:
        now = time.perf_counter()
        if not message.startswith("  ") or now - last[0] >= seconds:
            last[0] = now
            print(message, flush=True)

    return say


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- one measurement (child process)


def _status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS: now; VmHWM: the peak so far)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in keys:
                out[key] = int(line.split()[1])
    return out


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a thread; `peak_mb` is the highest seen."""

    def __init__(self, interval: float = 0.05, every_s: float = 1.0) -> None:
        self.interval, self.every_s, self.peak_kib = interval, every_s, 0
        self.series: list[tuple[float, float]] = []  # (seconds, max MB in that period), one per `every_s`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        period_kib = 0
        while not self._stop.is_set():
            kib = _status_kib("VmRSS")["VmRSS"]
            self.peak_kib, period_kib = max(self.peak_kib, kib), max(period_kib, kib)
            t = time.perf_counter() - t0
            if t >= self.every_s * (len(self.series) + 1):
                self.series.append((round(t, 1), round(period_kib / 1024)))
                period_kib = 0
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kib / 1024


def _compiled_programs(train_round: Any) -> int:
    """Programs compiled so far by a `TrainRound`: the one-call round plus the chunk calls."""
    return train_round._cache_size() + train_round.chunk._cache_size()


def child(setup: str, path: str, cohort: int, chunk_mb: int, threads: int) -> dict[str, Any]:
    """One measurement (see the module docstring); runs in a fresh interpreter."""
    phases: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def phase(name: str) -> None:
        kib = _status_kib("VmRSS", "VmHWM")
        phases.append({"phase": name, "rss_MB": kib["VmRSS"] / 1024, "peak_MB": kib["VmHWM"] / 1024,
                       "t_s": time.perf_counter() - t_start})

    phase("start")
    import jax
    import optax

    from fedstream import FedAvg, Simulation
    from fedstream.data.reader import FederatedDataset
    from fedstream.models import get_model
    from fedstream.training.rounds import shard_batch

    phase("imports")
    ds = FederatedDataset(path)
    phase("dataset_open")
    sizes = ds.client_sizes("train")
    phase("client_sizes")
    if setup == "fedprox":
        model = get_model("logistic", (60,), 10)
        batch, epochs, lr = 10, 20, 0.01
    else:
        model = get_model("mlp", (28, 28, 1), 62, hidden=(200, 200))
        batch, epochs, lr = 20, 1, 10**-1.5
    algorithm = FedAvg(model, optax.sgd(lr), optax.sgd(1.0))
    # The EMNIST-shaped dataset has only a train split; no evaluation runs here.
    test_split = "test" if "test" in ds.splits else "train"
    sim = Simulation(ds, algorithm, clients_per_round=cohort, batch_size=batch, epochs=epochs, seed=0,
                     test_split=test_split, data_threads=threads, chunk_bytes=chunk_mb << 20, log=lambda _: None)
    phase("simulation")
    pipe = sim.pipeline
    layout = pipe.round_layout(0)
    shapes = sorted(pipe.chunk_shapes(range(1)))
    phase("cohort_plan")

    t0 = time.perf_counter()
    train_round, state = sim._train_round, sim.state  # private: to compile the round's shapes ahead
    carry = None
    for shape in shapes:
        empty = shard_batch(pipe.empty_chunk(shape), sim.mesh)
        if pipe.chunks_per_round == 1:
            jax.block_until_ready(train_round(state, empty))
            continue
        if carry is None:
            carry = train_round.init(state, empty, None)
        jax.block_until_ready(train_round.chunk(state, carry, empty, None))
    if carry is not None:
        jax.block_until_ready(train_round.finish(state, carry))
    del carry, empty
    compile_s = time.perf_counter() - t0
    phase("compiled")
    programs = _compiled_programs(train_round)

    with RssSampler() as sampler:
        rounds = sim.rounds(2)  # round 2 never runs: no end-of-run evaluation; its data may be prefetched
        t0 = time.perf_counter()
        metrics = next(rounds)
        round_s = time.perf_counter() - t0
        rounds.close()
    phase("round_done")
    compiled_in_round = _compiled_programs(train_round) - programs
    sim.close()
    phase("closed")
    train = metrics["train"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    example_steps = int(train["examples"]) * epochs
    return {
        "setup": setup, "clients_per_round": cohort, "chunk_mb": chunk_mb, "dataset_clients": int(len(sizes)),
        "dataset_examples": int(np.sum(sizes)), "batch_size": batch, "epochs": epochs,
        "devices": f"{jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}",
        "lanes": sim.lanes, "data_threads": pipe.data_threads, "chunk_clients": pipe.chunk_clients,
        "chunks": int(train["round_chunks"]), "chunk_shapes": len(shapes), "compile_s": compile_s,
        "compiled_in_round": compiled_in_round,
        "examples": int(train["examples"]), "steps": int(train["steps"]), "example_steps": example_steps,
        "largest_client_examples": int(max(sizes[pipe.cohort(0)])),
        "bins_load_max": int(layout.load.max()),
        "round_s": round_s, "s_per_1M_example_steps": round_s / example_steps * 1e6,
        "data_wait_s": float(train["data_wait_seconds"]), "loss": float(train["loss"]),
        "padding_waste": float(train["padding_waste"]),
        "peak_rss_MB": peak_mb, "round_rss_max_MB": sampler.peak_mb, "phases": phases,
        "round_rss_series": sampler.series[::max(1, len(sampler.series) // 200)],
        "load_average_end": round(os.getloadavg()[0], 2),
    }


# --------------------------------------------------------------------------- driver


def run_child(setup: str, path: pathlib.Path, cohort: int, chunk_mb: int, threads: int,
              timeout_s: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its RESULT line, or a record saying why there is none."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", setup, str(path), str(cohort),
           str(chunk_mb), str(threads)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True,
                              timeout=max(timeout_s, 1) if np.isfinite(timeout_s) else None)
    except subprocess.TimeoutExpired:
        return {"setup": setup, "clients_per_round": cohort, "chunk_mb": chunk_mb, "skipped": "killed at the deadline",
                "wall_s": time.perf_counter() - t0}
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        else:
            print(line, flush=True)
    if proc.returncode != 0 or result is None:
        return {"setup": setup, "clients_per_round": cohort, "chunk_mb": chunk_mb,
                "skipped": f"failed with exit code {proc.returncode}", "wall_s": time.perf_counter() - t0}
    result.update(wall_s=time.perf_counter() - t0, load_average_start=round(load, 2))
    return result


def format_result(r: dict[str, Any]) -> str:
    """One line per run."""
    head = f"{r['setup']:8s} clients/round={r['clients_per_round']:>6,} chunk_mb={r['chunk_mb']}"
    if "skipped" in r:
        return f"{head} SKIPPED: {r['skipped']}"
    phases = " ".join(f"{p['phase']}={p['rss_MB']:.0f}/{p['peak_MB']:.0f}" for p in r["phases"])
    return (f"{head} peak_rss_MB={r['peak_rss_MB']:.0f} round_s={r['round_s']:.1f} examples={r['examples']:,} "
            f"steps={r['steps']:,} example_steps={r['example_steps']:,} "
            f"s_per_1M_example_steps={r['s_per_1M_example_steps']:.2f} chunks={r['chunks']} "
            f"chunk_clients={r['chunk_clients']} shapes={r['chunk_shapes']} compile_s={r['compile_s']:.1f} "
            f"data_wait_s={r['data_wait_s']:.1f} largest_client={r['largest_client_examples']:,} "
            f"wall_s={r['wall_s']:.0f} load={r['load_average_start']}->{r['load_average_end']}\n"
            f"  RSS MB by phase (now/peak so far): {phases}; max sampled in the round {r['round_rss_max_MB']:.0f}")


def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(set-up, clients per round, chunk MiB) of every run, in order."""
    cohorts = [int(c) for c in args.clients_per_round.split(",")] if args.clients_per_round else \
        list(QUICK_COHORTS if args.quick else COHORTS)
    baseline = [int(c) for c in args.baseline_clients.split(",")] if args.baseline_clients else []
    runs = []
    for setup in args.setups.split(","):
        runs += [(setup, c, args.chunk_mb) for c in cohorts]
        runs += [(setup, c, 0) for c in baseline if args.chunk_mb != 0]
    return runs


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        setup, path, cohort, chunk_mb, threads = sys.argv[2:7]
        print(RESULT + json.dumps(child(setup, path, int(cohort), int(chunk_mb), int(threads))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated: {', '.join(SETUPS)}")
    parser.add_argument("--quick", action="store_true", help=f"clients per round {QUICK_COHORTS} only")
    parser.add_argument("--clients-per-round", default="", help=f"comma-separated (default {COHORTS})")
    parser.add_argument("--chunk-mb", type=int, default=128, help="packed MiB per round call (0 = one call)")
    parser.add_argument("--baseline-clients", default="1000",
                        help="clients per round also run with --chunk-mb 0 (comma-separated; '' = none)")
    parser.add_argument("--devices", type=int, default=DEFAULT_DEVICES, help="Synthetic(1,1) devices")
    parser.add_argument("--emnist-clients", type=int, default=DEFAULT_EMNIST_CLIENTS,
                        help="clients of the EMNIST-shaped dataset")
    parser.add_argument("--data-threads", type=int, default=0, help="reader threads; 0 = auto, as training")
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="skip runs that would end past this many minutes from the start (0 = no cap)")
    parser.add_argument("--prepare-only", action="store_true", help="only write the datasets")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"),
                        help="cache directory of the datasets")
    parser.add_argument("--json", help="also append one JSON line per run to this file")
    args = parser.parse_args()
    start = time.perf_counter()
    deadline = start + args.max_minutes * 60 if args.max_minutes > 0 else float("inf")
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    setups = args.setups.split(",")
    if unknown := [s for s in setups if s not in SETUPS]:
        parser.error(f"unknown set-up(s) {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    root = pathlib.Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    if "fedprox" in setups:
        paths["fedprox"] = synthetic_dir(root, args.devices)
    if "emnist" in setups:
        paths["emnist"] = emnist_dir(root, args.emnist_clients)
    if args.prepare_only:
        return
    from run_info import stamp  # benchmarks/ is first on sys.path when run as a script

    last: dict[tuple[str, int], dict[str, Any]] = {}  # (set-up, chunk MiB) -> its latest measured run
    results = []
    for setup, cohort, chunk_mb in plan(args):
        left = deadline - time.perf_counter()
        before = last.get((setup, chunk_mb))
        if before is not None and np.isfinite(left):
            estimate = before["wall_s"] * cohort / before["clients_per_round"]
            if estimate > left:
                r = {"setup": setup, "clients_per_round": cohort, "chunk_mb": chunk_mb,
                     "skipped": f"estimated {estimate / 60:.0f} min (linear in clients from "
                                f"{before['clients_per_round']:,}), {left / 60:.0f} min left of --max-minutes"}
                results.append(r)
                print(format_result(r), flush=True)
                continue
        r = run_child(setup, paths[setup], cohort, chunk_mb, args.data_threads, left)
        if "skipped" not in r:
            last[(setup, chunk_mb)] = r
        results.append(r)
        print(format_result(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(stamp(r)) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
