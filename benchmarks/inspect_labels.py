"""Cost of `fedstream inspect`'s label summary and `--digest` on a large synthetic dataset.

Writes one split of `--clients` clients (sizes ~ 1 + Poisson(`--mean` - 1),
labels Dirichlet(0.3)-skewed over 10 classes, `x` float32 of `--dim` values)
and times, each once:

- the label counts of every client through the sequential pass
  (`label_counts`, what `inspect` does),
- the same through one `get_client` per client (the per-client route),
- the label counts of a 1,000-client sample (`--label-sample 1000`),
- `content_digest` of the split,
- the whole `describe_dataset` (labels and digest).

    python benchmarks/inspect_labels.py                           # 100,000 clients, ~1M examples
    python benchmarks/inspect_labels.py --clients 3400 --mean 100 --dim 784   # EMNIST-sized
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any, Callable

import numpy as np

from fedstream.data.format import FeatureSpec
from fedstream.data.inspect import describe_dataset, label_counts
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DatasetWriter


def write(path: str, clients: int, mean: float, dim: int, seed: int = 0) -> int:
    """The synthetic dataset; returns its number of examples."""
    rng = np.random.default_rng(seed)
    schema = {"x": FeatureSpec("float32", (dim,)), "y": FeatureSpec("int32", ())}
    sizes = 1 + rng.poisson(mean - 1, clients)
    with DatasetWriter(path, schema) as writer:
        for c, n in enumerate(sizes):
            p = rng.dirichlet(np.full(10, 0.3))
            writer.add_client("train", f"client_{c:06d}", {
                "x": rng.standard_normal((int(n), dim), dtype=np.float32),
                "y": rng.choice(10, int(n), p=p).astype(np.int32)})
    return int(sizes.sum())


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()` and the seconds it took."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--mean", type=float, default=10.0, help="mean examples per client")
    parser.add_argument("--dim", type=int, default=64, help="floats per example besides the label")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ds"
        examples, seconds = timed(lambda: write(path, args.clients, args.mean, args.dim))
        ds = FederatedDataset(path)
        size = sum(sh["bytes"] for sh in ds.metadata["splits"]["train"]["shards"])
        print(f"{args.clients:,} clients, {examples:,} examples, {size / 2**20:,.0f} MiB of shards "
              f"(written in {seconds:.1f} s)")
        counts, t_seq = timed(lambda: label_counts(ds, "train", "y"))
        print(f"labels, sequential pass:  {t_seq:6.2f} s  ({examples / t_seq:,.0f} ex/s, "
              f"{size / 2**20 / t_seq:,.0f} MiB/s); skew {counts.skew().mean():.3f}, IID {counts.iid_skew().mean():.3f}")
        fresh = FederatedDataset(path)
        _, t_client = timed(lambda: [fresh.get_client("train", i)["y"] for i in range(fresh.num_clients("train"))])
        print(f"labels, get_client each:  {t_client:6.2f} s  ({examples / t_client:,.0f} ex/s)")
        _, t_sample = timed(lambda: label_counts(FederatedDataset(path), "train", "y", max_clients=1000))
        print(f"labels, 1,000 sampled:    {t_sample:6.2f} s")
        _, t_digest = timed(lambda: FederatedDataset(path).content_digest("train"))
        print(f"content digest:           {t_digest:6.2f} s  ({size / 2**20 / t_digest:,.0f} MiB/s)")
        _, t_all = timed(lambda: describe_dataset(path, labels=True, digest=True))
        print(f"describe_dataset (labels=True, digest): {t_all:.2f} s")


if __name__ == "__main__":
    main()
