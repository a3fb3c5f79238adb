"""How fast the cohort pipeline alone produces rounds: serial, reader threads, or Grain worker processes.

    python benchmarks/pipeline_modes.py --data-dir DIR            # Synthetic(1,1), 10,000 devices, 1,000 clients/round
    python benchmarks/pipeline_modes.py --data-dir DIR --clients 200 --repeats 5

No training: each mode builds `--rounds` packed rounds of the logistic-regression workload of
`scaling.py` (batch 10, 1 epoch) and the median seconds per round after the first is
reported, modes interleaved over `--repeats` passes. Modes:

- `serial`: `CohortPipeline.iterator` with `data_threads=0` (everything inside `next()`);
- `threads=N`: the train loop's pipeline with N reader threads and the round prefetch thread;
- `processes=N`: the same per-client map run in N Grain worker processes (`mp_prefetch`,
  spawn start method, decoded clients returned through shared memory), packed in this process.

The dataset is the `synthetic` recipe's (written under DIR on first use, as scaling.py does).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Iterator

import grain

import scaling  # benchmarks/ is first on sys.path when run as a script
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.data.reader import FederatedDataset
from run_info import stamp


def pipeline(ds: FederatedDataset, clients: int, threads: int, seed: int) -> CohortPipeline:
    return CohortPipeline(ds, "train", ("x", "y"), seed=seed, cohort_size=clients,
                          batching=ClientBatching(scaling.SYNTHETIC_BATCH, scaling.SYNTHETIC_EPOCHS), num_devices=1,
                          data_threads=threads)


def rounds(mode: str, ds: FederatedDataset, clients: int, num_rounds: int, seed: int) -> Iterator[Any]:
    """The packed rounds of one mode."""
    kind, _, n = mode.partition("=")
    if kind == "serial":
        return pipeline(ds, clients, 0, seed).iterator(num_rounds)
    if kind == "threads":
        return pipeline(ds, clients, int(n), seed).iterator(num_rounds)
    if kind == "processes":
        pipe = pipeline(ds, clients, 0, seed)
        per_client = grain.MapDataset.range(num_rounds * clients).map(pipe.load_slot).to_iter_dataset()
        parallel = per_client.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(n), per_worker_buffer_size=8))
        return iter(parallel.batch(clients, drop_remainder=True, batch_fn=pipe.pack))
    raise ValueError(f"unknown mode {mode!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"))
    parser.add_argument("--clients", type=int, default=1000, help="clients per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode and pass (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes over the modes")
    parser.add_argument("--modes", default="serial,threads=1,threads=2,processes=1,processes=2")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    args = parser.parse_args()
    from absl import flags

    # Grain's worker processes read absl flags: see docs/notes.md, 'Grain worker processes and absl flags'.
    flags.FLAGS(sys.argv[:1])
    ds = FederatedDataset(scaling.synthetic_dataset(pathlib.Path(args.data_dir), scaling.POPULATION))
    modes = args.modes.split(",")
    per_round: dict[str, list[float]] = {m: [] for m in modes}
    per_example: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            it = rounds(mode, ds, args.clients, args.rounds, seed=rep)
            next(it)
            start, examples = time.perf_counter(), 0
            for _ in range(args.rounds - 1):
                examples += int(next(it)["num_examples"])
            elapsed = time.perf_counter() - start
            per_round[mode].append(elapsed / (args.rounds - 1))
            per_example[mode].append(1e6 * elapsed / examples)
            print(f"pass={rep + 1} mode={mode} s_per_round={per_round[mode][-1]:.3f} "
                  f"us_per_example={per_example[mode][-1]:.2f}", flush=True)
    base = statistics.median(per_example["serial"]) if "serial" in per_example else None
    for mode in modes:
        us = statistics.median(per_example[mode])
        record = {"mode": mode, "clients_per_round": args.clients, "s_per_round_median": statistics.median(
            per_round[mode]), "us_per_example_median": us, "us_per_example": per_example[mode],
            "vs_serial": us / base if base else None}
        print(f"mode={mode} s_per_round_median={record['s_per_round_median']:.3f} us_per_example_median={us:.2f}"
              + (f" vs_serial={us / base:.2f}" if base else ""), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(stamp(record)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
