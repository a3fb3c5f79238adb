"""The bucket cliff: padding waste and compiled shapes of a round's packing, before and after rebalancing.

Reproduce (host-side NumPy over client sizes, no training; a few seconds):

    python benchmarks/bucket_cliff.py
    python benchmarks/bucket_cliff.py --devices 4 --json FILE.jsonl

Set-ups (seed 0, cohorts `sample_cohort(0, r, N, C)`, rounds 0-199):

* `synthetic`: Synthetic(1, 1) of the `synthetic` recipe over 1,000 clients
  (n_k = floor(LogNormal(4, 2)) + 50, train split floor(0.9 n_k)), the
  `synthetic_fedprox` pipeline's batch 10 and 20 local epochs, 100 clients
  per round. The issue's figures (round 6, i.e. index 5: 0.351; median
  0.003 on 4 devices) are its `padding_waste` before rebalancing.
* `stackoverflow`: docs/performance.md part c's Stack-Overflow-like sizes,
  342,477 clients, max(1, floor(LogNormal(4, 2))) examples capped at 1,000,
  batch 16, 1 epoch; 50 clients per round (`--so-cohorts` adds others).

Per set-up and device count, before (plain longest-first, kept here as it
was) and after (`fedstream.data.packing.pack_clients`: longest-first, then
rebalanced):

* waste: `padding_waste`, idle device-steps / device-steps executed (what the
  round metrics report); max, median and the worst round.
* floor: `whole_client_waste_floor`, the waste no assignment of whole clients
  goes below. `forced` counts the rounds whose floor exceeds 10% (a client
  longer than the average device load, or a few long clients that cannot
  spread evenly; a client's steps are sequential SGD and never split);
  `waste max unforced` is the max over the other rounds, and `excess max` the
  largest waste above the floor (what packing itself leaves).
* shapes: distinct bucketed stream lengths (`bucket_steps` of the busiest
  device), i.e. compiled round shapes.
* fill: 1 - steps / (devices x bucketed length), the share of the packed
  stream that holds no step (allocated and transferred, never executed);
  also, for the rebalanced plan, with 4, 8 and 16 bucket sizes per octave
  instead of 2: stream lengths and the largest fill of unforced rounds.

Target (the issue): waste <= 10% in every round that whole clients allow, and
<= 8 shapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from fedstream.data.cohort import ClientBatching, sample_cohort
from fedstream.data.packing import bucket_steps, pack_clients, padding_waste, whole_client_waste_floor
from fedstream.recipes import synthetic

ROUNDS = 200
SEED = 0
WASTE_TARGET = 0.10
SHAPES_TARGET = 8
ISSUE_ROUND = 5  # the issue's "round 6", counted from 1


def longest_first_before(step_counts: Sequence[int], num_devices: int) -> np.ndarray:
    """Steps per device of the packing before the fix: longest first onto the least-loaded device."""
    counts = np.asarray(step_counts, np.int64)
    load = np.zeros(num_devices, np.int64)
    for i in np.argsort(-counts, kind="stable"):
        load[int(np.argmin(load))] += counts[i]
    return load


def rebalanced_after(step_counts: Sequence[int], num_devices: int) -> np.ndarray:
    """Steps per device of `pack_clients` (longest-first, then rebalanced)."""
    return pack_clients(step_counts, num_devices)[2]


def synthetic_steps() -> np.ndarray:
    """Steps per client: Synthetic(1, 1), 1,000 clients, train split, batch 10, 20 epochs."""
    config = synthetic.get_config()
    config.num_devices = 1000
    train = [int(config.train_fraction * int(n)) for n in synthetic.device_sizes(config)]
    batching = ClientBatching(batch_size=10, epochs=20)
    return np.array([batching.num_steps(n) for n in train], np.int64)


def stackoverflow_steps() -> np.ndarray:
    """Steps per client: 342,477 clients, max(1, floor(LogNormal(4, 2))) examples, cap 1,000, batch 16."""
    sizes = np.maximum(1, np.random.default_rng(SEED).lognormal(4.0, 2.0, 342_477).astype(np.int64))
    batching = ClientBatching(batch_size=16, epochs=1, max_examples=1000)
    values, inverse = np.unique(sizes, return_inverse=True)
    return np.array([batching.num_steps(int(n)) for n in values], np.int64)[inverse]


def finer_bucket(steps: int, per_octave: int) -> int:
    """`steps` rounded up to a multiple of 2^k / per_octave, 2^k <= steps (per_octave = 2 is `bucket_steps`)."""
    if steps <= per_octave:
        return max(steps, 1)
    quantum = 1 << (steps.bit_length() - 1 - (per_octave.bit_length() - 1))
    return -(-steps // quantum) * quantum


def bucket_alternatives(cohorts: Sequence[np.ndarray], num_devices: int) -> dict[int, dict[str, Any]]:
    """Per buckets-per-octave (2, 4, 8, 16), for the rebalanced plan: stream lengths and the max fill of unforced rounds."""
    loads = [rebalanced_after(c, num_devices) for c in cohorts]
    unforced = [whole_client_waste_floor(c, num_devices) <= WASTE_TARGET for c in cohorts]
    out = {}
    for per_octave in (2, 4, 8, 16):
        lengths = [finer_bucket(int(load.max()), per_octave) for load in loads]
        fill = [1 - int(load.sum()) / (num_devices * n) for load, n, u in zip(loads, lengths, unforced) if u]
        out[per_octave] = {"shapes": len(set(lengths)), "fill_max_unforced": max(fill, default=0.0)}
    return out


def summarize(cohorts: Sequence[np.ndarray], num_devices: int,
              plan: Callable[[Sequence[int], int], np.ndarray]) -> dict[str, Any]:
    """Waste, floor, shapes and fill of one packing over the rounds' cohorts."""
    loads = [plan(c, num_devices) for c in cohorts]
    waste = np.array([padding_waste(load) for load in loads])
    floor = np.array([whole_client_waste_floor(c, num_devices) for c in cohorts])
    lengths = [bucket_steps(int(load.max())) for load in loads]
    fill = [1 - int(load.sum()) / (num_devices * length) for load, length in zip(loads, lengths)]
    forced = floor > WASTE_TARGET
    worst = int(np.argmax(waste))
    unforced_max = float(waste[~forced].max()) if (~forced).any() else 0.0
    return {
        "waste_max": float(waste.max()), "waste_median": float(np.median(waste)),
        "worst_round": worst, "worst_round_floor": float(floor[worst]),
        "worst_round_longest_client": int(cohorts[worst].max()),
        "worst_round_average_load": float(cohorts[worst].sum() / num_devices),
        "forced_rounds": int(forced.sum()), "waste_max_unforced": unforced_max,
        "excess_max": float((waste - floor).max()),
        "shapes": len(set(lengths)), "stream_lengths": sorted(set(lengths)),
        "fill_median": float(statistics.median(fill)), "fill_max": float(max(fill)),
        "target_met": bool(unforced_max <= WASTE_TARGET and len(set(lengths)) <= SHAPES_TARGET),
    }


def row(setup: str, devices: int, when: str, s: dict[str, Any]) -> str:
    return (f"| {setup} | {devices} | {when} | {s['waste_max']:.1%} / {s['waste_median']:.2%} | "
            f"{s['worst_round']} ({s['waste_max']:.3f}; floor {s['worst_round_floor']:.3f}, longest client "
            f"{s['worst_round_longest_client']:,} vs average {s['worst_round_average_load']:,.0f}) | "
            f"{s['forced_rounds']} | {s['waste_max_unforced']:.1%} | {s['excess_max']:.1%} | {s['shapes']} | "
            f"{s['fill_median']:.1%} / {s['fill_max']:.1%} | {'yes' if s['target_met'] else 'no'} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="4,8", help="comma-separated device counts (default 4,8)")
    parser.add_argument("--so-cohorts", default="50", help="Stack Overflow clients per round, comma-separated")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--json", help="append one JSON line per set-up and device count to this file")
    args = parser.parse_args(argv)
    devices = [int(d) for d in args.devices.split(",")]
    start = time.perf_counter()
    setups: list[tuple[str, np.ndarray, int]] = [("synthetic", synthetic_steps(), 100)]
    so = stackoverflow_steps()
    setups += [(f"stackoverflow_{c}" if c != 50 else "stackoverflow", so, c)
               for c in (int(c) for c in args.so_cohorts.split(","))]
    print(f"{args.rounds} rounds, seed {SEED}; waste = padding_waste (idle device-steps / device-steps executed); "
          f"max / median; forced = rounds whose whole-client floor > {WASTE_TARGET:.0%}; fill = share of the "
          f"bucketed stream holding no step; target: unforced waste <= {WASTE_TARGET:.0%}, <= {SHAPES_TARGET} shapes")
    print("| set-up | devices | packing | waste max / median | worst round (waste; floor, longest vs average) | "
          "forced | waste max unforced | excess max | shapes | fill median / max | target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    json_file = open(args.json, "a") if args.json else None
    finer: list[str] = []
    for name, steps, cohort in setups:
        cohorts = [steps[sample_cohort(SEED, r, steps.size, cohort)] for r in range(args.rounds)]
        for d in devices:
            before = summarize(cohorts, d, longest_first_before)
            after = summarize(cohorts, d, rebalanced_after)
            print(row(name, d, "before", before))
            print(row(name, d, "after", after), flush=True)
            alternatives = bucket_alternatives(cohorts, d)
            finer.append(f"{name}, {d} devices: " + "; ".join(
                f"{k}/octave: {v['shapes']} lengths, fill <= {v['fill_max_unforced']:.1%}"
                for k, v in alternatives.items()))
            if json_file:
                from run_info import stamp  # benchmarks/ is on sys.path when run as a script

                record = {"benchmark": "bucket_cliff", "setup": name, "clients": int(steps.size),
                          "clients_per_round": cohort, "devices": d, "rounds": args.rounds,
                          "before": before, "after": after, "after_by_buckets_per_octave": alternatives}
                json_file.write(json.dumps(stamp(record)) + "\n")
                json_file.flush()
    if json_file:
        json_file.close()
    print("stream fill of unforced rounds with finer buckets (rebalanced plan; 2/octave = bucket_steps):")
    for line in finer:
        print("  " + line)
    issue = setups[0][1][sample_cohort(SEED, ISSUE_ROUND, setups[0][1].size, setups[0][2])]
    print(f"issue's round (synthetic, 4 devices, round index {ISSUE_ROUND}): waste before "
          f"{padding_waste(longest_first_before(issue, 4)):.3f}, after {padding_waste(rebalanced_after(issue, 4)):.3f}, "
          f"whole-client floor {whole_client_waste_floor(issue, 4):.3f}: one client of {int(issue.max()):,} steps "
          f"against an average device load of {issue.sum() / 4:,.0f}")
    print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
