"""Larger than RAM: streaming preprocessing and training on an EMNIST-shaped dataset bigger than memory.

Reproduce (2-core CPU VM, 24 GiB RAM; the default run needs ~36 GB of free disk
and took 6-7 minutes):

    python benchmarks/larger_than_ram.py                      # small (~3 GB) and large (~32 GB)
    python benchmarks/larger_than_ram.py --quick              # tiny smoke run (< 2 min)
    python benchmarks/larger_than_ram.py --sizes small --json results.jsonl

Data: federated-EMNIST-shaped synthetic clients (28x28x1 float32 pixels,
int32 label, 62 classes; 3,140-byte records), log-normal client sizes (mean
100 examples, sigma 0.6). `small`: 10,000 clients (~1M examples, ~3.2 GB on
disk); `large`: 100,000 clients (~10M examples, ~32 GB on disk, more than the
machine's RAM). The generator is cheap on purpose so that the writer, not the
generator, is measured: each client draws a pool of 16 random images and its
examples are rows of that pool (one gather), plus random labels.

Every stage runs in its own subprocess, so each stage's peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is its own:

* `raw`: the same records (fedstream's encoding, shards cut at client
  boundaries after 4,096 records, options `group_size:1,uncompressed`)
  written by a bare `ArrayRecordWriter`: the ceiling for the writer. Deleted
  right after it is measured.
* `write`: the same clients through `DatasetWriter` (validation, encoding,
  index, per-shard sha256, atomic rename): what `fedstream preprocess` pays.
  Both stages report examples/s and MB/s (MB = 10^6 bytes on disk) of the
  stage without the generator's time, once up to `close()` (the data may
  still sit in the page cache as dirty pages) and once including an fsync of
  every file ("durable").
* `train`: 20 rounds, 500 clients per round, the 2x200 dense model, FedAdam as
  in round_efficiency.py (batch 20, 1 local epoch, client SGD lr 10^-1.5,
  server Adam lr 10^-2.5), through `CohortPipeline` and `build_train_round` as
  the train loop runs them (new stream lengths compile when first met). Before
  it starts, the dataset's pages are dropped from the page cache with
  `posix_fadvise(POSIX_FADV_DONTNEED)` on each (fsynced) file, which needs no
  root (`--no-evict` keeps them), so the run reads from disk what it samples.
  Reported: first-round latency (subprocess spawn -> first round done, and
  the first `next(iterator)` alone), median round time (rounds 2..N),
  data-wait fraction (time inside `next()` / round time, rounds 2..N), peak
  RSS, and the bytes read: the sampled clients' record bytes per round
  (logical) and what the process fetched from storage (`read_bytes` of
  /proc/self/io, which counts page-cache misses only).

Output: `key=value` lines; `--json FILE` appends one JSON object per stage
and a summary. The datasets are deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from run_info import stamp  # benchmarks/ is first on sys.path when run as a script

SHAPE = (28, 28, 1)
NUM_CLASSES = 62
RECORD_BYTES = 28 * 28 * 4 + 4
POOL = 16  # random base images per client
SIGMA = 0.6
RECORDS_PER_SHARD = 4096
SIZES = {  # name -> (clients, mean examples per client)
    "small": (10_000, 100),
    "large": (100_000, 100),
}
QUICK_SIZES = {"small": (300, 100), "large": (1_000, 100)}
DISK_HEADROOM = 3 * 10**9  # bytes left free after the largest stage


# --------------------------------------------------------------------------- generator


def client_sizes(num_clients: int, mean: int, seed: int) -> np.ndarray:
    """Log-normal example counts with mean `mean` (at least 1 per client)."""
    rng = np.random.default_rng([seed, 0])
    return np.maximum(1, rng.lognormal(np.log(mean) - SIGMA**2 / 2, SIGMA, num_clients).astype(np.int64))


def client_examples(seed: int, client: int, n: int) -> dict[str, np.ndarray]:
    """One client's examples: rows of a per-client pool of random images (cheap), random labels."""
    rng = np.random.default_rng([seed, 1, client])
    pool = rng.integers(0, 256, (POOL, *SHAPE), dtype=np.uint8).astype(np.float32) * np.float32(1 / 255)
    return {"x": pool[rng.integers(0, POOL, n)], "y": rng.integers(0, NUM_CLASSES, n, dtype=np.int32)}


def schema() -> dict[str, Any]:
    from fedstream.data.format import FeatureSpec

    return {"x": FeatureSpec("float32", SHAPE), "y": FeatureSpec("int32", ())}


# --------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def proc_io() -> dict[str, int]:
    """This process's I/O counters (all threads): rchar (read syscalls), read_bytes (from storage)."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def fsync_tree(path: pathlib.Path) -> None:
    """Flushes every file under `path` to disk (and the directories)."""
    for p in files_under(path) + [path] + [d for d in path.rglob("*") if d.is_dir()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict_tree(path: pathlib.Path) -> int:
    """Drops the (clean) page-cache pages of every file under `path`; returns the bytes covered."""
    total = 0
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rates(examples: int, nbytes: int, seconds: float, prefix: str) -> dict[str, float]:
    return {f"{prefix}_s": seconds, f"{prefix}_examples_per_s": examples / seconds,
            f"{prefix}_MB_per_s": nbytes / 1e6 / seconds}


# --------------------------------------------------------------------------- stages (subprocesses)


def stage_raw(out: pathlib.Path, num_clients: int, mean: int, seed: int) -> dict[str, Any]:
    """The same records through a bare ArrayRecordWriter (same options, same shard cuts)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from fedstream.data.format import encode_examples
    from fedstream.data.writer import DEFAULT_COMPRESSION, default_group_size, shard_options

    sch = schema()
    options = shard_options(default_group_size(sch), DEFAULT_COMPRESSION)  # the same chunks as DatasetWriter's
    sizes = client_sizes(num_clients, mean, seed)
    (out / "train").mkdir(parents=True)
    gen_s = encode_s = write_s = 0.0
    t_start = time.perf_counter()
    writer, shard, in_shard = None, 0, 0
    for i, n in enumerate(sizes.tolist()):
        t0 = time.perf_counter()
        ex = client_examples(seed, i, n)
        t1 = time.perf_counter()
        records = encode_examples(sch, ex, n)
        t2 = time.perf_counter()
        if writer is None or in_shard >= RECORDS_PER_SHARD:
            if writer is not None:
                writer.close()
                shard += 1
            writer = ArrayRecordWriter(str(out / "train" / f"shard-{shard:05d}.array_record"), options)
            in_shard = 0
        for r in records:
            writer.write(r)
        in_shard += n
        t3 = time.perf_counter()
        gen_s += t1 - t0
        encode_s += t2 - t1
        write_s += t3 - t2
    t0 = time.perf_counter()
    writer.close()
    write_s += time.perf_counter() - t0
    total_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    fsync_tree(out)
    fsync_s = time.perf_counter() - t0
    examples, nbytes = int(sizes.sum()), dir_bytes(out)
    return {"clients": num_clients, "examples": examples, "disk_bytes": nbytes, "shards": shard + 1,
            "total_s": total_s, "generator_s": gen_s, "encode_s": encode_s, "fsync_s": fsync_s,
            **rates(examples, nbytes, write_s, "arrayrecord"),
            **rates(examples, nbytes, encode_s + write_s, "raw"),
            **rates(examples, nbytes, encode_s + write_s + fsync_s, "raw_durable"),
            "peak_rss_MB": peak_rss_mb()}


def stage_write(out: pathlib.Path, num_clients: int, mean: int, seed: int) -> dict[str, Any]:
    """The clients through fedstream's DatasetWriter."""
    from fedstream.data.writer import DatasetWriter

    sizes = client_sizes(num_clients, mean, seed)
    params = {"clients": num_clients, "mean": mean, "sigma": SIGMA, "pool": POOL, "seed": seed}
    gen_s = 0.0
    t_start = time.perf_counter()
    with DatasetWriter(out, schema(), metadata={"recipe": "benchmark-larger-than-ram", "generator": params},
                       records_per_shard=RECORDS_PER_SHARD, compression="uncompressed") as writer:
        for i, n in enumerate(sizes.tolist()):
            t0 = time.perf_counter()
            ex = client_examples(seed, i, n)
            gen_s += time.perf_counter() - t0
            writer.add_client("train", f"c{i:06d}", ex)
    total_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    fsync_tree(out)
    fsync_s = time.perf_counter() - t0
    examples, nbytes = int(sizes.sum()), dir_bytes(out)
    meta = json.loads((out / "metadata.json").read_text())
    return {"clients": num_clients, "examples": examples, "disk_bytes": nbytes,
            "shards": len(meta["splits"]["train"]["shards"]), "total_s": total_s, "generator_s": gen_s,
            "fsync_s": fsync_s, **rates(examples, nbytes, total_s - gen_s, "writer"),
            **rates(examples, nbytes, total_s - gen_s + fsync_s, "writer_durable"),
            "peak_rss_MB": peak_rss_mb()}


def stage_train(path: pathlib.Path, rounds: int, cohort: int, spawn_time: float) -> dict[str, Any]:
    """Trains `rounds` rounds of the dense model on the dataset, as the train loop runs them."""
    t_proc = time.time()
    import jax

    from fedstream.algorithms.fedavg import FedAvg, make_optimizer
    from fedstream.data.cohort import ClientBatching, CohortPipeline, auto_data_threads
    from fedstream.data.reader import FederatedDataset
    from fedstream.models import get_model
    from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch

    import_s = time.time() - t_proc
    ds = FederatedDataset(path)
    model = get_model("mlp", SHAPE, NUM_CLASSES, hidden=(200, 200))
    algorithm = FedAvg(model, make_optimizer("sgd", 10**-1.5),
                       make_optimizer("adam", 10**-2.5, b1=0.9, b2=0.999, eps=1e-4))
    mesh = make_mesh()
    pipe = CohortPipeline(ds, "train", ("x", "y"), seed=0, cohort_size=cohort, batching=ClientBatching(20, 1),
                          num_devices=mesh.size, data_threads=auto_data_threads(0), chunk_bytes=0)
    round_fn = build_train_round(algorithm, mesh, seed=0)
    state = replicate(algorithm.init(jax.random.PRNGKey(0)), mesh)
    io0 = proc_io()
    setup_done = time.time()
    iterator = pipe.iterator(rounds)
    round_s, wait_s, steps, logical, rss = [], [], [], [], []
    disk = [io0.get("read_bytes", 0) / 1e6]
    first_done = None
    for r in range(rounds):
        t0 = time.perf_counter()
        element = next(iterator)
        t1 = time.perf_counter()
        state, stats = round_fn(state, shard_batch(element["batch"], mesh))
        jax.block_until_ready((state, stats))
        t2 = time.perf_counter()
        if first_done is None:
            first_done = time.time()
        round_s.append(t2 - t0)
        wait_s.append(t1 - t0)
        steps.append(int(element["num_steps"]))
        logical.append(int(pipe.sizes[pipe.cohort(r)].sum()) * RECORD_BYTES)
        with open("/proc/self/status") as f:
            rss.append(next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024)
        disk.append(proc_io().get("read_bytes", 0) / 1e6)
        del element
    iterator.close()
    io1 = proc_io()
    later = slice(1, None) if rounds > 1 else slice(None)
    return {
        "rounds": rounds, "clients_per_round": cohort, "dataset_clients": ds.num_clients("train"),
        "dataset_examples": int(pipe.sizes.sum()), "dataset_bytes": dir_bytes(path),
        "data_threads": pipe.data_threads, "devices": mesh.size, "compiles": round_fn._cache_size(),
        "process_start_to_first_round_s": first_done - spawn_time, "import_s": import_s,
        "spawn_to_setup_done_s": setup_done - spawn_time, "first_next_s": wait_s[0], "first_round_s": round_s[0],
        "median_round_s": statistics.median(round_s[later]),
        "data_wait_fraction": sum(wait_s[later]) / sum(round_s[later]),
        "median_steps_per_round": statistics.median(steps),
        "logical_read_MB_per_round": statistics.mean(logical) / 1e6,
        "disk_read_MB_per_round": (io1.get("read_bytes", 0) - io0.get("read_bytes", 0)) / 1e6 / rounds,
        "syscall_read_MB_per_round": (io1.get("rchar", 0) - io0.get("rchar", 0)) / 1e6 / rounds,
        "disk_read_MB_total": (io1.get("read_bytes", 0) - io0.get("read_bytes", 0)) / 1e6,
        "rss_MB_after_round": rss, "disk_read_MB_by_round": [b - a for a, b in zip(disk, disk[1:])],
        "round_s": round_s, "wait_s": wait_s, "steps": steps,
        "peak_rss_MB": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- driver


def run_stage(args: list[str]) -> dict[str, Any]:
    """Runs one stage in a fresh interpreter; returns its RESULT json (the spawn time is passed in)."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *args, "--spawn-time", repr(time.time())]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            print(line, flush=True)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"stage {args[:2]} failed with exit code {proc.returncode}")
    result["load_average"] = f"{load:.1f}->{os.getloadavg()[0]:.1f}"
    return result


def kv(record: dict[str, Any], keys: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    return " ".join(f"{k}={fmt(record[k])}" for k in keys if k in record)


def emit(record: dict[str, Any], keys: list[str], json_path: str | None) -> None:
    """Prints the key=value line of a stage and appends its JSON line (as soon as it is measured)."""
    print(kv(record, keys), flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(stamp(record)) + "\n")


def remove(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):  # a killed writer's temporary directory
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,large", help="comma-separated: small, large")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=500)
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_larger_than_ram"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the datasets (default: delete them at the end)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip raw and write when a finished dataset of the same parameters exists")
    parser.add_argument("--skip-raw", action="store_true", help="skip the bare ArrayRecordWriter stage")
    parser.add_argument("--no-evict", action="store_true", help="do not drop the dataset from the page cache")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds of 50 clients (< 2 min)")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    # internal: one stage in a subprocess
    parser.add_argument("--stage", choices=("raw", "write", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mean", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:
        path = pathlib.Path(args.path)
        if args.stage == "raw":
            result = stage_raw(path, args.clients, args.mean, args.seed)
        elif args.stage == "write":
            result = stage_write(path, args.clients, args.mean, args.seed)
        else:
            result = stage_train(path, args.rounds, args.clients_per_round, args.spawn_time)
        print("RESULT " + json.dumps(result), flush=True)
        return

    sizes_table = QUICK_SIZES if args.quick else SIZES
    if args.quick:
        args.rounds, args.clients_per_round = min(args.rounds, 3), min(args.clients_per_round, 50)
    names = args.sizes.split(",")
    if unknown := [n for n in names if n not in sizes_table]:
        parser.error(f"unknown size(s) {unknown}; choose from {list(sizes_table)}")
    root = pathlib.Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    ram = ram_bytes()
    start = time.perf_counter()
    print(f"{os.cpu_count()} CPU cores, RAM {ram / 2**30:.1f} GiB, free disk at {root}: "
          f"{shutil.disk_usage(root).free / 1e9:.1f} GB, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: list[dict[str, Any]] = []
    created: list[pathlib.Path] = []
    try:
        for name in names:
            clients, mean = sizes_table[name]
            expected = int(client_sizes(clients, mean, args.seed).sum())
            path, raw = root / f"emnist_{name}", root / f"raw_{name}"
            reuse = False
            if args.reuse and (path / "_SUCCESS").exists():
                meta = json.loads((path / "metadata.json").read_text())
                reuse = meta.get("generator", {}).get("clients") == clients and \
                    meta.get("generator", {}).get("seed") == args.seed
            if not reuse:
                remove(path)
                need = int(expected * (RECORD_BYTES + 80) * 1.02) + DISK_HEADROOM
                free = shutil.disk_usage(root).free
                if free < need:
                    raise SystemExit(f"size {name}: needs ~{need / 1e9:.1f} GB free at {root} (dataset "
                                     f"~{expected * RECORD_BYTES / 1e9:.1f} GB + headroom), only {free / 1e9:.1f} GB")
                print(f"size={name}: {clients} clients, {expected} examples, ~{expected * RECORD_BYTES / 1e9:.1f} GB "
                      f"of records (RAM {ram / 1e9:.1f} GB = {ram / 2**30:.1f} GiB)", flush=True)
                common = ["--clients", str(clients), "--mean", str(mean), "--seed", str(args.seed)]
                if not args.skip_raw:
                    created.append(raw)
                    r = run_stage(["--stage", "raw", "--path", str(raw), *common])
                    remove(raw)
                    r.update(stage="raw", size=name)
                    results.append(r)
                    emit(r, ["stage", "size", "clients", "examples", "disk_bytes", "shards", "generator_s",
                             "encode_s", "arrayrecord_s", "arrayrecord_examples_per_s", "arrayrecord_MB_per_s",
                             "raw_examples_per_s", "raw_MB_per_s", "fsync_s", "raw_durable_examples_per_s",
                             "raw_durable_MB_per_s", "peak_rss_MB", "load_average"], args.json)
                created.append(path)
                r = run_stage(["--stage", "write", "--path", str(path), *common])
                r.update(stage="write", size=name)
                results.append(r)
                emit(r, ["stage", "size", "clients", "examples", "disk_bytes", "shards", "total_s", "generator_s",
                         "writer_s", "writer_examples_per_s", "writer_MB_per_s", "fsync_s",
                         "writer_durable_examples_per_s", "writer_durable_MB_per_s", "peak_rss_MB", "load_average"],
                     args.json)
            else:
                created.append(path)
                print(f"size={name}: reusing {path}", flush=True)
            evicted = 0 if args.no_evict else evict_tree(path)
            r = run_stage(["--stage", "train", "--path", str(path), "--rounds", str(args.rounds),
                           "--clients-per-round", str(args.clients_per_round)])
            r.update(stage="train", size=name, evicted_bytes=evicted, ram_bytes=ram,
                     dataset_over_ram=r["dataset_bytes"] / ram)
            results.append(r)
            emit(r, ["stage", "size", "dataset_clients", "dataset_examples", "dataset_bytes", "dataset_over_ram",
                     "evicted_bytes", "rounds", "clients_per_round", "median_steps_per_round",
                     "process_start_to_first_round_s", "first_next_s", "first_round_s", "median_round_s",
                     "data_wait_fraction", "logical_read_MB_per_round", "disk_read_MB_per_round",
                     "disk_read_MB_total", "compiles", "peak_rss_MB", "load_average"], args.json)
    finally:
        for p in created:
            if p.name.startswith("raw_") or not args.keep:
                remove(p)
    trains = {r["size"]: r for r in results if r["stage"] == "train"}
    summary = {"stage": "summary", "total_s": time.perf_counter() - start, "cpu_cores": os.cpu_count(),
               "versions": {p: importlib.metadata.version(p) for p in ("fedstream", "jax", "grain", "array-record")},
               "ram_bytes": ram, "train_peak_rss_MB": {k: v["peak_rss_MB"] for k, v in trains.items()},
               "train_peak_rss_under_2GB": all(v["peak_rss_MB"] < 2048 for v in trains.values())}
    print(f"summary: total_s={summary['total_s']:.0f} train_peak_rss_MB="
          + ",".join(f"{k}:{v:.0f}" for k, v in summary["train_peak_rss_MB"].items())
          + f" under_2GB={summary['train_peak_rss_under_2GB']} kept={args.keep}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(stamp(summary)) + "\n")


if __name__ == "__main__":
    main()
