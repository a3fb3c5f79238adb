"""Round time of the standard federated setups (EMNIST, Shakespeare, Stack Overflow, CIFAR-100) on fake data.

Reproduce:

    python benchmarks/standard_setups.py                   # all four setups
    python benchmarks/standard_setups.py --quick           # a couple of small rounds each (a few minutes)
    python benchmarks/standard_setups.py --setups shakespeare,emnist --rounds 5
    python benchmarks/standard_setups.py --cohort cifar100=10 # the full CIFAR cohort instead of 2 clients
    python benchmarks/standard_setups.py --lstm-check --conv-check --setups none

Each setup is the pipeline of the same name in pipelines/ (model, batch size,
local epochs, client/server optimizers, per-client cap, augmentation),
trained by the library's own round (`CohortPipeline` -> `build_train_round`)
on a synthetic dataset of the right shapes and dtypes written with
`DatasetWriter` (cached under `<system temp dir>/fedstream_bench/standard_*`
and reused while its generator parameters match). Labels are random; only
the shapes and the client-size distribution matter for the time:

| setup | pipeline | clients | examples per client (log-normal: mean, sigma) | example |
|---|---|---|---|---|
| emnist | emnist_fedadam | 100 | 197.5, 0.6 (671,585 / 3,400 writers) | float32 28x28x1, 62 classes |
| shakespeare | shakespeare_fedavg | 200 | 60, 1.2 (assumed: ~3.6M chars / 80 / 715) | int32 [80], 90 ids |
| stackoverflow | stackoverflow_nwp_fedadam | 200 | 397, 1.0 (135.8M / 342,477), cap 1,000 | int32 [20], 10,004 ids |
| cifar100 | cifar100_resnet_fedadam | 50 | 100 each (as TFF's) | uint8 32x32x3, 100 classes |

What is timed: as the train loop runs a round, `next(iterator)` (Grain,
prefetched in background threads) + `shard_batch` + the jitted round +
`block_until_ready`, after compiling every stream length the timed rounds
use (all-padding batches) and one untimed warm-up round. Reported per setup:
median round time at the measured cohort, its steps, the median time per
local step, and the round time extrapolated to the pipeline's cohort as
(time per step) x (expected steps of a full round from the size
distribution). Large setups are measured at a smaller cohort by default
(Stack Overflow 10 of 50 clients, CIFAR-100 2 of 10): the extrapolation
assumes the round cost is linear in its steps, which holds on one device
where clients run one after another.

`--lstm-check` times a Shakespeare client step (batch 4 x 80) with the
library's LSTM (input projection hoisted out of a `lax.scan`) against
`nn.RNN(nn.OptimizedLSTMCell)`, both inside a `fori_loop` of SGD steps.
`--conv-check` times a ResNet-18 client step (batch 20) with
`conv_impl='patches'` (im2col) against `'xla'` (lax.conv).

Results (`python benchmarks/standard_setups.py --lstm-check`, 21 min): jax
0.10.2 on the project's shared 2-core CPU VM, **load average 6-7 from other
jobs during the run**, so every time here is several-fold what an idle
machine gives (the EMNIST CNN step is 91 ms here against ~16 ms in
round_efficiency.py's quieter run):

| setup | params | batch | timed cohort | steps | ms/step | round s | pipeline cohort: s/round | all rounds |
|---|---|---|---|---|---|---|---|---|
| emnist | 1,206,590 | 20 | 10 | 96 | 91 | 8.4 | 10: 8.9 | 1,500: 3.7 h |
| shakespeare | 820,522 | 4 | 10 | 157 | 162 | 25.0 | 10: 25.2 | 1,200: 8.4 h |
| stackoverflow | 4,050,748 | 16 | 10 | 262 | 363 | 92.0 | 50: 392 (extrapolated) | 1,500: 163 h |
| cifar100 | 11,227,812 | 20 | 2 | 10 | 2,646 | 26.5 | 10: 132 (extrapolated) | 4,000: 147 h |

LSTM check: 90 ms per Shakespeare step with the library's LSTM, 176 ms with
`nn.RNN(nn.OptimizedLSTMCell)`. ResNet conv: 2.25 s per step with im2col;
with lax.conv the compile plus three steps had not finished after ~10 min
(stopped), so 'auto' (im2col on CPU) stands for the ResNet too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedstream.algorithms.fedavg import FedAvg, make_optimizer
from fedstream.config import load_config
from fedstream.data.augment import get_augmentation
from fedstream.data.cohort import ClientBatching, CohortPipeline, auto_data_threads
from fedstream.data.format import FeatureSpec
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DatasetWriter
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch


@dataclasses.dataclass(frozen=True)
class Setup:
    """A standard setup: its pipeline and the synthetic data standing in for its dataset."""

    name: str
    pipeline: str
    num_clients: int
    mean_examples: float
    sigma: float  # log-normal sigma of the client sizes; 0 = every client has mean_examples
    x: FeatureSpec
    y: FeatureSpec
    num_classes: int
    measure_cohort: int  # clients per timed round (default run)
    quick_cohort: int
    rounds: int
    quick_rounds: int


SETUPS = {
    "emnist": Setup("emnist", "emnist_fedadam", 100, 197.5, 0.6, FeatureSpec("float32", (28, 28, 1)),
                    FeatureSpec("int32", ()), 62, 10, 10, 5, 2),
    "shakespeare": Setup("shakespeare", "shakespeare_fedavg", 200, 60.0, 1.2, FeatureSpec("int32", (80,)),
                         FeatureSpec("int32", (80,)), 90, 10, 5, 5, 2),
    "stackoverflow": Setup("stackoverflow", "stackoverflow_nwp_fedadam", 200, 397.0, 1.0,
                           FeatureSpec("int32", (20,)), FeatureSpec("int32", (20,)), 10_004, 10, 3, 3, 2),
    "cifar100": Setup("cifar100", "cifar100_resnet_fedadam", 50, 100.0, 0.0, FeatureSpec("uint8", (32, 32, 3)),
                      FeatureSpec("int32", ()), 100, 2, 1, 2, 1),
}


def client_sizes(setup: Setup) -> np.ndarray:
    """The written clients' example counts (seeded)."""
    rng = np.random.default_rng([0, setup.num_clients])
    if setup.sigma == 0:
        return np.full(setup.num_clients, int(setup.mean_examples))
    mu = np.log(setup.mean_examples) - setup.sigma ** 2 / 2
    return np.maximum(1, rng.lognormal(mu, setup.sigma, setup.num_clients).astype(int))


def dataset_dir(root: pathlib.Path, setup: Setup) -> pathlib.Path:
    """Writes the setup's synthetic dataset under `root` once; reuses it while its parameters match."""
    params = {"setup": setup.name, "clients": setup.num_clients, "mean": setup.mean_examples, "sigma": setup.sigma,
              "x": [setup.x.dtype, list(setup.x.shape)], "y": [setup.y.dtype, list(setup.y.shape)],
              "classes": setup.num_classes, "seed": 0}
    path = root / f"standard_{setup.name}"
    if (path / "_SUCCESS").exists() and FederatedDataset(path).metadata.get("generator") == params:
        return path
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    with DatasetWriter(path, {"x": setup.x, "y": setup.y}, metadata={"recipe": "benchmark", "generator": params},
                       records_per_shard=2048) as writer:
        for i, n in enumerate(client_sizes(setup)):
            n = int(n)
            if setup.x.dtype == "float32":
                x = rng.integers(0, 256, (n, *setup.x.shape), dtype=np.uint8).astype(np.float32) / 255.0
            elif setup.x.dtype == "uint8":
                x = rng.integers(0, 256, (n, *setup.x.shape), dtype=np.uint8)
            else:
                x = rng.integers(0, setup.num_classes, (n, *setup.x.shape)).astype(np.int32)
            y = rng.integers(0, setup.num_classes, (n, *setup.y.shape)).astype(np.int32)
            writer.add_client("train", f"c{i:05d}", {"x": x, "y": y})
    print(f"wrote {path} ({setup.num_clients} clients) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def algorithm_of(config: Any, input_shape: tuple[int, ...], input_dtype: str) -> FedAvg:
    """FedAvg/FedOpt with the pipeline's model and optimizers (as the train loop builds it for 'fedavg')."""
    model = get_model(config.model.name, input_shape, config.model.num_classes, input_dtype=input_dtype,
                      loss_mask_ids=tuple(config.model.loss_mask_ids),
                      accuracy_mask_ids=tuple(config.model.accuracy_mask_ids),
                      hidden=tuple(config.model.hidden), conv_impl=config.model.conv_impl,
                      **config.model.options.to_dict())
    client = make_optimizer(config.client.optimizer, config.client.learning_rate, momentum=config.client.momentum)
    server = make_optimizer(config.server.optimizer, config.server.learning_rate, momentum=config.server.momentum,
                            b1=config.server.b1, b2=config.server.b2, eps=config.server.eps)
    return FedAvg(model, client, server)


def time_setup(setup: Setup, root: pathlib.Path, cohort: int, rounds: int, threads: int) -> dict[str, Any]:
    """Median round time of `setup` at `cohort` clients per round, and its extrapolation to the pipeline's cohort."""
    config = load_config(setup.pipeline, "fedstream.pipelines")
    ds = FederatedDataset(dataset_dir(root, setup))
    algorithm = algorithm_of(config, setup.x.shape, setup.x.dtype)
    mesh = make_mesh()
    batching = ClientBatching(int(config.client.batch_size), int(config.client.epochs),
                              int(config.client.max_examples), int(config.client.max_steps))
    pipeline = CohortPipeline(ds, "train", ("x", "y"), seed=0, cohort_size=cohort, batching=batching,
                              num_devices=mesh.size, data_threads=auto_data_threads(threads),
                              augment=get_augmentation(str(config.data.augment)), chunk_bytes=0)
    round_fn = build_train_round(algorithm, mesh, seed=0)
    t0 = time.perf_counter()
    state = replicate(jax.jit(algorithm.init)(jax.random.PRNGKey(0)), mesh)
    init_s = time.perf_counter() - t0
    total = rounds + 1  # one untimed warm-up round

    t0 = time.perf_counter()
    shapes = pipeline.chunk_shapes(range(total))
    for shape in sorted(shapes):
        jax.block_until_ready(round_fn(state, shard_batch(pipeline.empty_chunk(shape), mesh)))
    compile_s = time.perf_counter() - t0

    iterator = pipeline.iterator(total)
    round_s, steps, per_step = [], [], []
    for r in range(total):
        t0 = time.perf_counter()
        element = next(iterator)
        state, stats = round_fn(state, shard_batch(element["batch"], mesh))
        jax.block_until_ready((state, stats))
        seconds = time.perf_counter() - t0
        if r == 0:
            continue
        round_s.append(seconds)
        steps.append(element["num_steps"])
        per_step.append(seconds / max(element["num_steps"], 1))
    iterator.close() if hasattr(iterator, "close") else None

    sizes = np.asarray(pipeline.sizes)
    mean_client_steps = float(np.mean([batching.num_steps(int(n)) for n in sizes]))
    full_cohort = int(config.clients_per_round)
    step_s = statistics.median(per_step)
    return {
        "setup": setup.name, "pipeline": setup.pipeline, "model": config.model.name,
        "params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(state.params))),
        "batch": batching.batch_size, "cohort_measured": cohort, "cohort_pipeline": full_cohort,
        "rounds_timed": rounds, "round_s_median": statistics.median(round_s), "round_s_all": round_s,
        "steps_median": statistics.median(steps), "step_s_median": step_s,
        "expected_steps_full_round": mean_client_steps * full_cohort,
        "round_s_full_cohort": step_s * mean_client_steps * full_cohort,
        "extrapolated": cohort != full_cohort, "compile_s": compile_s, "compiles": len(shapes), "init_s": init_s,
        "pipeline_rounds": int(config.num_rounds),
    }


def format_result(r: dict[str, Any]) -> str:
    full = r["round_s_full_cohort"]
    hours = full * r["pipeline_rounds"] / 3600
    how = "extrapolated" if r["extrapolated"] else "measured cohort = pipeline's"
    return (f"{r['setup']:13s} {r['model']} ({r['params']:,} params), batch {r['batch']}: "
            f"median round {r['round_s_median']:.2f} s at {r['cohort_measured']} clients "
            f"({r['steps_median']:.0f} steps, {1e3 * r['step_s_median']:.1f} ms/step); "
            f"{r['cohort_pipeline']} clients: {full:.1f} s/round ({how}, ~{r['expected_steps_full_round']:.0f} steps) "
            f"-> {r['pipeline_rounds']} rounds ~ {hours:.1f} h; compile {r['compile_s']:.0f} s for "
            f"{r['compiles']} stream lengths")


def _time_scan(loss: Callable[..., jax.Array], params: Any, batches: tuple[jax.Array, ...], repeats: int = 2
               ) -> tuple[float, float]:
    """(compile + first run, best per-step time) of SGD steps over `batches` in one jitted fori_loop."""
    steps = batches[0].shape[0]

    @jax.jit
    def run(params: Any, batches: tuple[jax.Array, ...]) -> Any:
        def body(i: jax.Array, p: Any) -> Any:
            g = jax.grad(loss)(p, *(b[i] for b in batches))
            return jax.tree.map(lambda a, b: a - 0.01 * b, p, g)

        return jax.lax.fori_loop(0, steps, body, params)

    t0 = time.perf_counter()
    jax.block_until_ready(run(params, batches))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, batches))
        best = min(best, time.perf_counter() - t0)
    return first, best / steps


def lstm_check(steps: int = 20) -> dict[str, float]:
    """Shakespeare client step (batch 4 x 80): the library's LSTM vs nn.RNN(nn.OptimizedLSTMCell)."""
    from flax import linen as nn

    from fedstream.models.text import LSTMLanguageModel

    class FlaxRNN(nn.Module):
        @nn.compact
        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = nn.Embed(90, 8)(tokens)
            for _ in range(2):
                x = nn.RNN(nn.OptimizedLSTMCell(256))(x)
            return nn.Dense(90)(x)

    tokens = jax.random.randint(jax.random.PRNGKey(0), (steps, 4, 80), 0, 90)
    out = {}
    for name, module in (("library_lstm", LSTMLanguageModel(90, 8, (256, 256))), ("nn_rnn_optimized_cell", FlaxRNN())):
        params = jax.jit(module.init)(jax.random.PRNGKey(0), tokens[0])

        def loss(p: Any, t: jax.Array, module: Any = module) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(module.apply(p, t), t).mean()

        first, step = _time_scan(loss, params, (tokens,))
        out[f"{name}_step_ms"] = 1e3 * step
        out[f"{name}_compile_s"] = first
    return out


def conv_check(steps: int = 2) -> dict[str, float]:
    """ResNet-18 (GroupNorm) client step, batch 20 of 32x32x3 uint8: im2col ('patches') vs lax.conv ('xla')."""
    x = jax.random.randint(jax.random.PRNGKey(1), (steps, 20, 32, 32, 3), 0, 256).astype(jnp.uint8)
    y = jax.random.randint(jax.random.PRNGKey(2), (steps, 20), 0, 100)
    out = {}
    for impl in ("patches", "xla"):
        model = get_model("resnet18_gn", (32, 32, 3), 100, input_dtype="uint8", conv_impl=impl)
        params = jax.jit(model.init)(jax.random.PRNGKey(0))

        def loss(p: Any, xb: jax.Array, yb: jax.Array, model: Any = model) -> jax.Array:
            logits = model.apply(p, xb, rng=jax.random.PRNGKey(0))
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        first, step = _time_scan(loss, params, (x, y), repeats=1)
        out[f"{impl}_step_s"] = step
        out[f"{impl}_compile_s"] = first
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {', '.join(SETUPS)} "
                        "(or 'none')")
    parser.add_argument("--quick", action="store_true", help="smaller cohorts and fewer rounds")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per setup (0 = the setup's default)")
    parser.add_argument("--cohort", action="append", default=[], metavar="SETUP=C",
                        help="clients per timed round for a setup (repeatable)")
    parser.add_argument("--data-threads", type=int, default=0, help="0 = auto, as the train loop")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"))
    parser.add_argument("--lstm-check", action="store_true")
    parser.add_argument("--conv-check", action="store_true")
    parser.add_argument("--json", default="", help="append one JSON line per result to this file")
    args = parser.parse_args()

    names = [] if args.setups == "none" else [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SETUPS))
    if unknown:
        parser.error(f"unknown setups {unknown}; known: {', '.join(SETUPS)}")
    cohorts = {}
    for item in args.cohort:
        name, _, value = item.partition("=")
        cohorts[name] = int(value)
    root = pathlib.Path(args.data_dir)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)", flush=True)
    results = []
    for name in names:
        setup = SETUPS[name]
        cohort = cohorts.get(name, setup.quick_cohort if args.quick else setup.measure_cohort)
        rounds = args.rounds or (setup.quick_rounds if args.quick else setup.rounds)
        t0 = time.perf_counter()
        result = time_setup(setup, root, cohort, rounds, args.data_threads)
        result["wall_s"] = time.perf_counter() - t0
        print(format_result(result), flush=True)
        results.append(result)
    if args.lstm_check:
        results.append({"check": "lstm", **lstm_check()})
        print(json.dumps(results[-1]), flush=True)
    if args.conv_check:
        results.append({"check": "resnet_conv", **conv_check()})
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
