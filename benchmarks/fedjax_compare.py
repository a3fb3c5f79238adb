"""fedstream vs FedJAX 0.0.17: round time side by side, interleaved in one run.

Reproduce (2-core CPU VM; the default run took 6-12 minutes on the shared
machine once the dataset and its .npz existed):

    python benchmarks/fedjax_compare.py --setup      # once: FedJAX venv at <system temp dir>/fedjax_venv
    python benchmarks/fedjax_compare.py              # cnn and mlp, 10 and 50 clients per round
    python benchmarks/fedjax_compare.py --quick      # smoke run: 10 clients per round, few rounds
    python benchmarks/fedjax_compare.py --models mlp --clients-per-round 50 --json results.jsonl

FedJAX needs jax 0.4.x and dm-haiku, which cannot share an environment with
fedstream (jax 0.10), so it runs from its own virtual environment, created by
`--setup` with `python3 -m venv` and pip (through pip's configured index):
fedjax==0.0.17, jax==0.4.38, jaxlib==0.4.38, dm-haiku==0.0.17,
optax==0.2.5, chex==0.1.90. FedJAX is not a dependency of fedstream.

Data: the EMNIST-shaped synthetic dataset of round_efficiency.py (3,400
clients, log-normal sizes with mean ~200, 28x28x1 float32 pixels, 62
classes), written once with `DatasetWriter`. FedJAX gets the same clients
from a `.npz` this script exports from that dataset (no pickle), loaded into
`fedjax.InMemoryFederatedData`. Both frameworks train the same cohort in each
round (fedstream's `CohortPipeline.cohort(r)`, passed to FedJAX).

Workload: FedAvg with a server Adam (FedAdam), batch 20, 1 local epoch,
client SGD lr 10^-1.5, server Adam lr 10^-2.5 (b1 0.9, b2 0.999, eps 1e-4),
for the EMNIST CNN and the 2x200 dense model: FedJAX's own
`fedjax.models.emnist.create_conv_model` / `create_dense_model(hidden_units=
200)` trained with `fedjax.algorithms.fed_avg.federated_averaging`
(`fedjax.for_each_client`, default jit backend), against fedstream's
`get_model("cnn" / "mlp")` through `CohortPipeline` + `build_train_round`.
Both give a client ceil(n / 20) steps (FedJAX tops the last batch up with
repeated examples, fedstream masks it).

Timing: each framework runs in its own long-lived subprocess and waits on
stdin while the other works, so only one computes at a time. Per (model,
clients per round): both set up (fedstream compiles every stream length the
run will use), run `--warmup-rounds` untimed rounds (FedJAX compiles here),
then `--blocks` blocks of k rounds alternate between the two (the order
flips each block), so both see the same machine load. A FedJAX round is
`get_clients` + `apply` + waiting for the new params (what
`UniformGetClientSampler` + the algorithm cost); a fedstream round is
`next(iterator)` + `shard_batch` + the jitted round + waiting, with the next
round prefetched in background threads as in training; after each fedstream
block the script waits until those threads are idle, so FedJAX never shares
the CPU with them. Reported: median round time of each over the timed
rounds, speedup = FedJAX / fedstream. Goal: >= 2x on the CNN, >= 5x on the
dense model.

With `--limit` (default `auto`: the dense model only), after each timed
fedstream round the same SGD steps also run as one jitted `lax.scan` with
the data already in memory (round_efficiency.py's "limit", compiled ahead,
timed once the background threads are idle): `fedjax/limit` is the largest
speedup any implementation of these steps could show on this device.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
FEDJAX_REQUIREMENTS = ["fedjax==0.0.17", "jax==0.4.38", "jaxlib==0.4.38", "dm-haiku==0.0.17", "optax==0.2.5",
                       "chex==0.1.90"]
BATCH = 20
CLIENT_LR = 10**-1.5
SERVER_LR = 10**-2.5


def default_blocks(model: str, cohort: int, quick: bool) -> tuple[int, int]:
    """(blocks, rounds per block): the CNN's rounds take seconds, the dense model's a tenth of a second."""
    if quick:
        return (1, 1) if model == "cnn" else (2, 3)
    return (4, 2 if cohort <= 10 else 1) if model == "cnn" else (5, 5)


def default_venv() -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / "fedjax_venv"


def venv_python(venv: pathlib.Path) -> pathlib.Path:
    return venv / "bin" / "python"


# --------------------------------------------------------------------------- setup


def setup_venv(venv: pathlib.Path, python: str) -> int:
    """Creates the FedJAX venv and installs FedJAX there; prints pip's error and returns non-zero on failure."""
    if not venv_python(venv).exists():
        print(f"creating {venv} with {python} -m venv", flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    cmd = [str(venv_python(venv)), "-m", "pip", "install", *FEDJAX_REQUIREMENTS]
    print("running: " + " ".join(["<venv>/bin/python", *cmd[1:]]), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print("FedJAX could not be installed; pip said:\n" + "\n".join(proc.stdout.splitlines()[-40:]), flush=True)
        return proc.returncode
    check = subprocess.run([str(venv_python(venv)), "-c", "import fedjax, jax, haiku; print(jax.__version__)"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check.returncode != 0:
        print("FedJAX installed but does not import:\n" + check.stdout[-4000:], flush=True)
        return check.returncode
    print(f"FedJAX venv ready (jax {check.stdout.strip()})", flush=True)
    return 0


# --------------------------------------------------------------------------- data


def export_npz(dataset: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The fedstream dataset's train clients as one .npz (x, y, offsets, client_ids); reused while it matches."""
    import numpy as np

    from fedstream.data.reader import FederatedDataset

    fingerprint = hashlib.sha256((dataset / "metadata.json").read_bytes()).hexdigest()
    if out.exists():
        with np.load(out) as z:
            if str(z["fingerprint"]) == fingerprint:
                print(f"reusing {out}", flush=True)
                return out
    t0 = time.perf_counter()
    ds = FederatedDataset(dataset)
    sizes = np.asarray(ds.client_sizes("train"), np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x = np.empty((int(offsets[-1]), 28, 28, 1), np.float32)
    y = np.empty(int(offsets[-1]), np.int32)
    for c in range(len(sizes)):
        client = ds.get_client("train", c)
        x[offsets[c]:offsets[c + 1]] = client["x"]
        y[offsets[c]:offsets[c + 1]] = client["y"]
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, x=x, y=y, offsets=offsets, client_ids=np.asarray(ds.client_ids("train"), str),
             fingerprint=np.asarray(fingerprint))
    os.replace(tmp, out)
    print(f"exported {len(sizes)} clients ({x.nbytes / 2**30:.2f} GiB) to {out} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return out


# --------------------------------------------------------------------------- workers


def build_limit(algorithm: Any) -> Any:
    """`limit(server_state, batches)`: the client steps over `[S, B, ...]` batches as one jitted lax.scan.

    One client state for all S steps, no data pipeline, client resets, delta
    accumulation or server update (round_efficiency.py's limit; written here
    for both the `client_init(params)` and `client_init(broadcast)` APIs).
    """
    import jax
    import jax.numpy as jnp

    def limit(server_state: Any, batches: dict[str, Any]) -> Any:
        key = jax.random.PRNGKey(0)
        if hasattr(algorithm, "broadcast"):
            broadcast = algorithm.broadcast(server_state)
            start, extra = algorithm.client_init(broadcast), (broadcast,)
        else:
            start, extra = algorithm.client_init(server_state.params), ()

        def step(state: Any, xs: Any) -> tuple[Any, None]:
            i, batch = xs
            state, _ = algorithm.client_step(state, batch, jax.random.fold_in(key, i), *extra)
            return state, None

        state, _ = jax.lax.scan(step, start, (jnp.arange(batches["mask"].shape[0]), batches))
        return state.params

    return jax.jit(limit)


def _protocol() -> tuple[Any, Any]:
    """Keeps the real stdout for JSON replies and sends everything else (fd 1 included) to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return sys.stdin, reply


def fedstream_worker(dataset: str) -> None:
    """Serves setup / cohorts / rounds commands for fedstream (runs under fedstream's environment)."""
    stdin, reply = _protocol()
    sys.path.insert(0, str(HERE))
    import jax

    from fedstream.data.cohort import ClientBatching, CohortPipeline, auto_data_threads
    from fedstream.data.reader import FederatedDataset
    from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
    from round_efficiency import make_algorithm, real_steps, round_shapes, wait_until_idle

    ds = FederatedDataset(dataset)
    mesh = make_mesh()
    ctx: dict[str, Any] = {}
    reply.write(json.dumps({"ready": True, "jax": jax.__version__, "devices": mesh.size}) + "\n")
    for line in stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "setup":
            if "iterator" in ctx:
                ctx["iterator"].close()
            t0 = time.perf_counter()
            algorithm = make_algorithm(cmd["model"])
            pipe = CohortPipeline(ds, "train", ("x", "y"), seed=0, cohort_size=cmd["cohort"],
                                  batching=ClientBatching(BATCH, 1), num_devices=mesh.size,
                                  data_threads=auto_data_threads(0), chunk_bytes=0)
            round_fn = build_train_round(algorithm, mesh, seed=0)
            state = replicate(algorithm.init(jax.random.PRNGKey(0)), mesh)
            for shape in sorted(round_shapes(pipe, range(cmd["total_rounds"]))):
                jax.block_until_ready(round_fn(state, shard_batch(pipe.empty_chunk(shape), mesh)))
            ctx = {"pipe": pipe, "round_fn": round_fn, "state": state, "next": 0, "limit_fn": build_limit(algorithm),
                   "iterator": pipe.iterator(cmd["total_rounds"]), "compiles": round_fn._cache_size()}
            wait_until_idle()
            out: dict[str, Any] = {"setup_s": time.perf_counter() - t0, "compiles": ctx["compiles"],
                                   "data_threads": pipe.data_threads}
        elif cmd["cmd"] == "cohorts":
            out = {"cohorts": [ctx["pipe"].cohort(r).tolist() for r in cmd["rounds"]]}
        elif cmd["cmd"] == "rounds":
            rounds = []
            for r in cmd["rounds"]:
                if r != ctx["next"]:
                    raise RuntimeError(f"fedstream worker asked for round {r}, next is {ctx['next']}")
                t0 = time.perf_counter()
                element = next(ctx["iterator"])
                t1 = time.perf_counter()
                ctx["state"], stats = ctx["round_fn"](ctx["state"], shard_batch(element["batch"], mesh))
                jax.block_until_ready((ctx["state"], stats))
                t2 = time.perf_counter()
                rounds.append({"round": r, "s": t2 - t0, "wait_s": t1 - t0, "steps": int(element["num_steps"]),
                               "clients": ctx["pipe"].cohort(r).tolist()})
                if cmd.get("limit"):  # the same SGD steps as one jitted lax.scan, data in memory (untimed compile)
                    server = jax.device_put(jax.device_get(ctx["state"]))  # one device, like the stream
                    stream = jax.device_put(real_steps(element["batch"]))
                    limit = ctx["limit_fn"].lower(server, stream).compile()
                    wait_until_idle()
                    t0 = time.perf_counter()
                    jax.block_until_ready(limit(server, stream))
                    rounds[-1]["limit_s"] = time.perf_counter() - t0
                    del stream
                ctx["next"] += 1
                del element
            idle_s = wait_until_idle()  # the next round is prefetched before the other framework runs
            out = {"rounds": rounds, "idle_wait_s": idle_s,
                   "new_compiles": ctx["round_fn"]._cache_size() - ctx["compiles"]}
        else:
            raise ValueError(f"unknown command {cmd}")
        reply.write(json.dumps(out) + "\n")
    if "iterator" in ctx:
        ctx["iterator"].close()


def fedjax_worker(npz: str) -> None:
    """Serves setup / rounds commands for FedJAX 0.0.17 (runs under the FedJAX venv; imports no fedstream)."""
    stdin, reply = _protocol()
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    import fedjax
    import jax
    import numpy as np

    t0 = time.perf_counter()
    with np.load(npz) as z:
        x, y, offsets, ids = z["x"], z["y"], z["offsets"], z["client_ids"]
    client_ids = [str(c).encode() for c in ids]
    data = fedjax.InMemoryFederatedData({
        cid: {"x": x[offsets[i]:offsets[i + 1]], "y": y[offsets[i]:offsets[i + 1]]}
        for i, cid in enumerate(client_ids)})
    load_s = time.perf_counter() - t0
    reply.write(json.dumps({"ready": True, "jax": jax.__version__, "fedjax": importlib.metadata.version("fedjax"),
                            "haiku": importlib.metadata.version("dm-haiku"), "load_s": load_s,
                            "clients": data.num_clients(), "backend": jax.default_backend()}) + "\n")
    ctx: dict[str, Any] = {}
    for line in stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "setup":
            if cmd["model"] == "cnn":
                model = fedjax.models.emnist.create_conv_model(only_digits=False)
            else:
                model = fedjax.models.emnist.create_dense_model(only_digits=False, hidden_units=200)
            algorithm = fedjax.algorithms.fed_avg.federated_averaging(
                grad_fn=fedjax.model_grad(model),
                client_optimizer=fedjax.optimizers.sgd(learning_rate=CLIENT_LR),
                server_optimizer=fedjax.optimizers.adam(learning_rate=SERVER_LR, b1=0.9, b2=0.999, eps=1e-4),
                client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(batch_size=BATCH, num_epochs=1))
            state = algorithm.init(model.init(jax.random.PRNGKey(0)))
            ctx = {"algorithm": algorithm, "state": state}
            out: dict[str, Any] = {"params": int(sum(a.size for a in jax.tree_util.tree_leaves(state.params)))}
        elif cmd["cmd"] == "rounds":
            rounds = []
            for r, clients in zip(cmd["rounds"], cmd["cohorts"]):
                t0 = time.perf_counter()
                chosen = list(data.get_clients([client_ids[c] for c in clients]))
                keys = jax.random.split(jax.random.PRNGKey(r), len(chosen))  # as UniformGetClientSampler
                ctx["state"], _ = ctx["algorithm"].apply(
                    ctx["state"], [(cid, cds, key) for (cid, cds), key in zip(chosen, keys)])
                jax.block_until_ready(ctx["state"].params)
                rounds.append({"round": r, "s": time.perf_counter() - t0,
                               "steps": sum(math.ceil(len(cds) / BATCH) for _, cds in chosen)})
            out = {"rounds": rounds}
        else:
            raise ValueError(f"unknown command {cmd}")
        reply.write(json.dumps(out) + "\n")


class Worker:
    """A worker subprocess spoken to with one JSON line per command and per reply."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def __call__(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # our own child, by its handle
                self.proc.wait()


# --------------------------------------------------------------------------- driver


def compare(fs: Worker, fj: Worker, model: str, cohort: int, warmup: int, blocks: int, per_block: int,
            limit: bool) -> dict:
    """Warm-up, then alternating blocks of `per_block` rounds; returns medians and speedup."""
    total = warmup + blocks * per_block
    load0 = os.getloadavg()[0]
    fs_setup = fs("setup", model=model, cohort=cohort, total_rounds=total)
    fj_setup = fj("setup", model=model, cohort=cohort)
    cohorts = fs("cohorts", rounds=list(range(total)))["cohorts"]

    def run(worker: Worker, rounds: list[int]) -> list[dict[str, Any]]:
        if worker is fj:
            return fj("rounds", rounds=rounds, cohorts=[cohorts[r] for r in rounds])["rounds"]
        reply = fs("rounds", rounds=rounds, limit=limit and rounds[0] >= warmup)
        if reply["new_compiles"]:
            raise RuntimeError("fedstream compiled a new shape during timing; the warm-up missed a stream length")
        return reply["rounds"]

    t0 = time.perf_counter()
    fj_warm = run(fj, list(range(warmup)))
    fs_warm = run(fs, list(range(warmup)))
    timed: dict[str, list[dict[str, Any]]] = {"fedjax": [], "fedstream": []}
    for b in range(blocks):
        rounds = list(range(warmup + b * per_block, warmup + (b + 1) * per_block))
        order = [("fedjax", fj), ("fedstream", fs)] if b % 2 == 0 else [("fedstream", fs), ("fedjax", fj)]
        for name, worker in order:
            timed[name] += run(worker, rounds)
    for a, b in zip(timed["fedjax"], timed["fedstream"]):  # same rounds, same clients, same steps
        if a["round"] != b["round"] or a["steps"] != b["steps"] or b["clients"] != cohorts[b["round"]]:
            raise RuntimeError(f"round {a['round']}: FedJAX ran {a['steps']} steps, fedstream round {b['round']} "
                               f"{b['steps']} steps; the two did not train the same cohort")
    fj_s = [r["s"] for r in timed["fedjax"]]
    fs_s = [r["s"] for r in timed["fedstream"]]
    steps = statistics.median(r["steps"] for r in timed["fedstream"])
    fj_med, fs_med = statistics.median(fj_s), statistics.median(fs_s)
    limits = {}
    if limit:
        lim = [r["limit_s"] for r in timed["fedstream"]]
        limits = {"limit_s": lim, "limit_median_s": statistics.median(lim),
                  "fedjax_over_limit": fj_med / statistics.median(lim)}
    return {
        "model": model, "clients_per_round": cohort, "timed_rounds": len(fs_s), "blocks": blocks,
        "rounds_per_block": per_block, "warmup_rounds": warmup, "steps_per_round": steps,
        "fedjax_median_s": fj_med, "fedstream_median_s": fs_med, "speedup": fj_med / fs_med,
        "fedjax_ms_per_step": 1e3 * fj_med / steps, "fedstream_ms_per_step": 1e3 * fs_med / steps,
        "fedjax_s": fj_s, "fedstream_s": fs_s, "fedstream_wait_s": [r["wait_s"] for r in timed["fedstream"]],
        "fedjax_warmup_s": [r["s"] for r in fj_warm], "fedstream_warmup_s": [r["s"] for r in fs_warm],
        "fedstream_setup_s": fs_setup["setup_s"], "fedstream_compiles": fs_setup["compiles"],
        "params": fj_setup["params"], "elapsed_s": time.perf_counter() - t0,
        "load_average_start": load0, "load_average_end": os.getloadavg()[0], **limits,
    }


def format_result(r: dict[str, Any]) -> str:
    limit = (f" limit_median_s={r['limit_median_s']:.3f} fedjax/limit={r['fedjax_over_limit']:.2f}"
             if "limit_median_s" in r else "")
    return (f"model={r['model']} clients_per_round={r['clients_per_round']} timed_rounds={r['timed_rounds']} "
            f"steps/round={r['steps_per_round']:.0f} fedjax_median_s={r['fedjax_median_s']:.3f} "
            f"fedstream_median_s={r['fedstream_median_s']:.3f} speedup={r['speedup']:.2f} "
            f"fedjax_ms/step={r['fedjax_ms_per_step']:.2f} fedstream_ms/step={r['fedstream_ms_per_step']:.2f} "
            f"fedjax_first_round_s={r['fedjax_warmup_s'][0]:.1f}{limit} load={r['load_average_start']:.1f}"
            f"->{r['load_average_end']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="create the FedJAX venv and exit")
    parser.add_argument("--fedjax-venv", default=str(default_venv()), help="FedJAX virtual environment")
    parser.add_argument("--python", default=shutil.which("python3") or sys.executable,
                        help="interpreter for `-m venv` (--setup)")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn, mlp")
    parser.add_argument("--clients-per-round", default="10,50", help="comma-separated cohort sizes")
    parser.add_argument("--blocks", type=int, default=0,
                        help="alternating blocks per configuration; 0 = 4 (cnn), 5 (mlp)")
    parser.add_argument("--rounds-per-block", type=int, default=0,
                        help="0 = cnn: 2 at <= 10 clients per round, else 1; mlp: 5")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds of each framework first")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"),
                        help="cache of the synthetic dataset (shared with round_efficiency.py) and its .npz")
    parser.add_argument("--limit", choices=("auto", "on", "off"), default="auto",
                        help="also time fedstream's steps as one lax.scan (the in-memory limit, as in "
                             "round_efficiency.py) after each timed round; auto = dense model only")
    parser.add_argument("--quick", action="store_true", help="10 clients per round, 1-2 short blocks")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    parser.add_argument("--worker", choices=("fedstream", "fedjax"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "fedstream":
        return fedstream_worker(args.data)
    if args.worker == "fedjax":
        return fedjax_worker(args.data)
    venv = pathlib.Path(args.fedjax_venv)
    if args.setup:
        sys.exit(setup_venv(venv, args.python))
    if not venv_python(venv).exists():
        sys.exit(f"no FedJAX venv at {venv}; run `python benchmarks/fedjax_compare.py --setup` first")

    sys.path.insert(0, str(HERE))
    from round_efficiency import dataset_dir

    models = args.models.split(",")
    cohorts = [int(c) for c in args.clients_per_round.split(",")]
    if args.quick and args.clients_per_round == parser.get_default("clients_per_round"):
        cohorts = [10]
    start = time.perf_counter()
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    root = pathlib.Path(args.data_dir)
    dataset = dataset_dir(root)
    npz = export_npz(dataset, root / "fedjax_emnist_like.npz")
    me = str(pathlib.Path(__file__).resolve())
    fs = fj = None
    try:
        fs = Worker("fedstream", [sys.executable, me, "--worker", "fedstream", "--data", str(dataset)])
        fj = Worker("fedjax", [str(venv_python(venv)), me, "--worker", "fedjax", "--data", str(npz)])
        versions = {"fedstream": importlib.metadata.version("fedstream"), "fedstream_jax": fs.hello["jax"],
                    "fedjax": fj.hello["fedjax"], "fedjax_jax": fj.hello["jax"], "dm_haiku": fj.hello["haiku"]}
        print("versions: " + " ".join(f"{k}={v}" for k, v in versions.items())
              + f"; FedJAX loaded {fj.hello['clients']} clients in {fj.hello['load_s']:.1f} s", flush=True)
        for model in models:
            for cohort in cohorts:
                blocks, per_block = default_blocks(model, cohort, args.quick)
                r = compare(fs, fj, model, cohort, args.warmup_rounds, args.blocks or blocks,
                            args.rounds_per_block or per_block,
                            args.limit == "on" or (args.limit == "auto" and model == "mlp"))
                r["versions"] = versions
                print(format_result(r), flush=True)
                if args.json:  # one line per configuration, as soon as it is measured
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    finally:
        for w in (fs, fj):
            if w is not None:
                w.close()
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
