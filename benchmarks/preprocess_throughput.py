"""Preprocessing throughput of the `emnist` recipe on a synthetic file in TFF's `.sqlite.lzma` layout.

    python benchmarks/preprocess_throughput.py            # EMNIST-sized: 3,400 clients, 671,585 + 77,483 examples
    python benchmarks/preprocess_throughput.py --quick    # 200 clients x ~50 examples (a few seconds)
    python benchmarks/preprocess_throughput.py --workdir /big/disk --keep --json results.jsonl

1. Generates `emnist_all.sqlite.lzma` exactly as TFF lays it out (tables
   `examples` and `client_metadata`, indexes, one serialized tf.train.Example
   with `pixels` (784 floats) and `label` (int64) per row), split `all_train`
   and `all_test`, writer-like ids `f0000_00`, log-normal client sizes
   (sigma 0.6) scaled so the full size matches TFF's counts exactly.
   Pixels look like FEMNIST's: 1.0 background, ~20% ink pixels k/255.
2. Times, separately: LZMA decompression alone; reading + parsing the plain
   SQLite file (`TFFSqlite.clients`, no writing); and the whole
   `run_preprocess("emnist", ...)` (decompress + parse + validate + write
   ArrayRecord shards + sha256), which is what users wait for.

Needs about 7 GB of free disk in --workdir for the full size (the SQLite file
is ~2.3 GB, its decompressed temporary copy as much, the output ~2.1 GB).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import pathlib
import shutil
import sqlite3
import sys
import tempfile
import time

import numpy as np

from fedstream.data import tff
from fedstream.data.preprocessing import run_preprocess

FULL = {"clients": 3400, "train": 671_585, "test": 77_483}


def client_sizes(rng: np.random.Generator, clients: int, total: int, minimum: int = 1) -> np.ndarray:
    """Log-normal sizes (sigma 0.6) scaled to sum exactly to `total`, each >= minimum."""
    raw = rng.lognormal(0.0, 0.6, clients)
    sizes = np.maximum(minimum, np.floor(raw / raw.sum() * total)).astype(np.int64)
    diff = total - int(sizes.sum())
    order = np.argsort(-sizes)
    i = 0
    while diff != 0:  # spread the rounding remainder over the largest clients
        j = order[i % clients]
        step = 1 if diff > 0 else -1
        if sizes[j] + step >= minimum:
            sizes[j] += step
            diff -= step
        i += 1
    return sizes


def femnist_like_pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    ink = rng.random((n, 28, 28)) < 0.2
    values = np.ones((n, 28, 28), np.float32)
    values[ink] = rng.integers(0, 255, int(ink.sum())).astype(np.float32) / np.float32(255.0)
    return values


def generate(path: pathlib.Path, clients: int, totals: dict[str, int], seed: int = 0,
             preset: int = 1) -> dict[str, float]:
    """Writes the synthetic `emnist_all.sqlite.lzma`; returns the seconds of each phase and the sizes."""
    rng = np.random.default_rng(seed)
    ids = [f"f{i // 100:04d}_{i % 100:02d}" for i in range(clients)]
    sizes = {split: client_sizes(rng, clients, total) for split, total in totals.items()}
    plain = path.with_suffix("")  # emnist_all.sqlite
    plain.unlink(missing_ok=True)
    times: dict[str, float] = {}
    start = time.perf_counter()
    con = sqlite3.connect(plain)
    con.execute("PRAGMA journal_mode = OFF")
    con.execute("PRAGMA synchronous = OFF")
    con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                "serialized_example_proto BLOB NOT NULL)")
    con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                "num_examples INTEGER NOT NULL)")
    serialize_s = 0.0
    for split in totals:
        upstream = f"all_{split}"
        for client_id, n in zip(ids, sizes[split]):
            pixels = femnist_like_pixels(rng, int(n))
            labels = rng.integers(0, 62, int(n))
            t = time.perf_counter()
            rows = [(upstream, client_id, tff.serialize_example({"pixels": pixels[i], "label": labels[i]}))
                    for i in range(int(n))]
            serialize_s += time.perf_counter() - t
            con.executemany("INSERT INTO examples VALUES (?, ?, ?)", rows)
            con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, upstream, int(n)))
    con.commit()
    times["rows_s"] = time.perf_counter() - start
    times["serialize_s"] = serialize_s
    t = time.perf_counter()
    con.execute("CREATE INDEX examples_client_id ON examples (client_id)")
    con.execute("CREATE INDEX examples_split_client_id ON examples (split_name, client_id)")
    con.commit()
    con.close()
    times["index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with open(plain, "rb") as src, lzma.open(path, "wb", format=lzma.FORMAT_ALONE, preset=preset) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    times["compress_s"] = time.perf_counter() - t
    times["sqlite_bytes"] = plain.stat().st_size
    times["lzma_bytes"] = path.stat().st_size
    plain.unlink()
    times["generate_total_s"] = time.perf_counter() - start
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 clients x ~50 examples")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fedstream_bench_preprocess"))
    parser.add_argument("--keep", action="store_true", help="keep the generated input and the output")
    parser.add_argument("--preset", type=int, default=1, help="LZMA preset of the generated file (default 1)")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args(argv)

    if args.quick:
        clients, totals = 200, {"train": 9_000, "test": 1_000}
    else:
        clients, totals = FULL["clients"], {"train": FULL["train"], "test": FULL["test"]}
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "emnist_all.sqlite.lzma"
    output = work / "emnist_out"
    examples = sum(totals.values())
    print(f"generating {source}: {clients:,} clients, {examples:,} examples", flush=True)
    gen = generate(source, clients, totals, preset=args.preset)
    print(f"  {gen['generate_total_s']:.1f} s: rows {gen['rows_s']:.1f} s (of which serializing "
          f"{gen['serialize_s']:.1f} s), indexes {gen['index_s']:.1f} s, lzma -{args.preset} "
          f"{gen['compress_s']:.1f} s; {gen['sqlite_bytes'] / 1e6:,.0f} MB SQLite -> "
          f"{gen['lzma_bytes'] / 1e6:,.0f} MB", flush=True)

    results: dict[str, float | int | str] = {"clients": clients, "examples": examples, **gen}
    # 1. Decompression alone, then 2. reading + parsing the plain file (no writing).
    plain = work / "decompressed.sqlite"
    t = time.perf_counter()
    tff.decompress_lzma(source, plain)
    results["decompress_s"] = time.perf_counter() - t
    t = time.perf_counter()
    parsed = 0
    with tff.open_sqlite(plain) as db:
        for split in ("all_train", "all_test"):
            for _, data in db.clients(split, {"pixels": (28, 28), "label": ()}):
                parsed += len(data["label"])
    results["parse_s"] = time.perf_counter() - t
    plain.unlink()
    assert parsed == examples, (parsed, examples)
    print(f"decompress only: {results['decompress_s']:.1f} s; read + parse only: {results['parse_s']:.1f} s "
          f"({examples / results['parse_s']:,.0f} examples/s)", flush=True)

    # 3. The whole recipe, as `fedstream preprocess emnist --source ...` runs it.
    shutil.rmtree(output, ignore_errors=True)
    overrides = [f"source={source}", f"cache_dir={work}"]
    if args.quick:
        overrides.append("check_counts=False")  # the full size matches TFF's counts exactly; --quick does not
    t = time.perf_counter()
    run_preprocess("emnist", output, overrides, progress=print)
    results["preprocess_s"] = time.perf_counter() - t
    results["preprocess_examples_per_s"] = examples / results["preprocess_s"]
    results["output_bytes"] = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    print(f"fedstream preprocess emnist: {results['preprocess_s']:.1f} s for {examples:,} examples = "
          f"{results['preprocess_examples_per_s']:,.0f} examples/s (incl. decompression; output "
          f"{results['output_bytes'] / 1e6:,.0f} MB)", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(results) + "\n")
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
        source.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
