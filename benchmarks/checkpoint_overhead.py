"""What checkpointing every round costs: the README run with checkpoint.every=1 against every=50.

    python benchmarks/checkpoint_overhead.py                  # 3 runs of each, interleaved
    python benchmarks/checkpoint_overhead.py --runs 5 --json benchmarks/results/checkpoint_overhead.jsonl

Each run is `fedstream train PIPELINE --workdir <fresh temp dir> [--config.checkpoint.every=N]`
in its own subprocess, timed from spawn to exit (imports, compilation, the rounds, the final
evaluation and the last save's commit). The runs alternate (every=1, every=50, every=1, ...) so
that both see the same machine load; the report gives each setting's median wall time, the
ratio of the medians, and each run's final test accuracy (they must agree: a checkpoint never
changes the model). The dataset is preprocessed once, untimed, before the first run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run_info import stamp  # noqa: E402

_ACCURACY = re.compile(r"final test accuracy ([0-9.]+)")


def train_command(pipeline: str, workdir: pathlib.Path, data_path: pathlib.Path, every: int | None,
                  num_rounds: int | None = None) -> list[str]:
    """The `fedstream train` command line of one run (`every` None: the pipeline's own interval)."""
    cmd = [sys.executable, "-m", "fedstream.cli", "train", pipeline, "--workdir", str(workdir),
           f"--config.data.path={data_path}"]
    if every is not None:
        cmd.append(f"--config.checkpoint.every={every}")
    if num_rounds is not None:
        cmd.append(f"--config.num_rounds={num_rounds}")
    return cmd


def timed_run(cmd: list[str], workdir: pathlib.Path) -> dict[str, Any]:
    """Runs one training subprocess in a fresh `workdir`; its wall seconds, final accuracy and checkpoints."""
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    match = _ACCURACY.search(proc.stdout)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return {"seconds": seconds, "final_accuracy": float(match.group(1)) if match else None, "checkpoints": steps}


def measure(pipeline: str, runs: int, intervals: tuple[int, int], data_path: pathlib.Path,
            log: Any = print) -> dict[str, Any]:
    """Interleaved runs of the two checkpoint intervals; medians, their ratio and every run's numbers."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="fedstream-ckpt-overhead-"))
    try:
        # Untimed: preprocesses the dataset if missing (and warms the page cache).
        timed_run(train_command(pipeline, root / "warmup", data_path, intervals[1], num_rounds=1), root / "warmup")
        results: dict[int, list[dict[str, Any]]] = {every: [] for every in intervals}
        for i in range(runs):
            for every in intervals:
                run = timed_run(train_command(pipeline, root / f"every{every}-{i}", data_path, every),
                                root / f"every{every}-{i}")
                results[every].append(run)
                log(f"run {i + 1}/{runs} checkpoint.every={every}: {run['seconds']:.2f} s, "
                    f"final test accuracy {run['final_accuracy']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {every: statistics.median(r["seconds"] for r in results[every]) for every in intervals}
    accuracies = sorted({r["final_accuracy"] for rs in results.values() for r in rs}, key=str)
    return {
        "benchmark": "checkpoint_overhead",
        "pipeline": pipeline,
        "runs": runs,
        "intervals": list(intervals),
        "seconds": {str(every): [round(r["seconds"], 3) for r in results[every]] for every in intervals},
        "median_seconds": {str(every): round(medians[every], 3) for every in intervals},
        "ratio": round(medians[intervals[0]] / medians[intervals[1]], 3),
        "final_accuracies": accuracies,
        "same_accuracy": len(accuracies) == 1,
    }


def main(argv: list[str] | None = None) -> int:
    """Measures, prints a summary, appends a JSON line with `--json`; exit 1 if the accuracies differ."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="digits_fedavg")
    parser.add_argument("--runs", type=int, default=3, help="runs of each interval (interleaved)")
    parser.add_argument("--every", default="1,50", help="the two checkpoint intervals, measured against baseline")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"),
                        help="where the dataset is preprocessed (once)")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    first, second = (int(v) for v in args.every.split(","))
    data_path = pathlib.Path(args.data_dir) / args.pipeline
    result = measure(args.pipeline, args.runs, (first, second), data_path)
    print(f"median wall seconds: every={first} {result['median_seconds'][str(first)]:.2f}, every={second} "
          f"{result['median_seconds'][str(second)]:.2f}; ratio {result['ratio']:.2f}; final test accuracy "
          f"{'identical' if result['same_accuracy'] else 'DIFFERS'}: {result['final_accuracies']}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(stamp(result)) + "\n")
    return 0 if result["same_accuracy"] else 1


if __name__ == "__main__":
    sys.exit(main())
