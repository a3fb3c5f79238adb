"""Preprocessing throughput of the `stackoverflow` recipe on a synthetic file in TFF's `.sqlite.lzma` layout.

    python benchmarks/text_preprocess_throughput.py             # 20,000 users, 1,000,000 sentences
    python benchmarks/text_preprocess_throughput.py --quick     # 500 users, 25,000 sentences (seconds)
    python benchmarks/text_preprocess_throughput.py --workdir /big/disk --keep --json results.jsonl

The companion of preprocess_throughput.py (EMNIST), for the text path:

1. Generates `stackoverflow.sqlite.lzma` as TFF lays it out (tables `examples`
   and `client_metadata`, TFF's indexes, one serialized tf.train.Example per
   sentence with all six upstream features: `tokens`, `title`, `tags`,
   `type`, `creation_date`, `score`), split `train`, numeric user ids,
   log-normal sentences per user (sigma 1.0: heavy-tailed), Zipf(1.15) words
   over 200,000 word types (so ~10% of tokens fall outside the top 10,000),
   1 + Poisson(13) words per sentence; and the matching
   `stackoverflow.word_count.tar.bz2` (words by decreasing count).
2. Times, separately: LZMA decompression alone; reading + parsing the plain
   SQLite file (`TFFSqlite.clients(split, {"tokens": ()})`); tokenizing and
   encoding the parsed sentences (`text.encode_sentences`); and the whole
   `run_preprocess("stackoverflow", ...)` (vocabulary, decompress, parse,
   encode, write ArrayRecord shards + sha256), which is what users wait for.
   Wall and CPU (process) time are both reported: on a shared machine the
   examples per CPU-second are the comparable number.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import pathlib
import shutil
import sqlite3
import sys
import tarfile
import tempfile
import time
import warnings

import numpy as np

from fedstream.data import text, tff
from fedstream.data.preprocessing import run_preprocess

WORD_TYPES = 200_000
ZIPF_EXPONENT = 1.15  # ~10% of tokens outside the 10,000 most frequent words


def user_sizes(rng: np.random.Generator, users: int, total: int) -> np.ndarray:
    """Log-normal sentences per user (sigma 1.0), each >= 1, summing exactly to `total`."""
    raw = rng.lognormal(0.0, 1.0, users)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * total)).astype(np.int64)
    diff = total - int(sizes.sum())
    sizes[np.argmax(sizes)] += diff  # the rounding remainder goes to the largest user
    assert sizes.min() >= 1 and sizes.sum() == total
    return sizes


def generate(work: pathlib.Path, users: int, sentences: int, seed: int = 0) -> dict[str, float]:
    """Writes `stackoverflow.sqlite.lzma` and `stackoverflow.word_count.tar.bz2` into `work`; returns timings."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(WORD_TYPES)])
    sizes = user_sizes(rng, users, sentences)
    lengths = 1 + rng.poisson(13, sentences)
    zipf = np.arange(1, WORD_TYPES + 1, dtype=np.float64) ** -ZIPF_EXPONENT
    tokens_all = np.searchsorted(np.cumsum(zipf / zipf.sum()), rng.random(int(lengths.sum())))
    tokens_all = np.minimum(tokens_all, WORD_TYPES - 1)
    counts = np.bincount(tokens_all, minlength=WORD_TYPES)
    plain = work / "stackoverflow.sqlite"
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
    ends = np.cumsum(lengths)
    sentence = 0
    for user, n in enumerate(sizes):
        client_id = f"{user * 7919 % 10_000_000:08d}"
        rows = []
        for _ in range(int(n)):
            stop = int(ends[sentence])
            tokens = " ".join(words[tokens_all[stop - int(lengths[sentence]): stop]].tolist())
            rows.append(("train", client_id, tff.serialize_example({
                "tokens": tokens, "title": "how do i sort a list of dicts by a value", "tags": "python|list|sorting",
                "type": "answer" if sentence % 3 else "question", "creation_date": "2014-03-02 11:22:33.456 UTC",
                "score": np.int64(sentence % 17)})))
            sentence += 1
        con.executemany("INSERT INTO examples VALUES (?, ?, ?)", rows)
        con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, "train", int(n)))
    con.commit()
    times["rows_s"] = time.perf_counter() - start
    t = time.perf_counter()
    con.execute("CREATE INDEX examples_client_id ON examples (client_id)")
    con.execute("CREATE INDEX examples_split_client_id ON examples (split_name, client_id)")
    con.commit()
    con.close()
    times["index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with open(plain, "rb") as src, lzma.open(work / "stackoverflow.sqlite.lzma", "wb", format=lzma.FORMAT_ALONE,
                                               preset=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    times["compress_s"] = time.perf_counter() - t
    times["sqlite_bytes"] = plain.stat().st_size
    times["lzma_bytes"] = (work / "stackoverflow.sqlite.lzma").stat().st_size
    plain.unlink()
    order = np.argsort(-counts, kind="stable")
    body = "".join(f"{words[i]} {counts[i]}\n" for i in order if counts[i]).encode()
    with tarfile.open(work / "stackoverflow.word_count.tar.bz2", "w:bz2") as tar:
        info = tarfile.TarInfo("stackoverflow.word_count")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    top = set(order[:text.STACKOVERFLOW_VOCAB_SIZE].tolist())
    times["oov_token_fraction"] = float(1 - counts[list(top)].sum() / counts.sum())
    times["generate_total_s"] = time.perf_counter() - start
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 users x 50 sentences")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--sentences", type=int, default=1_000_000)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fedstream_bench_text"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated input (reused by the next run with the same sizes) and the output")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args(argv)
    users, sentences = (500, 25_000) if args.quick else (args.users, args.sentences)

    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source, words = work / "stackoverflow.sqlite.lzma", work / "stackoverflow.word_count.tar.bz2"
    output = work / "stackoverflow_out"
    params = work / "params.json"
    wanted = {"users": users, "sentences": sentences, "version": 1}
    if (source.exists() and words.exists() and params.exists()
            and json.loads(params.read_text()).get("params") == wanted):
        gen = json.loads(params.read_text())["generated"]
        print(f"reusing {source} ({users:,} users, {sentences:,} sentences; --keep of an earlier run)", flush=True)
    else:
        print(f"generating {source}: {users:,} users, {sentences:,} sentences", flush=True)
        params.unlink(missing_ok=True)
        gen = generate(work, users, sentences)
        params.write_text(json.dumps({"params": wanted, "generated": gen}))
    print(f"  {gen['sqlite_bytes'] / 1e6:,.0f} MB SQLite -> {gen['lzma_bytes'] / 1e6:,.0f} MB lzma; "
          f"{100 * gen['oov_token_fraction']:.1f}% of tokens outside the top 10,000 words", flush=True)
    results: dict[str, float | int | str] = {"users": users, "sentences": sentences, **gen}

    plain = work / "decompressed.sqlite"
    t, c = time.perf_counter(), time.process_time()
    tff.decompress_lzma(source, plain)
    results["decompress_s"], results["decompress_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    parsed: list[list[bytes]] = []
    with tff.open_sqlite(plain) as db:
        for _, data in db.clients("train", {"tokens": ()}):
            parsed.append(data["tokens"])
    results["parse_s"], results["parse_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    plain.unlink()
    assert sum(map(len, parsed)) == sentences
    with tarfile.open(words) as tar, io.TextIOWrapper(tar.extractfile("stackoverflow.word_count")) as lines:
        vocab = text.word_vocabulary(text.parse_word_counts(lines, limit=text.STACKOVERFLOW_VOCAB_SIZE))
    table = text.WordTable(vocab)
    t, c = time.perf_counter(), time.process_time()
    for client in parsed:
        text.encode_sentences([s.decode("utf-8") for s in client], table, vocab)
    results["encode_s"], results["encode_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    del parsed
    for phase, label in (("decompress", "decompress only"), ("parse", "read + parse only"),
                         ("encode", "decode + tokenize + encode only")):
        wall, cpu = results[f"{phase}_s"], results[f"{phase}_cpu_s"]
        print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU ({sentences / wall:,.0f} sentences/s wall, "
              f"{sentences / cpu:,.0f} per CPU-second)", flush=True)

    shutil.rmtree(output, ignore_errors=True)
    overrides = [f"source={source}", f"word_counts={words}", f"cache_dir={work}", "splits=train",
                 "check_counts=False"]
    t, c = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic sizes are not TFF's published counts
        run_preprocess("stackoverflow", output, overrides, progress=print)
    results["preprocess_s"], results["preprocess_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    results["preprocess_examples_per_s"] = sentences / results["preprocess_s"]
    results["preprocess_examples_per_cpu_s"] = sentences / results["preprocess_cpu_s"]
    results["output_bytes"] = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    results["load_average_1min"] = os.getloadavg()[0]
    print(f"fedstream preprocess stackoverflow: {results['preprocess_s']:.1f} s for {sentences:,} sentences = "
          f"{results['preprocess_examples_per_s']:,.0f} examples/s wall ({results['preprocess_cpu_s']:.1f} s CPU: "
          f"{results['preprocess_examples_per_cpu_s']:,.0f} per CPU-second; incl. decompression; output "
          f"{results['output_bytes'] / 1e6:,.0f} MB; load average {results['load_average_1min']:.1f} on "
          f"{os.cpu_count()} CPUs)", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(results) + "\n")
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
        source.unlink(missing_ok=True)
        words.unlink(missing_ok=True)
        params.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
