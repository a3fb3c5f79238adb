"""Round efficiency: fedstream's round time against the in-memory `lax.scan` limit.

    python benchmarks/round_efficiency.py                     # both models, 10 and 50 clients/round
    python benchmarks/round_efficiency.py --models mlp --clients-per-round 50 --rounds 6
    python benchmarks/round_efficiency.py --conv-check        # lax.conv vs im2col inside lax.scan

Data: a federated-EMNIST-shaped synthetic dataset (3,400 clients, example
counts log-normal with mean ~200, 28x28x1 float32 pixels, 62 classes),
written once through the real `DatasetWriter` into a cache directory.

fedstream round time: wall time per round of the train loop's work, i.e.
`next(iterator)` (Grain: ArrayRecord reads, shuffling, packing, prefetched in
threads while the previous round computes) + device transfer + the jitted
sharded round + waiting for its result. Round shapes are compiled before
timing (one call per stream length on an all-padding batch).

Limit: the same number of SGD steps on the same batches (the round's real
steps, partial last batches masked the same way), with the data already on
the device, as one jitted `lax.scan` of the client step on a single model:
no data pipeline, no client resets, no aggregation, no server update.

Batch 20, 1 local epoch, client SGD lr 10^-1.5, server Adam lr 10^-2.5
(b1 0.9, b2 0.999, eps 1e-4), as in FedJAX's EMNIST FedAdam experiments.
Medians over the timed rounds; ratio = fedstream median / limit median.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedstream.algorithms.fedavg import ClientState, FedAvg, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline, bucket_steps, empty_round_batch, pack_clients
from fedstream.data.format import FeatureSpec
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DEFAULT_COMPRESSION, DatasetWriter
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch

NUM_CLIENTS = 3400
MEAN_EXAMPLES = 200
SIGMA = 0.6
NUM_CLASSES = 62
SHAPE = (28, 28, 1)
BATCH = 20


def dataset_dir(root: pathlib.Path) -> pathlib.Path:
    """Writes the EMNIST-shaped dataset once (reused while its parameters match)."""
    params = {"clients": NUM_CLIENTS, "mean": MEAN_EXAMPLES, "sigma": SIGMA, "classes": NUM_CLASSES, "seed": 0,
              "compression": DEFAULT_COMPRESSION}
    path = root / "emnist_like"
    if (path / "_SUCCESS").exists() and FederatedDataset(path).metadata.get("generator") == params:
        return path
    rng = np.random.default_rng(0)
    sizes = np.maximum(1, rng.lognormal(np.log(MEAN_EXAMPLES) - SIGMA**2 / 2, SIGMA, NUM_CLIENTS).astype(int))
    schema = {"x": FeatureSpec("float32", SHAPE), "y": FeatureSpec("int32", ())}
    t0 = time.perf_counter()
    with DatasetWriter(path, schema, metadata={"recipe": "benchmark", "generator": params}) as writer:
        for i, n in enumerate(sizes):
            pixels = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8).astype(np.float32) / 255.0
            writer.add_client("train", f"c{i:05d}", {"x": pixels, "y": rng.integers(0, NUM_CLASSES, n)})
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"wrote {sizes.sum():,} examples ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s to {path}")
    return path


def make_algorithm(model_name: str, conv_impl: str = "auto") -> FedAvg:
    options = {"hidden": (200, 200)} if model_name == "mlp" else {"conv_impl": conv_impl}
    model = get_model(model_name, SHAPE, NUM_CLASSES, **options)
    return FedAvg(model, make_optimizer("sgd", 10**-1.5),
                  make_optimizer("adam", 10**-2.5, b1=0.9, b2=0.999, eps=1e-4))


def build_limit(algorithm: FedAvg):
    """One jitted lax.scan of client steps over in-memory batches."""

    @jax.jit
    def limit(params: Any, batches: dict[str, jax.Array]) -> Any:
        key = jax.random.PRNGKey(0)

        def step(state, xs):
            i, batch = xs
            state, _ = algorithm.client_step(state, batch, jax.random.fold_in(key, i))
            return state, None

        steps = jnp.arange(batches["mask"].shape[0])
        state, _ = jax.lax.scan(step, algorithm.client_init(params), (steps, batches))
        return state.params

    return limit


def real_steps(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The steps of a packed round that hold examples, as one `[S, B, ...]` stream."""
    keep = batch["mask"].any(-1)
    return {k: batch[k][keep] for k in ("x", "y", "mask")}


def stream_lengths(pipeline: CohortPipeline, rounds: range) -> set[int]:
    """Bucketed stream lengths the given rounds will use (to compile them before timing)."""
    lengths = set()
    for r in rounds:
        steps = [pipeline.batching.num_steps(int(pipeline.sizes[c])) for c in pipeline.cohort(r)]
        lengths.add(bucket_steps(int(pack_clients(steps, pipeline.num_devices)[2].max())))
    return lengths


def run(ds: FederatedDataset, model_name: str, cohort: int, rounds: int, threads: int) -> dict[str, Any]:
    algorithm = make_algorithm(model_name)
    mesh = make_mesh()
    pipeline = CohortPipeline(ds, "train", ("x", "y"), seed=0, cohort_size=cohort, batching=ClientBatching(BATCH),
                              num_devices=mesh.size, data_threads=threads)
    round_fn = build_train_round(algorithm, mesh, seed=0)
    state = replicate(algorithm.init(jax.random.PRNGKey(0)), mesh)

    t0 = time.perf_counter()
    for length in sorted(stream_lengths(pipeline, range(rounds))):  # compile every shape we will time
        dummy = empty_round_batch(ds.schema, ("x", "y"), BATCH, mesh.size, length, cohort)
        jax.block_until_ready(round_fn(state, shard_batch(dummy, mesh)))
    compile_s = time.perf_counter() - t0
    compiles = round_fn._cache_size()

    iterator = pipeline.iterator(rounds)
    fed_times, data_waits, streams, steps = [], [], [], []
    time.sleep(1.0)  # let the prefetch threads fill the first round, as after a round of compute
    for _ in range(rounds):
        t0 = time.perf_counter()
        element = next(iterator)
        t1 = time.perf_counter()
        state, stats = round_fn(state, shard_batch(element["batch"], mesh))
        jax.block_until_ready((state, stats))
        fed_times.append(time.perf_counter() - t0)
        data_waits.append(t1 - t0)
        streams.append(real_steps(element["batch"]))
        steps.append(element["num_steps"])
    iterator.close()
    assert round_fn._cache_size() == compiles, "a timed round compiled a new shape"

    limit_fn = build_limit(algorithm)
    params = jax.device_get(state.params)
    limit_times = []
    for stream in streams:
        on_device = jax.device_put(stream)
        jax.block_until_ready(limit_fn(params, on_device))  # compile (excluded)
        t0 = time.perf_counter()
        jax.block_until_ready(limit_fn(params, on_device))
        limit_times.append(time.perf_counter() - t0)
    fed, lim = statistics.median(fed_times), statistics.median(limit_times)
    return {"model": model_name, "clients_per_round": cohort, "rounds": rounds, "devices": mesh.size,
            "steps_per_round": int(statistics.median(steps)), "fedstream_median_s": fed, "limit_median_s": lim,
            "ratio": fed / lim, "data_wait_median_s": statistics.median(data_waits),
            "fedstream_ms_per_step": 1e3 * fed / statistics.median(steps),
            "limit_ms_per_step": 1e3 * lim / statistics.median(steps), "compiles": compiles,
            "compile_s": compile_s}


def conv_check(steps: int = 3) -> None:
    """Per-step time of the CNN client step inside lax.scan: lax.conv vs im2col (patches + dot)."""
    rng = np.random.default_rng(0)
    batches = {"x": jnp.asarray(rng.random((steps, BATCH, *SHAPE), np.float32)),
               "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (steps, BATCH)).astype(np.int32)),
               "mask": jnp.ones((steps, BATCH), bool)}
    results = {}
    for impl in ("patches", "xla"):
        algorithm = make_algorithm("cnn", conv_impl=impl)
        params = algorithm.model.init(jax.random.PRNGKey(0))
        limit = build_limit(algorithm)
        jax.block_until_ready(limit(params, batches))
        t0 = time.perf_counter()
        results[impl] = jax.block_until_ready(limit(params, batches))
        per_step = (time.perf_counter() - t0) / steps
        print(f"conv_impl={impl:8s} scanned CNN client step: {1e3 * per_step:.1f} ms/step (batch {BATCH})")
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results["patches"]),
                                                           jax.tree.leaves(results["xla"])))
    print(f"max |params(patches) - params(xla)| after {steps} steps: {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--clients-per-round", default="10,50")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--data-threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"))
    parser.add_argument("--conv-check", action="store_true", help="only compare the two convolutions")
    parser.add_argument("--json", help="also append the results as JSON lines to this file")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    if args.conv_check:
        conv_check()
        return
    ds = FederatedDataset(dataset_dir(pathlib.Path(args.data_dir)))
    for model_name in args.models.split(","):
        for cohort in (int(c) for c in args.clients_per_round.split(",")):
            r = run(ds, model_name, cohort, args.rounds, args.data_threads)
            print(f"model={r['model']} clients_per_round={cohort} rounds={r['rounds']} "
                  f"steps/round={r['steps_per_round']} fedstream_median_s={r['fedstream_median_s']:.3f} "
                  f"limit_median_s={r['limit_median_s']:.3f} ratio={r['ratio']:.3f} "
                  f"data_wait_median_s={r['data_wait_median_s']:.3f} compiles={r['compiles']}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
