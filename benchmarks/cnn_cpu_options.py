"""EMNIST CNN client steps on XLA:CPU: XLA_FLAGS, convolution layout and bf16, against the default.

    python benchmarks/cnn_cpu_options.py                  # every variant below, 3 repeats each
    python benchmarks/cnn_cpu_options.py --steps 40 --repeats 5 --json FILE.jsonl
    python benchmarks/cnn_cpu_options.py --variants patches_nhwc_bf16 --combos onednn:patches_nhwc_bf16

Times the EMNIST CNN's client step (FedAvg, SGD lr 10^-1.5, batch 20) as
one jitted `lax.scan` over `--steps` batches with the data in memory
(round_efficiency.py's "limit": what a fedstream round runs per client
step, without the data pipeline), compiled ahead, median of `--repeats`.
Each variant runs in its own subprocess (XLA_FLAGS are read when the backend
starts), one after another, and reports ms/step and the largest absolute
difference of its trained params from the default's (same init, same
batches, same dropout keys):

* flags: fedstream's default model (`conv_impl='auto'`: im2col patches on
  CPU, NHWC) under each XLA_FLAGS setting in FLAG_SETS;
* layout: lax.conv in NHWC (`conv_impl='xla'`), lax.conv in NCHW (input
  transposed once, pooled in NCHW, transposed back before the dense layer,
  so the params are the same);
* bf16: params and activations cast to bfloat16 inside the model (f32
  master params and gradients, f32 logits for the loss), patches and
  lax.conv NHWC;
* combos: a layout or bf16 variant under a flag set (oneDNN, which is where
  XLA:CPU would use AMX / AVX512-BF16).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent

FLAG_SETS = {
    "default": "",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
}
MODEL_VARIANTS = ("patches_nhwc", "xla_nhwc", "xla_nchw", "patches_nhwc_bf16", "xla_nhwc_bf16")


def make_model(variant: str) -> Any:
    """The EMNIST CNN in the given layout / precision (same params pytree as `get_model('cnn')`)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from fedstream.models import get_model
    from fedstream.models.core import Model

    base = get_model("cnn", (28, 28, 1), 62, conv_impl="xla" if variant.startswith("xla") else "patches")
    if variant == "xla_nchw":

        class CnnNCHW(nn.Module):
            @nn.compact
            def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
                x = jnp.transpose(x, (0, 3, 1, 2))
                for i, features in enumerate((32, 64)):
                    kernel = self.param(f"Conv2D_{i}_kernel", nn.initializers.lecun_normal(),
                                        (3, 3, x.shape[1], features))
                    bias = self.param(f"Conv2D_{i}_bias", nn.initializers.zeros_init(), (features,))
                    x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                                     dimension_numbers=("NCHW", "HWIO", "NCHW"))
                    x = nn.relu(x + bias[None, :, None, None])
                n, c, h, w = x.shape
                x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
                x = jnp.transpose(x, (0, 2, 3, 1))  # back to NHWC: the dense layer sees the same order
                x = nn.Dropout(0.25, deterministic=not train)(x)
                x = x.reshape(n, -1)
                x = nn.relu(nn.Dense(128, name="Dense_0")(x))
                x = nn.Dropout(0.5, deterministic=not train)(x)
                return nn.Dense(62, name="Dense_1")(x)

        module = CnnNCHW()

        def to_nchw(p: dict) -> dict:
            return {"Conv2D_0_kernel": p["Conv2D_0"]["kernel"], "Conv2D_0_bias": p["Conv2D_0"]["bias"],
                    "Conv2D_1_kernel": p["Conv2D_1"]["kernel"], "Conv2D_1_bias": p["Conv2D_1"]["bias"],
                    "Dense_0": p["Dense_0"], "Dense_1": p["Dense_1"]}

        def apply(params: Any, x: jax.Array, rng: jax.Array | None) -> jax.Array:
            if rng is None:
                return module.apply({"params": to_nchw(params)}, x, train=False)
            return module.apply({"params": to_nchw(params)}, x, train=True, rngs={"dropout": rng})

        return Model.from_functions(base.init, apply, (28, 28, 1), 62)
    if variant.endswith("_bf16"):
        def apply_bf16(params: Any, x: jax.Array, rng: jax.Array | None) -> jax.Array:
            low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
            return base.apply(low, x.astype(jnp.bfloat16), rng).astype(jnp.float32)

        return Model.from_functions(base.init, apply_bf16, (28, 28, 1), 62)
    return base


def child(variant: str, steps: int, repeats: int, out: str) -> None:
    """Times one variant under this process's XLA_FLAGS; prints one JSON line, saves its trained params."""
    import jax
    import numpy as np

    sys.path.insert(0, str(HERE))
    from round_efficiency import build_limit

    from fedstream.algorithms.fedavg import FedAvg, make_optimizer

    model = make_model(variant)
    algorithm = FedAvg(model, make_optimizer("sgd", 10**-1.5),
                       make_optimizer("adam", 10**-2.5, b1=0.9, b2=0.999, eps=1e-4))
    rng = np.random.default_rng(0)
    batches = {"x": jax.numpy.asarray(rng.integers(0, 256, (steps, 20, 28, 28, 1)).astype(np.float32) / 255),
               "y": jax.numpy.asarray(rng.integers(0, 62, (steps, 20)).astype(np.int32)),
               "mask": jax.numpy.ones((steps, 20), bool)}
    params = model.init(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    limit = build_limit(algorithm).lower(params, batches).compile()
    compile_s = time.perf_counter() - t0
    trained = jax.block_until_ready(limit(params, batches))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(limit(params, batches))
        times.append(1e3 * (time.perf_counter() - t0) / steps)
    np.savez(out, *[np.asarray(a, np.float32) for a in jax.tree.leaves(trained)])
    print(json.dumps({"ms_per_step": statistics.median(times), "ms_per_step_all": times,
                      "compile_s": compile_s}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="client steps per timed scan")
    parser.add_argument("--repeats", type=int, default=3, help="timed scans per variant (median)")
    parser.add_argument("--flag-sets", default=",".join(FLAG_SETS), help="comma-separated names of FLAG_SETS")
    parser.add_argument("--variants", default=",".join(MODEL_VARIANTS[1:]),
                        help="model variants (default flags) besides the default patches_nhwc")
    parser.add_argument("--slow-steps", type=int, default=2,
                        help="steps (timed once) for the lax.conv variants, which run 10-50x slower in a scan")
    parser.add_argument("--combos", default="onednn:xla_nhwc,onednn_custom_call:xla_nhwc,"
                        "onednn:patches_nhwc_bf16,onednn_custom_call:patches_nhwc_bf16,onednn_custom_call:xla_nhwc_bf16",
                        help="further FLAG_SETS-name:variant pairs")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.repeats, args.out)

    import numpy as np

    sys.path.insert(0, str(HERE))
    from run_info import stamp

    runs = [(name, FLAG_SETS[name], "patches_nhwc") for name in args.flag_sets.split(",")]
    runs += [("default", "", v) for v in args.variants.split(",") if v]
    runs += [(c.split(":")[0], FLAG_SETS[c.split(":")[0]], c.split(":")[1]) for c in args.combos.split(",") if c]
    runs.append(("default_again", "", "patches_nhwc"))  # drift of the machine's load over the run
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; CPU flags: "
          + " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                     if f in pathlib.Path("/proc/cpuinfo").read_text().split()), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for i, (name, flags, variant) in enumerate(runs):
            out = os.path.join(tmp, f"{i}.npz")
            env = {**os.environ, "XLA_FLAGS": flags}
            slow = variant.startswith("xla")  # lax.conv inside lax.scan: 10-50x slower on XLA:CPU
            steps, repeats = (args.slow_steps, 1) if slow else (args.steps, args.repeats)
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(steps),
                                   "--repeats", str(repeats), "--out", out],
                                  env=env, capture_output=True, text=True, check=False)
            r: dict[str, Any] = {"flags_name": name, "xla_flags": flags, "variant": variant, "steps": steps,
                                 "load_average": os.getloadavg()[0]}
            if proc.returncode != 0:
                r["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                print(f"{name:22s} {variant:18s} failed: {r['error']}", flush=True)
            else:
                r.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                with np.load(out) as z:
                    leaves = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
                if reference is None:
                    reference = leaves
                # Params after different step counts are not comparable: differences only at the default's steps.
                r["max_abs_param_diff"] = (max(float(np.abs(a - b).max()) for a, b in zip(leaves, reference))
                                           if steps == args.steps else None)
                base = results[0]["ms_per_step"] if results else r["ms_per_step"]
                r["vs_default"] = base / r["ms_per_step"]
                print(f"{name:22s} {variant:18s} {r['ms_per_step']:6.2f} ms/step  x{r['vs_default']:.2f} vs default  "
                      f"max|dparams|={r['max_abs_param_diff'] if r['max_abs_param_diff'] is None else format(r['max_abs_param_diff'], '.1e')}  compile {r['compile_s']:.1f} s  "
                      f"load {r['load_average']:.1f}", flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(stamp(r)) + "\n")


if __name__ == "__main__":
    main()
