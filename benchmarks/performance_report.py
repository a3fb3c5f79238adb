"""Generates the measured tables of docs/performance.md from the benchmarks' JSON lines.

    python benchmarks/performance_report.py           # rewrite the generated blocks of docs/performance.md
    python benchmarks/performance_report.py --check   # exit 1 when the page differs from the JSON lines

Inputs (in --results, default benchmarks/results/): `round_efficiency.jsonl`,
`scaling.jsonl`, `larger_than_ram.jsonl`, `pipeline_modes.jsonl`, `flat_memory.jsonl`,
as appended by those scripts' `--json` flag. Only lines stamped with a `run` (command, machine, date; see run_info.py)
are used. Each block of the page between

    <!-- BEGIN GENERATED <name> -->  ...  <!-- END GENERATED <name> -->

is replaced by its table and a "Measured" line naming the runs, machine and
commands behind it; the prose around the blocks is kept as written. Medians are
over runs (round_efficiency.py, larger_than_ram.py: one run per invocation) or over
the repetitions inside one run (scaling.py `--repeats`, 3 by default).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DOC = ROOT / "docs" / "performance.md"
BLOCK = re.compile(r"(<!-- BEGIN GENERATED (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- END GENERATED (?P=name) -->)",
                   re.S)


# ----------------------------------------------------------------------------- formatting


def num(v: float, digits: int = 3) -> str:
    """`v` with `digits` significant digits, thousands separated, no exponent for everyday sizes."""
    if v == 0:
        return "0"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    text = f"{v:.{digits}g}"
    return f"{float(text):,}" if "e" in text else text


def pct(v: float) -> str:
    """A fraction as a percentage with two significant digits (one decimal under 10%)."""
    p = 100 * v
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def ratio(v: float) -> str:
    return f"{v:.2f}"


def spread(values: Sequence[float], fmt: Callable[[float], str] = num) -> str:
    """`median (min–max)` of several values, `value` of one."""
    values = list(values)
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def provenance(records: Sequence[dict[str, Any]], runs_note: str) -> list[str]:
    """The "Measured" paragraph: dates, machine, versions and the distinct commands of `records`."""
    runs = [r["run"] for r in records]
    dates = sorted({run["date"] for run in runs})
    machines = sorted({run["machine"] for run in runs})
    versions = sorted({", ".join(f"{k} {v}" for k, v in run["versions"].items()) for run in runs})
    commands = sorted({run["command"] for run in runs})
    loads = [run["load_average_at_start"] for run in runs]
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines = [f"Measured {when}; {runs_note}; {'; '.join(machines)}; {'; '.join(versions)}; "
             f"1-minute load average at start {num(min(loads), 2)}–{num(max(loads), 2)}. "
             f"Command{'s' if len(commands) > 1 else ''}:", ""]
    lines += [f"    {command}" for command in commands]
    return lines


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The stamped JSON lines of `path` ([] when it does not exist)."""
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise SystemExit(f"{path}:{i}: not a JSON line ({e})") from None
        if "run" in record:
            out.append(record)
    return out


def missing(what: str, script: str) -> list[str]:
    return [f"*No stamped results yet: run `python benchmarks/{script} --json benchmarks/results/{what}` "
            "and then this report.*"]


# ----------------------------------------------------------------------------- blocks


def block_round_limit(results: pathlib.Path) -> list[str]:
    """(a) Round time against the in-memory limit, per model and clients per round."""
    records = [r for r in read_jsonl(results / "round_efficiency.jsonl") if "ratio" in r]
    if not records:
        return missing("round_efficiency.jsonl", "round_efficiency.py")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["clients_per_round"])].append(r)
    rows = []
    for (model, clients), rs in sorted(groups.items()):
        rows.append([
            model, f"{clients:,}", str(len(rs)), num(statistics.median(r["steps_per_round"] for r in rs)),
            spread([r["fedstream_median_s"] for r in rs]), spread([r["limit_median_s"] for r in rs]),
            "**" + spread([r["ratio"] for r in rs], ratio) + "**", spread([r["paired_ratio_median"] for r in rs], ratio),
            num(statistics.median(r["fedstream_ms_per_step"] for r in rs)),
            pct(statistics.median(r["data_wait_median_s"] / r["fedstream_median_s"] for r in rs)),
        ])
    lines = table(["model", "clients/round", "runs", "steps/round", "fedstream s", "limit s", "ratio",
                   "paired ratio", "fedstream ms/step", "data wait"], rows)
    lines += ["", "fedstream s and limit s: medians over runs (range) of each run's median round; ratio: of those "
              "two per run; paired ratio: each run's median of round-by-round ratios (the limit runs right after "
              "each round, so both see the same load)."]
    invocations = len({(r["run"]["date"], r["run"]["command"]) for r in records})
    return lines + [""] + provenance(records, f"{invocations} invocations (the runs column counts each row's)")


def scaling_records(results: pathlib.Path, part: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(results / "scaling.jsonl") if r.get("part") == part]


def block_scaling(results: pathlib.Path) -> list[str]:
    """(b) Round time against clients per round, with the linear fit."""
    summaries = scaling_records(results, "b_summary")
    if not summaries:
        return missing("scaling.jsonl", "scaling.py")
    rows = []
    for s in sorted(summaries, key=lambda s: (s["workload"], s["clients_per_round"], s["pipeline"])):
        rows.append([
            s["workload"] + ("" if s["pipeline"] == "prefetch" else f" ({s['pipeline']} pipeline)"),
            f"{s['clients_per_round']:,}", str(s["repeats"]), f"{round(s['examples_per_round']):,}",
            f"{num(s['round_median_s'])} ({num(s['round_median_min_s'])}–{num(s['round_median_max_s'])})",
            num(s["us_per_example"]), pct(s["data_wait_frac"]), num(s["peak_rss_bytes"] / 2**30, 2),
            num(s["packed_bytes"] / 2**20),
        ])
    lines = table(["workload", "clients/round", "repeats", "examples/round", "round s, median (range)",
                   "µs/example", "data wait", "peak RSS GiB", "packed round MiB"], rows)
    fits = scaling_records(results, "b_fit")
    if fits:
        lines += ["", "Least-squares fit of round time = slope × examples + intercept over every timed round:", ""]
        lines += table(["workload", "clients/round in the fit", "rounds", "slope µs/example", "intercept ms", "R²"],
                       [[f["workload"], f"{min(f['clients_per_round']):,}–{max(f['clients_per_round']):,}",
                         str(f["points"]), num(f["slope_us_per_example"]), num(f["intercept_ms"]), f"{f['r2']:.3f}"]
                        for f in fits])
    lines += ["", "![round time against examples per round](../benchmarks/results/scaling.png)"]
    return lines + [""] + provenance(summaries, "medians over the repetitions inside one run")


def block_padding(results: pathlib.Path) -> list[str]:
    """(c) Padding waste on Stack-Overflow-like client sizes, fedstream's packing against vmap padding."""
    records = scaling_records(results, "c")
    workload = scaling_records(results, "c_workload")
    if not records:
        return missing("scaling.jsonl", "scaling.py")
    lines = []
    if workload:
        w = workload[-1]
        lines += [f"Client sizes: {w['clients']:,} clients, max(1, floor(LogNormal(μ={w['lognormal_mu']}, "
                  f"σ={w['lognormal_sigma']}))) examples, capped at {w['cap_examples']:,} "
                  f"({pct(w['share_capped'])} of the clients hit the cap), batch {w['batch']}: "
                  f"mean {num(w['mean_steps'])} steps, max {w['max_steps']}.", ""]
    rows = [[f"{r['clients_per_round']:,}", str(r["devices"]), str(r["rounds"]),
             f"**{pct(r['packed_waste_median'])} / {pct(r['packed_waste_max'])}**", str(r["packed_shapes"]),
             f"{pct(r['bound_waste_median'])} / {pct(r['bound_waste_max'])}",
             f"{pct(r['vmap_waste_median'])} / {pct(r['vmap_waste_max'])}", str(r["vmap_shapes"]), r["target_met"]]
            for r in sorted(records, key=lambda r: (r["clients_per_round"], r["devices"], r["run"]["date"]))]
    lines += table(["clients/round", "devices", "rounds", "fedstream waste median / max", "compiled shapes",
                    "whole-client bound median / max", "vmap padding waste median / max", "vmap shapes",
                    "≤ 10% and ≤ 8 shapes"], rows)
    return lines + [""] + provenance(records, "deterministic (host-side packing only, no timing)")


def block_data_wait(results: pathlib.Path) -> list[str]:
    """(d) Share of the round spent waiting for data, per workload and clients per round."""
    rows = []
    scaling = [s for s in scaling_records(results, "b_summary") if s["pipeline"] == "prefetch"]
    for s in sorted(scaling, key=lambda s: (s["workload"], s["clients_per_round"])):
        compute = s["round_minus_wait_median_s"] / s["examples_per_round"] * 1e6
        rows.append([s["workload"], f"{s['clients_per_round']:,}", pct(s["data_wait_frac"]),
                     num(s["us_per_example"]), num(compute)])
    efficiency = [r for r in read_jsonl(results / "round_efficiency.jsonl") if "ratio" in r]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in efficiency:
        groups[(r["model"], r["clients_per_round"])].append(r)
    for (model, clients), rs in sorted(groups.items()):
        rows.append([f"emnist_{model} (round_efficiency.py)", f"{clients:,}",
                     pct(statistics.median(r["data_wait_median_s"] / r["fedstream_median_s"] for r in rs)),
                     "", ""])
    if not rows:
        return missing("scaling.jsonl", "scaling.py")
    lines = table(["workload", "clients/round", "data wait (time in `next()` / round)", "µs/example (round)",
                   "µs/example (round less wait)"], rows)
    return lines + [""] + provenance(scaling + efficiency, "the runs of blocks (a) and (b)")


def block_larger_than_ram(results: pathlib.Path) -> list[str]:
    """(e) Writing and training on datasets below and above RAM."""
    records = read_jsonl(results / "larger_than_ram.jsonl")
    stages: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("stage") in ("raw", "write", "train"):
            stages[(r["stage"], r["size"])].append(r)
    sizes = sorted({size for _, size in stages}, key=lambda s: ("small", "large").index(s) if s in ("small", "large")
                   else 2)
    if not sizes:
        return missing("larger_than_ram.jsonl", "larger_than_ram.py")
    write_rows, train_rows = [], []
    for size in sizes:
        raws, writes, trains = stages[("raw", size)], stages[("write", size)], stages[("train", size)]
        if writes:
            w0 = writes[0]
            ratio = [w["writer_examples_per_s"] / r["arrayrecord_examples_per_s"] for w, r in zip(writes, raws)]
            write_rows.append([
                size, f"{w0['examples']:,} ex, {num(w0['disk_bytes'] / 1e9)} GB", str(len(writes)),
                spread([r["arrayrecord_examples_per_s"] / 1e3 for r in raws]) + "k/s, "
                + num(statistics.median(r["arrayrecord_MB_per_s"] for r in raws)) + " MB/s" if raws else "–",
                "**" + spread([w["writer_examples_per_s"] / 1e3 for w in writes]) + "k/s, "
                + num(statistics.median(w["writer_MB_per_s"] for w in writes)) + " MB/s**",
                spread(ratio, lambda v: f"{v:.2f}") if ratio else "–",
                num(statistics.median(w["writer_durable_examples_per_s"] for w in writes) / 1e3) + "k/s",
                spread([w["peak_rss_MB"] for w in writes]),
            ])
        if trains:
            t0 = trains[0]
            train_rows.append([
                size, f"{num(t0['dataset_bytes'] / 1e9)} GB / {num(t0['ram_bytes'] / 1e9)} GB = "
                      f"{t0['dataset_over_ram']:.2f}", str(len(trains)),
                spread([t["process_start_to_first_round_s"] for t in trains]),
                spread([t["first_next_s"] for t in trains]), spread([t["median_round_s"] for t in trains]),
                spread([t["data_wait_fraction"] for t in trains], pct),
                spread([t["disk_read_MB_per_round"] for t in trains]),
                "**" + spread([t["peak_rss_MB"] for t in trains]) + "**",
            ])
    lines = ["Preprocessing (examples/s and MB/s on disk; the bare write is the same records and chunks through "
             "`ArrayRecordWriter` alone, measured in the same run):", ""]
    lines += table(["size", "dataset", "runs", "bare ArrayRecord write", "DatasetWriter", "writer / bare",
                    "writer incl. fsync", "writer peak RSS MB"], write_rows)
    t = next(iter(stages[("train", sizes[0])]), None)
    rounds = f"{t['rounds']} rounds × {t['clients_per_round']:,} clients" if t else "training"
    lines += ["", f"Training ({rounds}, dense 2×200, the dataset evicted from the page cache first; seconds):", ""]
    lines += table(["size", "dataset / RAM", "runs", "process start → first round done", "first `next()`",
                    "median round", "data wait", "MB read from disk per round", "peak RSS MB"], train_rows)
    return lines + [""] + provenance(records, "median (range) over runs")


def block_devices(results: pathlib.Path) -> list[str]:
    """(f) 1 vs 2 vs 4 host CPU devices on the dense EMNIST-shaped round."""
    records = scaling_records(results, "f_summary")
    if not records:
        return missing("scaling.jsonl", "scaling.py")
    rows = [[f"{r['clients_per_round']:,}", str(r["devices"]) + (", start perturbed by 1e-8" if r["perturbed_start"]
                                                                 else ""),
             str(r["repeats"]), num(r["round_median_s"]), "–" if r["perturbed_start"] else f"{r['speedup_vs_1']:.2f}",
             num(r["param_diff_first_round"], 2), num(r["param_diff_last_round"], 2)]
            for r in sorted(records, key=lambda r: (r["clients_per_round"], r["perturbed_start"], r["devices"]))]
    lines = table(["clients/round", "host devices", "repeats", "round s", "speed-up vs 1",
                   "max param diff vs 1 device, round 1", "after the last round"], rows)
    return lines + [""] + provenance(records, "medians over the repetitions inside one run")


def block_pipeline_modes(results: pathlib.Path) -> list[str]:
    """The cohort pipeline alone: serial, reader threads, Grain worker processes."""
    records = read_jsonl(results / "pipeline_modes.jsonl")
    if not records:
        return missing("pipeline_modes.jsonl", "pipeline_modes.py")
    rows = [[r["mode"], f"{r['clients_per_round']:,}", str(len(r["us_per_example"])), num(r["s_per_round_median"]),
             num(r["us_per_example_median"]), ratio(r["vs_serial"]) if r.get("vs_serial") else "–"]
            for r in records]
    lines = table(["mode", "clients/round", "passes", "s per round", "µs per example", "vs serial"], rows)
    return lines + [""] + provenance(records, "medians of interleaved passes inside one run")


FLAT_MEMORY_GB = 1.5  # the goals: peak RSS <= 1.5 GB and <= 1.3x the 1,000-client run
FLAT_MEMORY_RATIO = 1.3


def block_flat_memory(results: pathlib.Path) -> list[str]:
    """Peak RSS and round time against clients per round, chunked rounds against one call per round."""
    records = read_jsonl(results / "flat_memory.jsonl")
    if not records:
        return missing("flat_memory.jsonl", "flat_memory.py")
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["setup"], r["chunk_mb"], r["clients_per_round"])].append(r)
    base = {(setup, mb): statistics.median(r["peak_rss_MB"] for r in rs if "skipped" not in r)
            for (setup, mb, clients), rs in groups.items()
            if clients == 1000 and any("skipped" not in r for r in rs)}
    rows = []
    for (setup, mb, clients), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == 0, -kv[0][1], kv[0][2])):
        ran = [r for r in rs if "skipped" not in r]
        head = [setup, f"{mb} MiB" if mb else "0 (one call)", f"{clients:,}"]
        if not ran:
            rows.append(head + ["–"] * 8 + [f"not run: {rs[-1]['skipped']}"])
            continue
        peak = [r["peak_rss_MB"] * 2**20 / 1e9 for r in ran]  # peak_rss_MB is in MiB (ru_maxrss / 1024)
        vs = [r["peak_rss_MB"] / base[(setup, mb)] for r in ran] if (setup, mb) in base else []
        goal = "–"
        if clients > 1000 and vs:
            met = max(peak) <= FLAT_MEMORY_GB and max(vs) <= FLAT_MEMORY_RATIO
            goal = "yes" if met else "no"
        rows.append(head + [
            str(len(ran)), num(statistics.median(r["example_steps"] for r in ran) / 1e6) + "M",
            "**" + spread(peak, lambda v: f"{v:.2f}") + "**", spread(vs, ratio) if vs else "–",
            spread([r["round_s"] for r in ran]), spread([r["s_per_1M_example_steps"] for r in ran]),
            f"{ran[0]['chunks']:,} × {ran[0]['chunk_clients']:,}", spread([r["compile_s"] for r in ran]), goal])
    lines = table(["set-up", "chunk budget", "clients/round", "runs", "example-steps", "peak RSS GB",
                   "peak vs 1,000", "round s", "s per 1M example-steps", "chunks × clients", "compile s",
                   f"≤ {FLAT_MEMORY_GB} GB and ≤ {FLAT_MEMORY_RATIO}× 1,000"], rows)
    phases = [r for r in records if "phases" in r]
    if phases:
        names = list(dict.fromkeys(p["phase"] for r in phases for p in r["phases"]))

        def after(r: dict[str, Any], name: str) -> str:
            return next((num(p["rss_MB"]) for p in r["phases"] if p["phase"] == name), "–")

        lines += ["", "RSS (MiB, `VmRSS`) after each phase of a run, and the highest RSS sampled during the round:",
                  ""]
        lines += table(["set-up", "chunk budget", "clients/round", *names, "max in round"],
                       [[r["setup"], f"{r['chunk_mb']} MiB" if r["chunk_mb"] else "0", f"{r['clients_per_round']:,}",
                         *[after(r, name) for name in names], num(r["round_rss_max_MB"])]
                        for r in sorted(phases, key=lambda r: (r["setup"], r["chunk_mb"] == 0, -r["chunk_mb"],
                                                                      r["clients_per_round"]))])
    return lines + [""] + provenance(records, "one round per run, each run in its own process")


BLOCKS: dict[str, Callable[[pathlib.Path], list[str]]] = {
    "round_limit": block_round_limit,
    "scaling": block_scaling,
    "padding": block_padding,
    "data_wait": block_data_wait,
    "larger_than_ram": block_larger_than_ram,
    "devices": block_devices,
    "pipeline_modes": block_pipeline_modes,
    "flat_memory": block_flat_memory,
}


def render(doc: str, results: pathlib.Path) -> str:
    """`doc` with every generated block rebuilt from the JSON lines in `results`."""
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"docs/performance.md: unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return match.group(1) + "\n".join(BLOCKS[name](results)) + "\n" + match.group(4)

    return BLOCK.sub(replace, doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="folder of the benchmarks' JSON lines")
    parser.add_argument("--doc", default=str(DEFAULT_DOC), help="the page to update")
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = parser.parse_args(argv)
    doc_path = pathlib.Path(args.doc)
    doc = doc_path.read_text(encoding="utf-8")
    found = {m["name"] for m in BLOCK.finditer(doc)}
    if absent := [name for name in BLOCKS if name not in found]:
        print(f"{doc_path}: no generated block for {', '.join(absent)}", file=sys.stderr)
        return 1
    new = render(doc, pathlib.Path(args.results))
    if args.check:
        if new != doc:
            print(f"{doc_path} is out of date with {args.results}: run python benchmarks/performance_report.py",
                  file=sys.stderr)
            return 1
        print(f"{doc_path} is up to date")
        return 0
    tmp = doc_path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(doc_path)
    print(f"wrote {doc_path} ({len(found)} generated blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
