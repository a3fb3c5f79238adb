"""Round efficiency: fedstream's round time against the in-memory `lax.scan` limit.

Reproduce (the full default run took about 10 minutes on a 2-core CPU VM,
plus a few minutes the first time to write the 2 GiB dataset):

    python benchmarks/round_efficiency.py                     # cnn and mlp, 10 and 50 clients/round
    python benchmarks/round_efficiency.py --models mlp --clients-per-round 50 --rounds 25
    python benchmarks/round_efficiency.py --conv-check        # only: lax.conv vs im2col inside lax.scan

Data: a federated-EMNIST-shaped synthetic dataset (3,400 clients, example
counts log-normal with mean ~200, 28x28x1 float32 pixels in [0, 1), 62
classes), written once with the real `DatasetWriter` into a cache directory
(default: `<system temp dir>/fedstream_bench/emnist_like`, `--data-dir` to
move it) and reused while its generator parameters match.

Workload: FedAdam as in FedJAX's EMNIST experiments: batch 20, 1 local epoch,
client SGD lr 10^-1.5, server Adam lr 10^-2.5 (b1 0.9, b2 0.999, eps 1e-4);
the EMNIST CNN (compute-bound) and the 2x200 dense model (overhead-bound).

Measured per (model, clients per round), all in one process, interleaved
round by round so that both sides see the same load on a shared machine:

* fedstream: wall time of one round of the train loop (page cache warm, as
  in a long run: the dataset fits in memory): `next(iterator)`
  (Grain: ArrayRecord reads, per-client shuffles, packing, prefetched in
  background threads while the previous round computes) + `shard_batch`
  (host -> device) + the jitted sharded round + waiting for its result.
  Every stream length the measured rounds use is compiled first (on
  all-padding batches, which run no step), then `--warmup-rounds` real rounds
  run untimed, then `--rounds` rounds are timed.
* limit: right after each timed round, once the pipeline's background
  threads are idle, the same SGD steps on the same batches (that round's
  real steps, i.e. the steps whose mask has any example, partial last
  batches masked the same way) with the data already on the device, as one
  jitted `lax.scan` of `FedAvg.client_step` on a single client state: no
  data pipeline, no client resets, no delta accumulation, no server update.
  Compiled ahead of time per round (step counts differ), then timed once.
* ratio = median(fedstream) / median(limit) (the result line's `ratio=`);
  `paired_ratio_median` is the median of the per-round ratios. Target:
  ratio <= 1.10 at 50 clients per round.

Breakdown (printed under each result line): `data_wait` (time inside
`next()` in the timed rounds: data not ready), `pipeline_serial` (producing
one round with no reader threads and a warm page cache, i.e. the data
pipeline's CPU cost per round), `transfer` (`shard_batch` alone),
`round_only` (the same jitted round on the already-placed batch, timed next
to the limit with no background threads). `round_only / limit` is the
compiled round's own overhead (client resets, delta accumulation, metrics,
server update); `fedstream / round_only` is what the data pipeline adds (its
exposed wait, the transfer, and the CPU it takes from XLA while prefetching).

Finally (unless `--no-conv-check`) the CNN client step inside `lax.scan` is
timed with `conv_impl='xla'` (lax.conv) and `'patches'` (im2col; the CPU
default), plus lax.conv in a Python loop of jitted steps, with the max
absolute difference of their outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedstream.algorithms.fedavg import FedAvg, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline, auto_data_threads
from fedstream.data.packed import unpack_clients
from fedstream.data.format import FeatureSpec
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DEFAULT_COMPRESSION, DatasetWriter
from fedstream.models import get_model
from fedstream.models.layers import resolve_conv_impl

from run_info import stamp  # benchmarks/ is first on sys.path when run as a script
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch

NUM_CLIENTS = 3400
MEAN_EXAMPLES = 200
SIGMA = 0.6  # log-normal sigma of the client sizes (std ~130 examples at mean 200)
NUM_CLASSES = 62
SHAPE = (28, 28, 1)
BATCH = 20
RECORDS_PER_SHARD = 4096
# Timed rounds per configuration when --rounds is 0: the dense model's rounds
# take ~0.05-0.3 s and vary by +-20% on a shared machine, so it gets more.
DEFAULT_ROUNDS = {"cnn": 7, "mlp": 25}


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dataset_dir(root: pathlib.Path, num_clients: int = NUM_CLIENTS, mean: int = MEAN_EXAMPLES) -> pathlib.Path:
    """Writes the EMNIST-shaped dataset under `root` once; reuses it while its parameters match.

    Client sizes are `max(1, int(lognormal(mu, SIGMA)))` with `mu` chosen so
    the log-normal mean is `mean` (default MEAN_EXAMPLES); pixels are uniform
    in [0, 1) on a 1/255 grid, labels uniform over the classes (nothing needs
    to be learnable). The default NUM_CLIENTS clients go to
    `root/emnist_like`; another `num_clients` (benchmarks/scaling.py) to
    `root/emnist_like_<num_clients>`, and another `mean`
    (benchmarks/flat_memory.py) to `root/emnist_like_<num_clients>_mean<mean>`.
    """
    params = {"clients": num_clients, "mean": mean, "sigma": SIGMA, "classes": NUM_CLASSES, "seed": 0,
              "compression": DEFAULT_COMPRESSION}
    name = "emnist_like" if num_clients == NUM_CLIENTS else f"emnist_like_{num_clients}"
    path = root / (name if mean == MEAN_EXAMPLES else f"emnist_like_{num_clients}_mean{mean}")
    if (path / "_SUCCESS").exists():
        existing = FederatedDataset(path)
        if existing.metadata.get("generator") == params:
            sizes = existing.client_sizes("train")
            print(f"reusing {path}: {len(sizes)} clients, {int(sizes.sum()):,} examples "
                  f"(mean {sizes.mean():.1f}), {_dir_bytes(path) / 2**30:.2f} GiB", flush=True)
            return path
    rng = np.random.default_rng(0)
    sizes = np.maximum(1, rng.lognormal(np.log(mean) - SIGMA**2 / 2, SIGMA, num_clients).astype(int))
    schema = {"x": FeatureSpec("float32", SHAPE), "y": FeatureSpec("int32", ())}
    t0 = time.perf_counter()
    with DatasetWriter(path, schema, metadata={"recipe": "benchmark", "generator": params},
                       records_per_shard=RECORDS_PER_SHARD) as writer:
        for i, n in enumerate(sizes):
            pixels = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8).astype(np.float32) / 255.0
            labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
            writer.add_client("train", f"c{i:05d}", {"x": pixels, "y": labels})
    print(f"wrote {len(sizes)} clients, {int(sizes.sum()):,} examples (mean {sizes.mean():.1f}), "
          f"{_dir_bytes(path) / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s to {path}", flush=True)
    return path


def make_algorithm(model_name: str, conv_impl: str = "auto") -> FedAvg:
    """FedAdam with the issue's settings for 'cnn' or 'mlp' (2x200)."""
    options: dict[str, Any] = {"hidden": (200, 200)} if model_name == "mlp" else {"conv_impl": conv_impl}
    model = get_model(model_name, SHAPE, NUM_CLASSES, **options)
    return FedAvg(model, make_optimizer("sgd", 10**-1.5),
                  make_optimizer("adam", 10**-2.5, b1=0.9, b2=0.999, eps=1e-4))


def build_limit(algorithm: FedAvg) -> Callable[[Any, dict[str, jax.Array]], Any]:
    """`limit(params, batches) -> params`: one jitted lax.scan of client steps over `[S, B, ...]` batches.

    One client state for all S steps; the dropout key of step i is
    `fold_in(PRNGKey(0), i)`.
    """

    @jax.jit
    def limit(params: Any, batches: dict[str, jax.Array]) -> Any:
        key = jax.random.PRNGKey(0)

        def step(state: Any, xs: tuple[jax.Array, dict[str, jax.Array]]) -> tuple[Any, None]:
            i, batch = xs
            state, _ = algorithm.client_step(state, batch, jax.random.fold_in(key, i))
            return state, None

        steps = jnp.arange(batches["mask"].shape[0])
        state, _ = jax.lax.scan(step, algorithm.client_init({"params": params}), (steps, batches))
        return state.params

    return limit


def real_steps(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The steps of a packed round that hold examples, gathered as one `[S, B, ...]` stream (bins flattened)."""
    clients = unpack_clients(batch, ("x", "y")).values()
    return {k: np.concatenate([c[k] for c in clients]) for k in ("x", "y", "mask")}


def round_shapes(pipeline: CohortPipeline, rounds: range) -> set[tuple[int, int, int]]:
    """Chunk shapes the given rounds will use (to compile them before timing)."""
    return pipeline.chunk_shapes(rounds)


def wait_until_idle(window_s: float = 0.1, busy_fraction: float = 0.1, max_wait_s: float = 30.0) -> float:
    """Sleeps until this process's background threads stop using CPU (the prefetcher is full); returns the wait.

    Idle means less than `busy_fraction` of one core used during two
    consecutive `window_s` windows.
    """
    t0 = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - t0 < max_wait_s:
        cpu = time.process_time()
        time.sleep(window_s)
        quiet = quiet + 1 if time.process_time() - cpu < busy_fraction * window_s else 0
    return time.perf_counter() - t0


def run(ds: FederatedDataset, model_name: str, cohort: int, rounds: int, warmup: int,
        threads: int) -> dict[str, Any]:
    """Times fedstream rounds as the train loop runs them and, after each, the limit on the same steps.

    Per timed round r: the fedstream round (while the background pipeline
    prepares the next rounds, as in training); then, once the pipeline's
    threads are idle, `shard_batch` alone, the jitted round alone on the
    already-placed batch, and the limit on r's real steps. Interleaving makes
    the pairs see the same machine load; waiting for idle threads keeps the
    limit free of data-pipeline contention, while each fedstream round still
    pays for producing one round in the background, as in steady-state
    training.
    """
    algorithm = make_algorithm(model_name)
    mesh = make_mesh()
    total = warmup + rounds

    def pipeline(data_threads: int) -> CohortPipeline:
        return CohortPipeline(ds, "train", ("x", "y"), seed=0, cohort_size=cohort,
                              batching=ClientBatching(BATCH, 1), num_devices=mesh.size,
                              data_threads=data_threads, chunk_bytes=0)

    pipe = pipeline(auto_data_threads(threads))
    round_fn = build_train_round(algorithm, mesh, seed=0)
    limit_fn = build_limit(algorithm)
    state = replicate(algorithm.init(jax.random.PRNGKey(0)), mesh)

    # Data pipeline alone, serial (no reader threads): its CPU cost per round.
    # The first pass only warms the page cache for these rounds' clients.
    for _ in range(2):
        serial_s = []
        serial_it = pipeline(0).iterator(total)
        for r in range(total):
            t0 = time.perf_counter()
            next(serial_it)
            if r >= warmup:
                serial_s.append(time.perf_counter() - t0)
        serial_it.close()

    # Compile every round shape we will run (an all-padding batch runs no step).
    t0 = time.perf_counter()
    for shape in sorted(round_shapes(pipe, range(total))):
        jax.block_until_ready(round_fn(state, shard_batch(pipe.empty_chunk(shape), mesh)))
    compile_s = time.perf_counter() - t0
    compiles = round_fn._cache_size()

    iterator = pipe.iterator(total)
    fed_s, wait_s, transfer_s, round_only_s, limit_s, steps, lengths = [], [], [], [], [], [], []
    for r in range(total):
        t0 = time.perf_counter()
        element = next(iterator)
        t1 = time.perf_counter()
        state, stats = round_fn(state, shard_batch(element["batch"], mesh))
        jax.block_until_ready((state, stats))
        t2 = time.perf_counter()
        if r < warmup:
            continue
        fed_s.append(t2 - t0)
        wait_s.append(t1 - t0)
        steps.append(element["num_steps"])
        lengths.append(element["stream_length"])

        params = jax.device_put(jax.device_get(state.params))  # one device, like the stream
        stream = jax.device_put(real_steps(element["batch"]))
        if stream["mask"].shape[0] != element["num_steps"]:
            raise RuntimeError("the real steps of the packed round do not match its num_steps")
        limit = limit_fn.lower(params, stream).compile()  # ahead of time: compile cost excluded
        wait_until_idle()
        t0 = time.perf_counter()
        placed = jax.block_until_ready(shard_batch(element["batch"], mesh))
        transfer_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(round_fn(state, placed))
        round_only_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(limit(params, stream))
        limit_s.append(time.perf_counter() - t0)
        del placed, stream, element
    iterator.close()
    if round_fn._cache_size() != compiles:
        raise RuntimeError("a timed round compiled a new shape; the warm-up missed a stream length")

    n_steps = statistics.median(steps)
    fed, lim = statistics.median(fed_s), statistics.median(limit_s)
    return {
        "model": model_name, "clients_per_round": cohort, "rounds": rounds, "warmup_rounds": warmup,
        "devices": mesh.size, "data_threads": pipe.data_threads, "steps_per_round": int(n_steps),
        "stream_lengths": sorted(set(lengths)),
        "fedstream_median_s": fed, "limit_median_s": lim, "ratio": fed / lim,
        "paired_ratio_median": statistics.median(f / l for f, l in zip(fed_s, limit_s)),
        "fedstream_ms_per_step": 1e3 * fed / n_steps, "limit_ms_per_step": 1e3 * lim / n_steps,
        "fedstream_s": fed_s, "limit_s": limit_s, "round_only_s": round_only_s, "steps": steps,
        "data_wait_median_s": statistics.median(wait_s), "pipeline_serial_median_s": statistics.median(serial_s),
        "transfer_median_s": statistics.median(transfer_s), "round_only_median_s": statistics.median(round_only_s),
        "round_only_ratio": statistics.median(round_only_s) / lim, "compiles": compiles, "compile_s": compile_s,
    }


def format_result(r: dict[str, Any]) -> str:
    """The result line (one per model and cohort size) and its breakdown line."""
    main = (f"model={r['model']} clients_per_round={r['clients_per_round']} rounds={r['rounds']} "
            f"steps/round={r['steps_per_round']} fedstream_median_s={r['fedstream_median_s']:.3f} "
            f"limit_median_s={r['limit_median_s']:.3f} ratio={r['ratio']:.3f} "
            f"fedstream_ms/step={r['fedstream_ms_per_step']:.2f} limit_ms/step={r['limit_ms_per_step']:.2f} "
            f"compiles={r['compiles']}")
    detail = (f"  breakdown: data_wait_s={r['data_wait_median_s']:.3f} "
              f"pipeline_serial_s={r['pipeline_serial_median_s']:.3f} transfer_s={r['transfer_median_s']:.3f} "
              f"round_only_s={r['round_only_median_s']:.3f} round_only/limit={r['round_only_ratio']:.3f} "
              f"paired_ratio_median={r['paired_ratio_median']:.3f} "
              f"data_threads={r['data_threads']} stream_lengths={r['stream_lengths']} "
              f"compile_s={r['compile_s']:.1f}")
    return main + "\n" + detail


def _time_calls(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of `fn` (already compiled), blocking on each result."""
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / calls


def conv_check(xla_steps: int = 3, patch_steps: int = 20) -> dict[str, float]:
    """CNN client step (batch 20) inside lax.scan with conv_impl 'xla' vs 'patches', and max output difference.

    Also times lax.conv in a Python loop of single jitted steps (not in a
    scan), which is the case XLA:CPU handles well.
    """
    rng = np.random.default_rng(0)
    steps = max(xla_steps, patch_steps)
    batches = {"x": jnp.asarray(rng.random((steps, BATCH, *SHAPE), np.float32)),
               "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (steps, BATCH)).astype(np.int32)),
               "mask": jnp.ones((steps, BATCH), bool)}
    algorithms = {impl: make_algorithm("cnn", conv_impl=impl) for impl in ("patches", "xla")}
    params = algorithms["patches"].model.init(jax.random.PRNGKey(0))  # same layout for both impls
    out: dict[str, float] = {}
    trained = {}
    for impl, n in (("patches", patch_steps), ("xla", xla_steps)):
        limit = build_limit(algorithms[impl])
        sub = jax.tree.map(lambda a: a[:n], batches)
        compiled = limit.lower(params, sub).compile()
        out[f"{impl}_scan_ms"] = 1e3 * _time_calls(lambda: compiled(params, sub), 1) / n
        # Same `xla_steps` batches for both, to compare the trained params.
        trained[impl] = limit(params, jax.tree.map(lambda a: a[:xla_steps], batches))
        print(f"conv_impl={impl} in lax.scan: {out[f'{impl}_scan_ms']:.1f} ms/step "
              f"(CNN client step, batch {BATCH}, {n} steps)", flush=True)

    xla = algorithms["xla"]
    one_step = jax.jit(lambda s, b, k: xla.client_step(s, b, k)[0])
    client = xla.client_init({"params": params})
    first = jax.tree.map(lambda a: a[0], batches)
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(one_step(client, first, key))
    out["xla_python_loop_ms"] = 1e3 * _time_calls(lambda: one_step(client, first, key), 10)
    print(f"conv_impl=xla, Python loop of jitted steps: {out['xla_python_loop_ms']:.1f} ms/step", flush=True)

    x = batches["x"][0]
    logits = {impl: jax.jit(a.model.apply)(params, x) for impl, a in algorithms.items()}
    out["max_abs_logit_diff"] = float(jnp.abs(logits["patches"] - logits["xla"]).max())
    out["max_abs_param_diff"] = max(float(jnp.abs(a - b).max()) for a, b in
                                    zip(jax.tree.leaves(trained["patches"]), jax.tree.leaves(trained["xla"])))
    out["xla_over_patches"] = out["xla_scan_ms"] / out["patches_scan_ms"]
    print(f"xla/patches in lax.scan: {out['xla_over_patches']:.1f}x; max |logits(patches) - logits(xla)| = "
          f"{out['max_abs_logit_diff']:.1e}; max |params| difference after {xla_steps} scanned steps = "
          f"{out['max_abs_param_diff']:.1e}; conv_impl='auto' resolves to {resolve_conv_impl('auto')!r} "
          f"on {jax.default_backend()}", flush=True)
    return out


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn, mlp")
    parser.add_argument("--clients-per-round", default="10,50", help="comma-separated cohort sizes")
    parser.add_argument("--rounds", type=int, default=0,
                        help=f"timed rounds per configuration; 0 = {DEFAULT_ROUNDS} (more for the cheap model)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed real rounds before timing")
    parser.add_argument("--data-threads", type=int, default=0,
                        help="reader threads; 0 = auto, as the train loop (a quarter of the cores, at least 1)")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"),
                        help="cache directory of the synthetic dataset")
    parser.add_argument("--conv-check", action="store_true", help="only compare the two convolutions")
    parser.add_argument("--no-conv-check", action="store_true", help="skip the convolution comparison")
    parser.add_argument("--json", help="also append the results as JSON lines to this file")
    args = parser.parse_args()
    models = args.models.split(",")
    if unknown := [m for m in models if m not in DEFAULT_ROUNDS]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT_ROUNDS)}")
    cohorts = [int(c) for c in args.clients_per_round.split(",")]
    start = time.perf_counter()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: list[dict[str, Any]] = []
    if not args.conv_check:
        ds = FederatedDataset(dataset_dir(pathlib.Path(args.data_dir)))
        for model_name in models:
            for cohort in cohorts:
                rounds = args.rounds or DEFAULT_ROUNDS[model_name]
                r = run(ds, model_name, cohort, rounds, args.warmup_rounds, args.data_threads)
                results.append(r)
                print(format_result(r), flush=True)
    if not args.no_conv_check:
        results.append({"conv_check": conv_check()})
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(stamp(r)) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
