"""Client read throughput by ArrayRecord chunking (`group_size`): one record per chunk vs the writer's default.

Writes the same federated dataset twice (identical records, only `group_size`
differs) and times `FederatedDataset.get_client` (seek + sequential reads +
decode) over random clients, alternating between the two datasets in every
pass. Reports medians over passes of µs per example, and file sizes.

    python benchmarks/read_throughput.py                 # logistic (60 floats) and EMNIST-shaped records
    python benchmarks/read_throughput.py --passes 7 --clients 2000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from fedstream.data.format import FeatureSpec, Schema
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DatasetWriter, default_group_size

SHAPES: dict[str, Schema] = {
    "logistic_60": {"x": FeatureSpec("float32", (60,)), "y": FeatureSpec("int32", ())},
    "emnist_28x28": {"x": FeatureSpec("float32", (28, 28, 1)), "y": FeatureSpec("int32", ())},
}


def write(path: str, schema: Schema, sizes: np.ndarray, group_size: int, seed: int = 0) -> None:
    """A dataset of `len(sizes)` clients with random features (the same for every group size)."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, schema, group_size=group_size) as writer:
        for c, n in enumerate(sizes):
            data = {name: rng.standard_normal((int(n), *spec.shape)).astype(spec.dtype) if spec.dtype == "float32"
                    else rng.integers(0, 10, (int(n), *spec.shape)).astype(spec.dtype) for name, spec in schema.items()}
            writer.add_client("train", f"client_{c:06d}", data)


def time_reads(dataset: FederatedDataset, clients: np.ndarray) -> float:
    """µs per example of reading and decoding `clients`."""
    t0 = time.perf_counter()
    examples = 0
    for c in clients:
        examples += len(dataset.get_client("train", int(c))["y"])
    return 1e6 * (time.perf_counter() - t0) / max(examples, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=1000, help="clients read per pass")
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| records | group_size | µs per example (median) | ratio to group_size 1 | MB on disk |")
    print("|---|---|---|---|---|")
    for name, schema in SHAPES.items():
        sizes = np.clip(rng.lognormal(4.5, 1.0, args.num_clients), 1, 2000).astype(int)
        if name.startswith("emnist"):
            sizes = np.clip(sizes // 2, 1, 500)  # EMNIST-like: ~200 examples per writer
        with tempfile.TemporaryDirectory(prefix="fedstream_read_") as tmp:
            groups = (1, default_group_size(schema))
            datasets = {}
            for g in groups:
                write(f"{tmp}/g{g}", schema, sizes, g)
                datasets[g] = FederatedDataset(f"{tmp}/g{g}")
            times: dict[int, list[float]] = {g: [] for g in groups}
            for p in range(args.passes):
                clients = np.random.default_rng(p).choice(args.num_clients, args.clients, replace=False)
                for g in (groups if p % 2 == 0 else groups[::-1]):
                    times[g].append(time_reads(datasets[g], clients))
            for g in groups:
                mb = sum(f.stat().st_size for f in (datasets[g].path / "train").glob("*.array_record*")) / 1e6
                med = statistics.median(times[g])
                print(f"| {name} ({int(sizes.sum()):,} examples) | {g} | {med:.2f} | "
                      f"{med / statistics.median(times[1]):.2f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
