"""FedBuff vs synchronous FedAvg with over-selection: simulated time to a target accuracy, same device profile.

The qualitative claim of Nguyen et al. (AISTATS 2022): under heavy-tailed
client speeds, buffered asynchronous aggregation reaches a target accuracy
in less (simulated) wall-clock time than synchronous rounds, which wait for
their slow clients. Both runs use the clock of pipelines/digits_fedbuff.py
(config keys clock.*: lognormal device slowness, network time) on the
embedded digits (100 clients, Dirichlet(0.5) label skew, 2x200 MLP):

* sync: pipelines/digits_fedavg.py on the clock with `clock.over_selection`
  (ceil(1.3 x 10) = 13 clients sampled, the first 10 to finish kept);
* fedbuff: pipelines/digits_fedbuff.py (30 clients in flight, a server step
  per 10 updates, 1/sqrt(1 + staleness) scaling).

Everything else (client SGD, batch, server SGD lr 1, evaluation) is the
digits_fedavg default. Writes a Markdown table and a plot of test accuracy
against simulated time (`fedstream plot --x simulated_time`).

    python benchmarks/fedbuff_vs_sync.py                                   # 3 seeds, 150 rounds / server steps
    python benchmarks/fedbuff_vs_sync.py --seeds 1 --rounds 40 --output /tmp/fb.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

from fedstream.config import load_config
from fedstream.training.plot import plot_runs
from fedstream.training.train import train

RUNS = {
    "sync FedAvg (over-selection 1.3)": ("digits_fedavg", ["clock.over_selection=1.3"]),
    "FedBuff (C=30, K=10)": ("digits_fedbuff", []),
}


def clock_overrides() -> list[str]:
    """The fedbuff pipeline's clock keys, applied to both runs (the same device profile)."""
    clock = load_config("digits_fedbuff", "fedstream.pipelines").clock
    return [f"clock.{k}={v}" for k, v in clock.items() if k not in ("over_selection", "deadline")]


def time_to_target(workdir: pathlib.Path, target: float) -> dict[str, float | None]:
    """(simulated seconds, round) of the first evaluation at or above `target` accuracy; the final accuracy."""
    train_rows, evals = {}, []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            train_rows[record["round"]] = record
        elif record["kind"] == "eval":
            evals.append(record)
    reached = next((e for e in evals if e["accuracy"] >= target), None)
    last = max(train_rows)
    return {"seconds": train_rows[reached["round"]]["simulated_time"] if reached else None,
            "round": reached["round"] if reached else None, "final_accuracy": evals[-1]["accuracy"],
            "final_time": train_rows[last]["simulated_time"], "rounds": last,
            "mean_staleness": statistics.fmean(r.get("staleness_mean", 0.0) for r in train_rows.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=150, help="rounds (sync) and server steps (FedBuff)")
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy to reach")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--data", default=None, help="preprocessed digits directory (default: a temporary one)")
    parser.add_argument("--output", default="docs/fedbuff_vs_sync.md")
    parser.add_argument("--plot", default="docs/fedbuff_vs_sync.png")
    args = parser.parse_args()

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="fedbuff_vs_sync_"))
    data = args.data or str(scratch / "digits")
    clock = clock_overrides()
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    plotted = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        for name, (pipeline, extra) in RUNS.items():
            workdir = scratch / f"{pipeline}_{seed}"
            config = load_config(pipeline, "fedstream.pipelines", [
                f"data.path={data}", f"num_rounds={args.rounds}", f"eval.every={args.eval_every}", f"seed={seed}",
                "checkpoint.every=1000", *clock, *extra])
            train(config, workdir, log=lambda _: None)
            results[name].append(time_to_target(workdir, args.target))
            if seed == 0:
                plotted.append(workdir)
            print(name, seed, results[name][-1], flush=True)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    lines = [f"Target test accuracy {args.target:.2f}; {args.seeds} seeds; {args.rounds} rounds (sync) / server steps "
             "(FedBuff); medians over seeds (simulated minutes).", "",
             "| run | time to target (min) | per seed (min) | rounds / steps to target | final accuracy | "
             f"time of {args.rounds} rounds (min) | mean staleness |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        minutes = [r["seconds"] / 60 if r["seconds"] is not None else None for r in rows]
        fmt = ", ".join("not reached" if m is None else f"{m:.1f}" for m in minutes)
        med = median(minutes)
        lines.append(f"| {name} | {'not reached' if med is None else f'{med:.1f}'} | {fmt} | "
                     f"{median([r['round'] for r in rows])} | {median([r['final_accuracy'] for r in rows]):.4f} | "
                     f"{median([r['final_time'] for r in rows]) / 60:.1f} | "
                     f"{median([r['mean_staleness'] for r in rows]):.2f} |")
    sync, buff = (median([r["seconds"] for r in rows]) for rows in results.values())
    if sync and buff:
        lines += ["", f"FedBuff reaches the target in {sync / buff:.2f}x less simulated time (ratio of medians)."]
    lines += ["", f"Wall time of the benchmark: {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    pathlib.Path(args.output).write_text(text)
    plot_runs(plotted, args.plot, metrics=["eval/accuracy"], x="simulated_time")
    print(f"wrote {args.output} and {args.plot} (runs in {scratch})")


if __name__ == "__main__":
    main()
