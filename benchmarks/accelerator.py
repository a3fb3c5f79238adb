"""Accelerator table: EMNIST CNN and Stack Overflow LSTM rounds, lanes 1 vs auto, against the device's peak.

    python benchmarks/accelerator.py                  # the full table (meant for a GPU/TPU: <= 5 minutes)
    python benchmarks/accelerator.py --quick          # CPU-sized: 10 clients per round, 2 timed rounds
    python benchmarks/accelerator.py --lanes-cpu      # only: dense 2x200, 8 and 32 lanes vs 1 lane
    python benchmarks/accelerator.py --json FILE      # also append the results as stamped JSON lines

Data are synthetic and held in memory (no download, nothing written):

* EMNIST-shaped: 28x28x1 float32 pixels in [0, 1), 62 classes, client sizes
  log-normal with mean 200 (sigma 0.6, as benchmarks/round_efficiency.py);
  the EMNIST CNN (`get_model('cnn', (28, 28, 1), 62)`, conv_impl 'auto'),
  batch 20, 1 epoch.
* Stack-Overflow-shaped: sentences of 20 int32 word ids out of 10,004 (inputs
  and next-word targets), client sizes log-normal with mean 150 (sigma 1.0)
  capped at 256 sentences per round, batch 16, 1 epoch: the setup of
  pipelines/stackoverflow_nwp_fedadam.py with its model `stackoverflow_lstm`
  (embed 96, LSTM 670, dense 96, 10,004 logits; 4.05M parameters). The sizes
  are ours, not the real dataset's.

Both train with FedAdam (client SGD, server Adam). Per model, clients per
round (10, 50, 500) and lanes (1, `resolve_lanes('auto', ...)`, and on CPU
an explicit 8 so that a lanes comparison exists), each round runs as one call
(`chunk_bytes=0`). Every chunk shape the timed rounds use is compiled first
(`CohortPipeline.chunk_shapes` / `empty_chunk`, all-padding, no step runs),
then `--warmup-rounds` rounds run untimed, then `--rounds` rounds are timed:
the jitted round alone on a batch already on the device (the data pipeline
and the host-to-device copy are left out: this is the device's side). The
lane configurations of one (model, clients per round) are interleaved round
by round, so they see the same machine load.

Reported per configuration (medians over the timed rounds):

* `ms/step`: round time / the round's real client steps (steps of clients
  that train; lockstep padding of lanes counts as time, not as steps).
* `idle`: the lockstep padding, idle (device, lane)-steps / step slots run.
* `GFLOP/step`: XLA's cost analysis of one jitted client step
  (`jit(client_step).lower(...).compile().cost_analysis()['flops']`),
  forward, backward and the SGD update, batch as above. XLA counts a loop
  body once whatever its trip count, so the LSTM is analysed with its 20-step
  time scan fully unrolled (`unroll=20`; the same arithmetic).
* `achieved`: GFLOP/step x real steps / round time, in TFLOP/s, and its
  fraction of the device's published peak (`PEAKS`, matched on
  `jax.devices()[0].device_kind`): FP32 and, where the chip has one, the
  dense tensor-core rate JAX uses by default for float32 matmuls and
  convolutions (TF32 on A100/H100/L4, bf16 passes on TPU; see the JAX
  "Matmul precision" guide). On CPU: "peak unknown".
* `kernels/step`: compute ops of one compiled client step after XLA's fusion
  on this backend (`count_kernels`): on a GPU roughly the kernels launched
  per step; on CPU only a proxy (XLA:CPU fuses differently).

`--lanes-cpu` times the dense 2x200 model (batch 20, EMNIST-shaped, 64
clients per round) with 1, 8 and 32 lanes on the same clients, interleaved
round by round, once with the log-normal client sizes and once with equal
sizes (200 examples each: no lockstep padding), and prints the speed of
each against 1 lane (time with 1 lane / time with L lanes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedstream.algorithms.fedavg import FedAvg, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline, auto_data_threads
from fedstream.data.format import FeatureSpec
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, resolve_lanes, shard_batch

from run_info import stamp  # benchmarks/ is first on sys.path when run as a script


# ----------------------------------------------------------------------------- published peaks


@dataclasses.dataclass(frozen=True)
class Peak:
    """Published dense peak rates of one chip, in TFLOP/s.

    Attributes:
      name: the chip as the table prints it.
      fp32: non-tensor FP32 (None where the maker publishes none, e.g. TPUs).
      tensor: the dense matrix rate JAX's default precision reaches on float32
        inputs (TF32 on Ampere and later NVIDIA chips, bf16 on TPU); None
        where float32 matmuls run at the FP32 rate (V100, T4).
      source: the document the numbers come from.
    """

    name: str
    fp32: float | None
    tensor: float | None
    source: str


# Matched in order on `device_kind` (case-insensitive substrings): the more specific pattern first.
# Tensor-core figures in NVIDIA's datasheets are quoted "with sparsity"; the dense rate used here is half.
PEAKS: tuple[tuple[str, Peak], ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe FP32 51 TFLOPS, TF32 756 TFLOPS with sparsity.
    ("h100 pcie", Peak("NVIDIA H100 PCIe", 51.0, 378.0, "NVIDIA H100 Tensor Core GPU datasheet")),
    # Same datasheet: H100 SXM FP32 67 TFLOPS, TF32 989 TFLOPS with sparsity (device_kind 'NVIDIA H100 80GB HBM3').
    ("h100", Peak("NVIDIA H100 SXM", 67.0, 494.5, "NVIDIA H100 Tensor Core GPU datasheet")),
    # NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5 TFLOPS, TF32 156 TFLOPS (312 with sparsity), SXM and PCIe.
    ("a100", Peak("NVIDIA A100", 19.5, 156.0, "NVIDIA A100 Tensor Core GPU datasheet")),
    # NVIDIA V100 Tensor Core GPU datasheet: FP32 15.7 TFLOPS (SXM2; PCIe 14). No TF32: float32 dots run at FP32.
    ("v100", Peak("NVIDIA V100 SXM2", 15.7, None, "NVIDIA V100 Tensor Core GPU datasheet")),
    # NVIDIA T4 datasheet: FP32 8.1 TFLOPS. No TF32.
    ("t4", Peak("NVIDIA T4", 8.1, None, "NVIDIA T4 Tensor Core GPU datasheet")),
    # NVIDIA L4 datasheet: FP32 30.3 TFLOPS, TF32 120 TFLOPS with sparsity.
    ("l4", Peak("NVIDIA L4", 30.3, 60.0, "NVIDIA L4 Tensor Core GPU datasheet")),
    # Google Cloud TPU documentation, "TPU v5e": peak compute per chip 197 TFLOPs (bf16).
    ("v5 lite", Peak("TPU v5e", None, 197.0, "Cloud TPU documentation, TPU v5e")),
    ("v5e", Peak("TPU v5e", None, 197.0, "Cloud TPU documentation, TPU v5e")),
    # Google Cloud TPU documentation, "TPU v4": peak compute per chip 275 teraflops (bf16 or int8).
    ("v4", Peak("TPU v4", None, 275.0, "Cloud TPU documentation, TPU v4")),
)


def peak_for(device_kind: str) -> Peak | None:
    """The published peak of the chip named `device_kind` (`jax.Device.device_kind`), or None if not in `PEAKS`."""
    kind = device_kind.lower()
    if "tpu" not in kind and "nvidia" not in kind and "tesla" not in kind:
        return None  # a CPU's kind (e.g. 'cpu') must not match a GPU pattern such as 't4'
    for pattern, peak in PEAKS:
        if pattern in kind:
            return peak
    return None


def achieved_flops(flops_per_step: float, steps: int, seconds: float) -> float:
    """FLOP/s of `steps` steps of `flops_per_step` each done in `seconds` (0.0 when no time passed)."""
    return flops_per_step * steps / seconds if seconds > 0 else 0.0


# ----------------------------------------------------------------------------- counting a step

# Instructions that launch no work of their own (bookkeeping, aliasing, or calls whose bodies are counted).
_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "call", "while", "conditional",
              "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")


def count_kernels(hlo_text: str) -> dict[str, int]:
    """Compute ops in the ENTRY computation of an optimized HLO module's text (`compiled.as_text()`).

    Every instruction of ENTRY other than bookkeeping (`_NO_KERNEL`) counts
    as one kernel: fusions, custom-calls (cuBLAS/cuDNN on GPU), unfused dots
    and convolutions, copies, ... On XLA:GPU each of these is (at least) one
    kernel launch; loops (`while`) are counted apart, as `loops`, since their
    bodies run a number of times the text does not give.
    """
    counts = {"kernels": 0, "fusions": 0, "custom_calls": 0, "loops": 0}
    in_entry = False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            in_entry = True
            continue
        if in_entry and line.startswith("}"):
            break
        if not in_entry:
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        op = match.group(1)
        if op == "while" or (op == "call" and "while" in line):
            counts["loops"] += 1
        if op in _NO_KERNEL:
            continue
        counts["kernels"] += 1
        counts["fusions"] += op == "fusion"
        counts["custom_calls"] += op == "custom-call"
    return counts


# ----------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model with its synthetic data and batching."""

    name: str
    model: str
    input_shape: tuple[int, ...]
    input_dtype: str
    label_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    mean_examples: float
    sigma: float
    max_examples: int
    options: Mapping[str, Any]
    client_lr: float
    server_lr: float


WORKLOADS = {
    "cnn": Workload("emnist_cnn", "cnn", (28, 28, 1), "float32", (), 62, 20, 200, 0.6, 0, {"conv_impl": "auto"},
                    10**-1.5, 10**-2.5),
    "lstm": Workload("stackoverflow_lstm", "stackoverflow_lstm", (20,), "int32", (20,), 10_004, 16, 150, 1.0, 256, {},
                     10**-0.5, 1e-2),
    "mlp": Workload("dense_2x200", "mlp", (28, 28, 1), "float32", (), 62, 20, 200, 0.6, 0, {"hidden": (200, 200)},
                    10**-1.5, 10**-2.5),
}


class SyntheticSource:
    """Clients of one split generated on demand from (seed, client): nothing stored, nothing read.

    Has what `CohortPipeline` needs (`schema`, `client_sizes`, `get_client`).
    """

    def __init__(self, workload: Workload, num_clients: int, seed: int = 0, equal_sizes: int = 0) -> None:
        self.workload = workload
        self.seed = seed
        self.schema = {"x": FeatureSpec(workload.input_dtype, workload.input_shape),
                       "y": FeatureSpec("int32", workload.label_shape)}
        rng = np.random.default_rng(seed)
        mu = np.log(workload.mean_examples) - workload.sigma**2 / 2
        sizes = np.maximum(1, rng.lognormal(mu, workload.sigma, num_clients).astype(np.int64))
        self._sizes = np.full(num_clients, equal_sizes, np.int64) if equal_sizes else sizes

    def client_sizes(self, split: str) -> np.ndarray:
        return self._sizes

    def get_client(self, split: str, client: int) -> dict[str, np.ndarray]:
        w, n = self.workload, int(self._sizes[client])
        rng = np.random.default_rng([self.seed, int(client)])
        if w.input_dtype == "int32":  # word ids; targets are the inputs shifted by one
            words = rng.integers(1, w.num_classes, (n, w.input_shape[0] + 1), dtype=np.int32)
            return {"x": words[:, :-1], "y": words[:, 1:]}
        x = rng.random((n, *w.input_shape), dtype=np.float32)
        return {"x": x, "y": rng.integers(0, w.num_classes, n, dtype=np.int32)}


def make_algorithm(workload: Workload, **model_options: Any) -> FedAvg:
    """FedAdam on `workload`'s model (`model_options` override its factory options)."""
    model = get_model(workload.model, workload.input_shape, workload.num_classes, input_dtype=workload.input_dtype,
                      **{**workload.options, **model_options})
    return FedAvg(model, make_optimizer("sgd", workload.client_lr),
                  make_optimizer("adam", workload.server_lr, b1=0.9, b2=0.999, eps=1e-4))


def param_bytes(algorithm: FedAvg) -> int:
    """Bytes of the model's parameters (what `resolve_lanes` sizes lanes by)."""
    shapes = jax.eval_shape(algorithm.model.init, jax.random.PRNGKey(0))
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def step_analysis(workload: Workload, lanes: int = 1) -> dict[str, Any]:
    """FLOPs (XLA cost analysis) and kernels (`count_kernels`) of one client step, `lanes` clients vmapped.

    The LSTM's time scan is unrolled for the count (XLA's cost analysis
    counts a loop body once); the kernel count is of the program as it is
    trained (scan not unrolled), with the scan's loop reported in `loops`.
    """
    out: dict[str, Any] = {"lanes": lanes}
    for purpose, options in (("flops", {"unroll": workload.input_shape[0]} if workload.model == "stackoverflow_lstm"
                                        else {}), ("kernels", {})):
        algorithm = make_algorithm(workload, **options)
        model = algorithm.model
        client = jax.eval_shape(lambda: algorithm.client_init({"params": model.init(jax.random.PRNGKey(0))}))
        batch = {"x": jax.ShapeDtypeStruct((workload.batch_size, *workload.input_shape), jnp.dtype(workload.input_dtype)),
                 "y": jax.ShapeDtypeStruct((workload.batch_size, *workload.label_shape), jnp.int32),
                 "mask": jax.ShapeDtypeStruct((workload.batch_size,), jnp.bool_)}
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)

        def step(c: Any, b: Any, k: Any) -> Any:
            return algorithm.client_step(c, b, k)[0]

        if lanes > 1:
            step = jax.vmap(step)
            client, batch, key = jax.tree.map(lambda s: jax.ShapeDtypeStruct((lanes, *s.shape), s.dtype),
                                              (client, batch, key))
        compiled = jax.jit(step).lower(client, batch, key).compile()
        if purpose == "flops":
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            out["flops_per_step"] = float(cost["flops"]) / lanes  # per client step
        else:
            out.update(count_kernels(compiled.as_text()))
    return out


# ----------------------------------------------------------------------------- timing rounds


def time_rounds(workload: Workload, cohort: int, lanes_list: Sequence[int], rounds: int, warmup: int,
                num_clients: int = 0, equal_sizes: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Times rounds of `workload` at `cohort` clients per round for each lane count, interleaved round by round.

    Returns one dict per lane count: per timed round the seconds, real steps
    and idle fraction, plus the compile time and number of shapes.
    """
    mesh = make_mesh()
    source = SyntheticSource(workload, num_clients or max(2 * cohort, 100), seed, equal_sizes)
    algorithm = make_algorithm(workload)
    total = warmup + rounds
    runs = []
    for lanes in lanes_list:
        pipeline = CohortPipeline(source, "train", ("x", "y"), seed=seed, cohort_size=cohort,
                                  batching=ClientBatching(workload.batch_size, 1, workload.max_examples),
                                  num_devices=mesh.size, data_threads=auto_data_threads(0), lanes=lanes,
                                  chunk_bytes=0)
        round_fn = build_train_round(algorithm, mesh, seed=seed, lanes=lanes)
        state = replicate(algorithm.init(jax.random.PRNGKey(seed)), mesh)
        t0 = time.perf_counter()
        shapes = sorted(pipeline.chunk_shapes(range(total)))
        for shape in shapes:
            jax.block_until_ready(round_fn(state, shard_batch(pipeline.empty_chunk(shape), mesh)))
        runs.append({"lanes": lanes, "round_fn": round_fn, "state": state, "iterator": pipeline.iterator(total),
                     "compile_s": time.perf_counter() - t0, "shapes": len(shapes),
                     "seconds": [], "steps": [], "idle": []})
    for r in range(total):
        for run in runs:
            element = next(run["iterator"])
            placed = jax.block_until_ready(shard_batch(element["batch"], mesh))
            t0 = time.perf_counter()
            run["state"], stats = run["round_fn"](run["state"], placed)
            jax.block_until_ready((run["state"], stats))
            seconds = time.perf_counter() - t0
            if r >= warmup:
                run["seconds"].append(seconds)
                run["steps"].append(int(element["num_steps"]))
                run["idle"].append(float(element["padding_waste"]))
            del placed, element
    results = []
    for run in runs:
        run["iterator"].close()
        results.append({k: run[k] for k in ("lanes", "compile_s", "shapes", "seconds", "steps", "idle")})
    return results


def summarize(workload: Workload, cohort: int, run: Mapping[str, Any], analysis: Mapping[str, Any],
              peak: Peak | None, auto_lanes: int) -> dict[str, Any]:
    """One table row: medians over the timed rounds, achieved FLOP/s and its fractions of the peaks."""
    per_round_ms = [1e3 * s / n for s, n in zip(run["seconds"], run["steps"])]
    flops = [achieved_flops(analysis["flops_per_step"], n, s) for s, n in zip(run["seconds"], run["steps"])]
    achieved = statistics.median(flops)
    row = {"model": workload.name, "clients_per_round": cohort, "lanes": run["lanes"],
           "lanes_is_auto": run["lanes"] == auto_lanes, "rounds": len(run["seconds"]),
           "round_median_s": statistics.median(run["seconds"]), "steps_median": statistics.median(run["steps"]),
           "ms_per_step": statistics.median(per_round_ms), "idle_median": statistics.median(run["idle"]),
           "gflop_per_step": analysis["flops_per_step"] / 1e9, "achieved_tflops": achieved / 1e12,
           "kernels_per_step": analysis["kernels"], "loops_per_step": analysis["loops"],
           "compile_s": run["compile_s"], "shapes": run["shapes"], "seconds": run["seconds"], "steps": run["steps"],
           "peak": dataclasses.asdict(peak) if peak else None}
    for key in ("fp32", "tensor"):
        value = getattr(peak, key) if peak else None
        row[f"fraction_of_{key}_peak"] = achieved / (value * 1e12) if value else None
    return row


def format_row(row: Mapping[str, Any]) -> str:
    """A table line of `summarize`'s row."""
    def frac(v: float | None) -> str:
        return f"{100 * v:.2f}%" if v is not None else "-"

    lanes = f"{row['lanes']}{' (auto)' if row['lanes_is_auto'] else ''}"
    return (f"| {row['model']} | {row['clients_per_round']} | {lanes} | {row['rounds']} | {row['steps_median']:,.0f} | "
            f"{row['round_median_s']:.3f} | {row['ms_per_step']:.3f} | {100 * row['idle_median']:.1f}% | "
            f"{row['gflop_per_step']:.3f} | {row['kernels_per_step']} | {row['achieved_tflops']:.4f} | "
            f"{frac(row['fraction_of_fp32_peak'])} | {frac(row['fraction_of_tensor_peak'])} |")


TABLE_HEADER = ("| model | clients/round | lanes | rounds | steps/round | round s | ms/step | idle | GFLOP/step | "
                "kernels/step | achieved TFLOP/s | of FP32 peak | of tensor peak |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def lanes_cpu(rounds: int, warmup: int, cohort: int = 64, lanes_list: Sequence[int] = (1, 8, 32)) -> list[dict[str, Any]]:
    """Dense 2x200 at batch 20: speed of L lanes against 1 lane on the same clients (log-normal and equal sizes)."""
    workload = WORKLOADS["mlp"]
    out = []
    for sizes, equal in (("lognormal", 0), ("equal_200", 200)):
        runs = time_rounds(workload, cohort, lanes_list, rounds, warmup, num_clients=4 * cohort, equal_sizes=equal)
        base = statistics.median(runs[0]["seconds"])
        for run in runs:
            median = statistics.median(run["seconds"])
            paired = statistics.median(b / s for b, s in zip(runs[0]["seconds"], run["seconds"]))
            row = {"lanes_cpu": True, "model": workload.name, "sizes": sizes, "clients_per_round": cohort,
                   "lanes": run["lanes"], "rounds": len(run["seconds"]), "round_median_s": median,
                   "speed_vs_1_lane": base / median, "paired_speed_median": paired,
                   "idle_median": statistics.median(run["idle"]), "steps_median": statistics.median(run["steps"]),
                   "seconds": run["seconds"]}
            out.append(row)
            print(f"lanes-cpu sizes={sizes} clients={cohort} lanes={run['lanes']} rounds={row['rounds']} "
                  f"steps/round={row['steps_median']:.0f} round_median_s={median:.3f} "
                  f"speed_vs_1_lane={row['speed_vs_1_lane']:.2f} paired={paired:.2f} "
                  f"idle={100 * row['idle_median']:.1f}%", flush=True)
    return out


def main(argv: Iterable[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,lstm", help="comma-separated: cnn, lstm")
    parser.add_argument("--clients-per-round", default="10,50,500", help="comma-separated cohort sizes")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds after compiling")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized run: 10 clients per round, 2 timed rounds, no warm-up round")
    parser.add_argument("--lanes-cpu", action="store_true", help="only the dense 2x200 lanes comparison")
    parser.add_argument("--json", help="also append the results as JSON lines to this file")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.quick:
        args.clients_per_round, args.rounds, args.warmup_rounds = "10", 2, 0
    start = time.perf_counter()
    device = jax.devices()[0]
    peak = peak_for(device.device_kind)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x {device.device_kind}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; peak: "
          + (f"{peak.name}: FP32 {peak.fp32} TFLOP/s, tensor (default precision) {peak.tensor} TFLOP/s "
             f"({peak.source})" if peak else "peak unknown"), flush=True)
    if jax.default_backend() == "cpu" and not args.lanes_cpu:
        print("no GPU/TPU: this is the CPU run of the accelerator table (its absolute numbers say nothing about "
              "an accelerator)", flush=True)
    results: list[dict[str, Any]] = []
    if args.lanes_cpu:
        results += lanes_cpu(args.rounds, args.warmup_rounds)
    else:
        mesh = make_mesh()
        lines = []
        for name in args.models.split(","):
            workload = WORKLOADS[name]
            auto = resolve_lanes("auto", mesh, param_bytes(make_algorithm(workload)))
            lanes_list = sorted({1, auto} | ({8} if jax.default_backend() == "cpu" else set()))
            analyses = {lanes: step_analysis(workload, lanes) for lanes in lanes_list}
            for lanes, a in analyses.items():
                print(f"{workload.name}: one step of {lanes} lane(s): {a['flops_per_step'] * lanes / 1e9:.3f} GFLOP "
                      f"({a['flops_per_step'] / 1e9:.3f} per client), {a['kernels']} kernels "
                      f"({a['fusions']} fusions, {a['custom_calls']} custom-calls, {a['loops']} loops)", flush=True)
            for cohort in (int(c) for c in args.clients_per_round.split(",")):
                runs = time_rounds(workload, cohort, lanes_list, args.rounds, args.warmup_rounds)
                for run in runs:
                    row = summarize(workload, cohort, run, analyses[run["lanes"]], peak, auto)
                    row["step_analysis"] = analyses[run["lanes"]]
                    results.append(row)
                    lines.append(format_row(row))
                    print(lines[-1], f"(compile {run['compile_s']:.1f} s, {run['shapes']} shapes)", flush=True)
        print("\n" + TABLE_HEADER + "\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(stamp(r)) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
