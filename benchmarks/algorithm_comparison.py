"""Algorithm comparison: accuracy after N rounds on Synthetic(1,1) and the digits, every algorithm.

Runs `fedstream train` (in-process, one workdir per algorithm and dataset) on the pipelines
of each algorithm, then writes a Markdown table of the final test accuracy (pooled and
client mean; for algorithms with personal models, Ditto and APFL, also the client mean of
their `personal_*` evaluation) and wall time, and a PNG plot of test accuracy versus round for all of them
(`fedstream plot`).

    python benchmarks/algorithm_comparison.py                       # 100 rounds each
    python benchmarks/algorithm_comparison.py --rounds 20 --output docs/algorithm_comparison.md

Synthetic(1,1) uses pipelines/synthetic_<algorithm>.py (FedProx paper's setup: logistic
regression, 10 of 30 devices per round, batch 10, 20 local epochs, lr 0.01). The digits use
digits_fedavg with `algorithm.name` and the same algorithm options as the synthetic pipeline.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

from fedstream.config import ConfigError, load_config
from fedstream.training.plot import plot_runs
from fedstream.training.train import train

# algorithm -> synthetic pipeline (its options are reused on the digits)
PIPELINES = {
    "fedavg": "synthetic_fedprox_setup",
    "fedprox": "synthetic_fedprox",
    "fednova": "synthetic_fednova",
    "scaffold": "synthetic_fedprox_setup",
    "mime": "synthetic_mime",
    "mimelite": "synthetic_mimelite",
    "agnostic_fedavg": "synthetic_agnostic_fedavg",
    "hyp_cluster": "synthetic_hyp_cluster",
    "ditto": "synthetic_fedprox_setup",
    "apfl": "synthetic_fedprox_setup",
}


def run(pipeline: str, algorithm: str, workdir: pathlib.Path, rounds: int, data: dict[str, str],
        options_from: str | None = None) -> dict[str, float]:
    """Trains one configuration; returns its final evaluation and wall seconds."""
    config = load_config(pipeline, "fedstream.pipelines", [f"num_rounds={rounds}", f"eval.every={max(rounds // 10, 1)}",
                                                           f"algorithm.name={algorithm}", *(f"{k}={v}" for k, v in data.items())])
    if options_from is not None:
        donor = load_config(options_from, "fedstream.pipelines")
        config.algorithm.options = donor.algorithm.options
        for key in ("client.momentum",):
            section, name = key.split(".")
            config[section][name] = donor[section][name]
    start = time.perf_counter()
    result = train(config, workdir, log=lambda _: None)
    return {**result.final_eval, "seconds": time.perf_counter() - start}


def personal(result: dict[str, float]) -> str:
    """The client-mean accuracy of the personal models (Ditto's v_i, APFL's mixes), or a dash without them."""
    value = result.get("personal_client_mean_accuracy")
    return "–" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--algorithms", default=",".join(PIPELINES))
    parser.add_argument("--datasets", default="synthetic,digits")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_compare_data"))
    parser.add_argument("--output", default="docs/algorithm_comparison.md", help="Markdown table to write")
    parser.add_argument("--plot", default="docs/algorithm_comparison.png", help="PNG plot to write")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="fedstream_compare_"))
    rows, runs = [], []
    try:
        for dataset in args.datasets.split(","):
            for algorithm in args.algorithms.split(","):
                workdir = work / f"{dataset}_{algorithm}"
                try:
                    if dataset == "synthetic":
                        data = {"data.path": f"{args.data_dir}/synthetic_1_1"}
                        result = run(PIPELINES[algorithm], algorithm, workdir, args.rounds, data)
                    else:
                        data = {"data.path": f"{args.data_dir}/digits"}
                        result = run("digits_fedavg", algorithm, workdir, args.rounds, data,
                                     options_from=PIPELINES[algorithm])
                except ConfigError as e:  # e.g. AgnosticFedAvg on a dataset without domain_id
                    print(f"dataset={dataset} algorithm={algorithm} skipped: {e}", flush=True)
                    continue
                rows.append((dataset, algorithm, result))
                runs.append(workdir)
                print(f"dataset={dataset} algorithm={algorithm} accuracy={result['accuracy']:.4f} "
                      f"client_mean_accuracy={result['client_mean_accuracy']:.4f} seconds={result['seconds']:.1f}",
                      flush=True)
        lines = [f"# Algorithm comparison ({args.rounds} rounds)", "",
                 f"Generated by `python benchmarks/algorithm_comparison.py --rounds {args.rounds}` on a 2-core CPU VM; "
                 "one seed, default options of each algorithm's synthetic pipeline (not tuned per algorithm).", "",
                 "| dataset | algorithm | test accuracy (pooled) | client-mean accuracy "
                 "| personal client-mean accuracy | wall s |", "|---|---|---|---|---|---|"]
        lines += [f"| {d} | {a} | {r['accuracy']:.4f} | {r['client_mean_accuracy']:.4f} | {personal(r)} | "
                  f"{r['seconds']:.0f} |" for d, a, r in rows]
        lines += ["", f"![test accuracy vs round]({pathlib.Path(args.plot).name})", ""]
        pathlib.Path(args.output).write_text("\n".join(lines))
        plot_runs(runs, args.plot, metrics=["eval/accuracy"], x="round")
        print(f"wrote {args.output} and {args.plot}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
