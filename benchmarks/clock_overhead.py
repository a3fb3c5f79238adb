"""Round-time overhead of the simulated clock: FedAvg rounds with the clock on against plain FedAvg.

    python benchmarks/clock_overhead.py                       # 30 segments x 10 rounds per arm, ~3 min
    python benchmarks/clock_overhead.py --segments 40 --json benchmarks/results/clock_overhead.jsonl

Workload: the README run (`digits_fedavg`: the embedded digits, 100 clients, 2x200 MLP,
10 clients per round, batch 10, one epoch), preprocessed once into `--data-dir`. Three
arms, each a `Simulation` of its own (in memory: no checkpoints, so only the rounds differ):

* `plain`: FedAvg as it has always run (no clock).
* `plain_again`: a second, identical plain simulation (the same cohorts): its ratio to `plain`
  is the measurement's own noise (an A/A test).
* `clock`: the same with the clock on and nothing dropped (always available, no
  over-selection, no deadline): every round keeps its 10 clients, so the rounds train as
  much as plain ones and the difference is the clock's own cost (its per-round sampling,
  availability and durations, the metrics it adds). This arm is the overhead (goal <= 5%).
* `pipeline`: `digits_fedavg_clock`'s clock (diurnal availability, 13 sampled, the first
  10 within 30 s kept). Its rounds train other clients (over-selection favours fast, often
  small, clients; a deadline can keep fewer than 10), so it is shown per example too.

Timing: each round's `round_seconds` as the train loop logs it (data wait, the jitted round,
the metrics' device->host copy), plus, for the clock arms, the clock of all the run's rounds,
which the cohort pipeline computes before the first round (`clock_setup_ms`, spread over the
rounds in `ratio_with_setup`). The three simulations live side by side in one process and run
in segments of `--segment` rounds, arms in a fresh seeded random order per segment (so that
all three see the same machine load). Left out: the first `--warmup` rounds of each arm and
every round whose compiled shape (`CohortPipeline.chunk_shapes`) did not occur earlier in that
arm (an XLA compilation). Reported per arm: the median over its timed rounds, and the median
over segments of (its median in the segment) / (plain's median in the same segment).

Second table: the clock alone (`RoundClock.outcome`, diurnal availability, rounds computed one
after another), wall and CPU microseconds per round for populations of 100 (the digits), 3,400
(EMNIST) and 342,477 (Stack Overflow) clients.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run_info import stamp

ARMS = ("plain", "plain_again", "clock", "pipeline")


def build(arm: str, data: Any, clients: int, seed: int) -> Any:
    """The arm's Simulation: digits_fedavg's model, optimizers and cohort, with or without the clock."""
    import optax
    from fedstream.pipelines import digits_fedavg_clock

    import fedstream as fs
    from fedstream.data.clock import Availability, ClockSettings

    clock = {"plain": None, "plain_again": None, "clock": ClockSettings(availability=Availability("always")),
             "pipeline": ClockSettings.from_config(digits_fedavg_clock.get_config().clock)}[arm]
    model = fs.get_model("mlp", (8, 8, 1), 10, hidden=(200, 200))
    algorithm = fs.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0))
    return fs.Simulation(data, algorithm, clients_per_round=clients, batch_size=10, seed=seed, clock=clock,
                         log=lambda _: None)


class Arm:
    """One arm's simulation, run segment by segment; its timed rounds per segment."""

    def __init__(self, name: str, data: Any, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.sim = build(name, data, args.clients, args.seed)
        total = args.warmup + args.segments * args.segment
        clock = self.sim.pipeline.round_clock
        start = time.perf_counter()
        if clock is not None:  # what the cohort pipeline computes before the first round
            clock.outcome(total - 1)
        self.setup_seconds = time.perf_counter() - start
        seen: set[Any] = set()
        self.fresh = []
        for r in range(total):  # rounds whose shape is compiled for the first time
            shapes = frozenset(self.sim.pipeline.chunk_shapes([r]))
            self.fresh.append(not shapes <= seen)
            seen |= shapes
        self.done = 0
        self.segments: list[list[dict[str, float]]] = []

    def run(self, rounds: int) -> None:
        rows = []
        for metrics in self.sim.rounds(self.done + rounds):
            r, train = metrics["round"] - 1, metrics["train"]
            if r >= self.args.warmup and not self.fresh[r]:
                rows.append({"seconds": train["round_seconds"], "examples": train["examples"]})
        self.done += rounds
        if self.done > self.args.warmup:
            self.segments.append(rows)


def host_path(data: Any, rounds: int, clients: int) -> dict[str, float]:
    """CPU microseconds per round of what the loop's data path does per client with and without the clock.

    `CohortPipeline.describe_position` for every position of a round (which
    client, where it runs, its steps and weight: where the clock's cohort enters
    the loop), plus the clock's metrics, after the clock of all rounds was
    computed (as the pipeline does before the first round). Data reading,
    packing and the round itself are the same with and without the clock.
    """
    from fedstream.data.clock import Availability, ClockSettings
    from fedstream.data.cohort import ClientBatching, CohortPipeline

    def pipeline(clock: Any) -> CohortPipeline:
        return CohortPipeline(data, "train", ("x", "y"), seed=0, cohort_size=clients, batching=ClientBatching(10),
                              num_devices=1, data_threads=0, clock=clock)

    arms = {"plain": pipeline(None), "clock": pipeline(ClockSettings(availability=Availability("always")))}
    arms["clock"].round_clock.outcome(rounds - 1)
    out: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(3):
        for name, p in arms.items():
            start = time.process_time()
            per_round = p.chunks_per_round * p.chunk_clients
            for r in range(rounds):
                for i in range(r * per_round, (r + 1) * per_round):
                    p.describe_position(i)
                if p.round_clock is not None:
                    p.round_clock.metrics(r)
            out[name].append(1e6 * (time.process_time() - start) / rounds)
    return {name: statistics.median(v) for name, v in out.items()}


def clock_alone(populations: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    """Microseconds per round of the clock by itself (diurnal availability, over-selection, a deadline)."""
    from fedstream.data.clock import Availability, ClockSettings, DeviceProfile

    out = []
    for n in populations:
        k = 10 if n <= 100 else 50
        work = np.random.default_rng(0).lognormal(np.log(100), 1.0, n)
        settings = ClockSettings(DeviceProfile(), Availability("diurnal", time_zones=24), 1.3, 60.0)
        settings.round_clock(0, work, k).outcome(1)  # the per-client draws, cached for the run
        clock = settings.round_clock(0, work, k)
        start, cpu = time.perf_counter(), time.process_time()
        clock.outcome(rounds - 1)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        out.append({"population": n, "clients_per_round": k, "rounds": rounds,
                    "us_per_round": 1e6 * seconds / rounds, "cpu_us_per_round": 1e6 * cpu_seconds / rounds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=30, help="segments per arm, interleaved")
    parser.add_argument("--segment", type=int, default=10, help="rounds per segment")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds per arm first")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock-rounds", type=int, default=200, help="rounds of the clock-alone table")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"))
    parser.add_argument("--json", help="append the results as one stamped JSON line")
    args = parser.parse_args()

    import fedstream as fs
    from fedstream.data.preprocessing import run_preprocess

    path = pathlib.Path(args.data_dir) / "digits"
    if not (path / "_SUCCESS").exists():
        run_preprocess("digits", path, progress=None)
    data = fs.FederatedDataset(path)

    arms = {name: Arm(name, data, args) for name in ARMS}
    for arm in arms.values():
        arm.run(args.warmup)
    order = random.Random(args.seed)
    for segment in range(args.segments):
        names = list(ARMS)
        order.shuffle(names)
        for name in names:
            arms[name].run(args.segment)
        if (segment + 1) % 10 == 0:
            print(f"segment {segment + 1}/{args.segments}", flush=True)
    for arm in arms.values():
        arm.sim.close()
    per_pass = {name: [rows for rows in arm.segments] for name, arm in arms.items()}

    def median_of(rows: list[dict[str, float]], key: str = "seconds") -> float:
        if key == "per_example":
            return statistics.median(r["seconds"] / max(r["examples"], 1) for r in rows)
        return statistics.median(r[key] for r in rows)

    results = []
    print(f"\n{'arm':9s} {'median ms/round':>16s} {'ratio to plain':>15s} {'with setup':>11s} "
          f"{'median us/example':>18s} {'ratio/example':>14s} {'examples/round':>15s} {'setup ms':>9s}")
    for arm in ARMS:
        pooled = [r for rows in per_pass[arm] for r in rows]
        pairs = [(a, b) for a, b in zip(per_pass[arm], per_pass["plain"]) if a and b]
        ratio = statistics.median(median_of(a) / median_of(b) for a, b in pairs)
        ratio_ex = statistics.median(median_of(a, "per_example") / median_of(b, "per_example") for a, b in pairs)
        setup_per_round = arms[arm].setup_seconds / (args.warmup + args.segments * args.segment)
        result = {"arm": arm, "median_round_ms": 1e3 * median_of(pooled), "ratio_to_plain": ratio,
                  "ratio_with_setup": statistics.median((median_of(a) + setup_per_round) / median_of(b)
                                                        for a, b in pairs),
                  "clock_setup_ms": 1e3 * arms[arm].setup_seconds,
                  "median_us_per_example": 1e6 * median_of(pooled, "per_example"), "ratio_per_example": ratio_ex,
                  "mean_examples_per_round": float(np.mean([r["examples"] for r in pooled])),
                  "timed_rounds": len(pooled)}
        results.append(result)
        print(f"{arm:9s} {result['median_round_ms']:16.2f} {ratio:15.3f} {result['ratio_with_setup']:11.3f} "
              f"{result['median_us_per_example']:18.1f} {ratio_ex:14.3f} {result['mean_examples_per_round']:15.1f} "
              f"{result['clock_setup_ms']:9.1f}")
    host = host_path(data, args.clock_rounds, args.clients)
    print(f"\nthe loop's per-client host path (describe_position + metrics), CPU us/round: plain {host['plain']:.0f}, "
          f"clock {host['clock']:.0f}")
    alone = clock_alone((100, 3400, 342477), args.clock_rounds)
    print(f"\nthe clock alone (diurnal, over-selection 1.3, deadline 60 s)\n{'population':>10s} {'k':>4s} "
          f"{'wall us/round':>14s} {'CPU us/round':>13s}")
    for row in alone:
        print(f"{row['population']:10d} {row['clients_per_round']:4d} {row['us_per_round']:14.0f} "
              f"{row['cpu_us_per_round']:13.0f}")
    if args.json:
        record = stamp({"benchmark": "clock_overhead", "segments": args.segments, "segment": args.segment,
                        "warmup": args.warmup, "clients_per_round": args.clients, "arms": results,
                        "clock_alone": alone, "host_path_cpu_us_per_round": host})
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
