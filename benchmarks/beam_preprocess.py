"""Recipe `grouped` on both preprocessing routes: a flat JSON Lines corpus grouped by domain, one process vs Beam.

    python benchmarks/beam_preprocess.py --size-gb 5 --dir DIR          # generate ~5 GB under DIR, run, delete
    python benchmarks/beam_preprocess.py --size-gb 0.2 --dir DIR        # a quick run
    python benchmarks/beam_preprocess.py --inputs 'c4/*.jsonl' --group-key domain --dir DIR   # your corpus

Needs apache-beam in the interpreter that runs it (`pip install 'fedstream[beam]'`).

Data (unless `--inputs`): C4-shaped JSON Lines, `{"domain": ..., "text": ..., "n": i}` per line,
in 16 files; texts of 0.3 to 3.5 KB drawn from a pool of 4,096 paragraphs of words (so zstd or
the page cache see realistic, compressible text), domains over `examples / 200` domains with
P(domain k) proportional to (k + 10)^-1.1 (a Zipf-like tail; the largest domain holds about 2% of
the records at 5 GB), records of a domain scattered over all files (as in C4).

Each route runs as its own `fedstream preprocess grouped` subprocess with the same config
(`--config.group_key=domain --config.text_key=text`, text stored as UTF-8 bytes):

* `single`: the single-process route (input streamed once into hash buckets on disk, 64 MiB of
  input per bucket, then grouped one bucket at a time);
* `beam`: `--runner DirectRunner --beam-option direct_num_workers=W --beam-option
  direct_running_mode=multi_processing` (W = `--workers`, 2 by default): W worker processes read
  64 MiB byte ranges and convert groups; the DirectRunner's shuffle is held by the driver.

Reported per route: wall time (the subprocess, including interpreter start and the input's
sha256 fingerprint), examples/s and input MB/s (MB = 10^6 bytes), and peak RSS: of the driver
process alone, the largest of any one process of its tree, and of the whole tree at one
sampling instant (every /proc/<pid>/status VmRSS of the tree summed, sampled every 0.2 s, so a
spike shorter than that can be missed). Then both datasets' content digests
(`FederatedDataset.content_digest`), which must be equal. Output: `key=value` lines; `--json
FILE` appends one JSON object per route. Generated input and both outputs are deleted at the end
unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

FILES = 16


def generate(directory: pathlib.Path, size_bytes: int, seed: int = 0) -> tuple[str, int]:
    """C4-shaped JSON Lines files under `directory` totalling about `size_bytes`; returns (glob, records)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(k))) for k in rng.integers(2, 10, 5000)]
    paragraphs = [" ".join(rng.choice(words, int(k))) for k in rng.integers(50, 600, 4096)]
    mean_record = float(np.mean([len(p) for p in paragraphs])) + 40
    records = max(int(size_bytes / mean_record), 1000)
    domains = max(records // 200, 10)
    weights = 1.0 / (np.arange(domains) + 10.0) ** 1.1  # Zipf-like, the largest domain ~2% of the records
    weights /= weights.sum()
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    handles = [open(directory / f"part-{k:05d}.jsonl", "w", encoding="utf-8", buffering=1 << 20) for k in range(FILES)]
    try:
        for start in range(0, records, 100_000):
            n = min(100_000, records - start)
            site = rng.choice(domains, n, p=weights)
            para = rng.integers(0, len(paragraphs), n)
            file = rng.integers(0, FILES, n)
            for i in range(n):
                line = json.dumps({"domain": f"www.site{site[i]}.example", "text": paragraphs[para[i]],
                                   "n": start + i}) + "\n"
                handles[file[i]].write(line)
                written += len(line)
    finally:
        for h in handles:
            h.close()
    return f"{directory}/part-*.jsonl", records


class TreeSampler(threading.Thread):
    """Samples the RSS of a process and all its descendants every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_tree = self.peak_driver = self.peak_one = 0
        self.max_processes = 0
        self.done = threading.Event()

    @staticmethod
    def _rss_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def run(self) -> None:
        while not self.done.is_set():
            rss = {pid: self._rss_kib(pid) for pid in self._tree()}
            self.peak_tree = max(self.peak_tree, sum(rss.values()))
            self.peak_driver = max(self.peak_driver, rss.get(self.pid, 0))
            self.peak_one = max(self.peak_one, max(rss.values(), default=0))
            self.max_processes = max(self.max_processes, sum(1 for v in rss.values() if v))
            self.done.wait(self.interval)


def run_route(name: str, command: list[str], examples: int, input_bytes: int) -> dict[str, Any]:
    """Runs one route's command, sampling its process tree; returns its numbers."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(process.pid)
    sampler.start()
    output, _ = process.communicate()
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    if process.returncode:
        sys.exit(f"{name} failed ({process.returncode}):\n{output[-4000:]}")
    return {"route": name, "wall_s": round(wall, 1), "examples_per_s": round(examples / wall),
            "input_MB_per_s": round(input_bytes / 1e6 / wall, 1),
            "peak_rss_driver_MiB": round(sampler.peak_driver / 1024), "peak_rss_one_process_MiB": round(sampler.peak_one / 1024),
            "peak_rss_tree_MiB": round(sampler.peak_tree / 1024), "processes": sampler.max_processes,
            "command": " ".join(command)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="working directory (input, spill, outputs)")
    parser.add_argument("--size-gb", type=float, default=5.0, help="size of the generated input (GB = 10^9 bytes)")
    parser.add_argument("--inputs", default="", help="use these files (glob) instead of generating")
    parser.add_argument("--group-key", default="domain")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--routes", default="single,beam")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    work = pathlib.Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    if args.inputs:
        pattern = args.inputs
        import glob

        examples = sum(sum(1 for _ in open(p, "rb")) for p in sorted(glob.glob(pattern)))
    else:
        t0 = time.perf_counter()
        pattern, examples = generate(work / "input", int(args.size_gb * 1e9))
        print(f"generated {examples:,} records in {time.perf_counter() - t0:.0f} s")
    import glob

    input_bytes = sum(os.path.getsize(p) for p in glob.glob(pattern))
    print(f"input={pattern} bytes={input_bytes:,} examples={examples:,} loadavg_before={load[0]:.2f},{load[1]:.2f}")
    (work / "spill").mkdir(exist_ok=True)
    base = [sys.executable, "-m", "fedstream.cli", "preprocess", "grouped", f"--config.inputs={pattern}",
            f"--config.group_key={args.group_key}", "--config.text_key=text", f"--config.spill_dir={work / 'spill'}"]
    commands = {
        "single": base + ["--output", str(work / "single")],
        "beam": base + ["--output", str(work / "beam"), "--runner", "DirectRunner",
                        f"--beam-option=direct_num_workers={args.workers}",
                        "--beam-option=direct_running_mode=multi_processing"],
    }
    results = []
    for name in args.routes.split(","):
        shutil.rmtree(work / name, ignore_errors=True)
        result = run_route(name, commands[name], examples, input_bytes)
        result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        results.append(result)
        print(" ".join(f"{k}={v}" for k, v in result.items() if k != "command"))
        print(f"  command: {result['command']}")

    from fedstream.data.reader import FederatedDataset

    digests = {}
    for r in results:
        ds = FederatedDataset(work / r["route"])
        r["clients"] = ds.num_clients("train")
        r["digest"] = digests[r["route"]] = ds.content_digest("train")
        print(f"{r['route']}: clients={r['clients']:,} digest={r['digest']}")
    if len(set(digests.values())) > 1:
        sys.exit("digests differ between the routes")
    if len(digests) > 1:
        print("digests equal: yes")
    print(f"loadavg_end={','.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({"benchmark": "beam_preprocess", "input_bytes": input_bytes, "examples": examples,
                                    **r}) + "\n")
    if not args.keep:
        for name in ("single", "beam", "spill") + (() if args.inputs else ("input",)):
            shutil.rmtree(work / name, ignore_errors=True)


if __name__ == "__main__":
    main()
