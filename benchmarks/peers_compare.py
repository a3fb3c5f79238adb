"""fedstream vs pfl-research 0.6.0 (PyTorch) and Flower 1.42 (simulation): ms per local step, interleaved.

Reproduce (2-core CPU VM, shared with other jobs):

    python benchmarks/peers_compare.py --setup      # once: venvs at <system temp dir>/pfl_venv, /flower_venv
    python benchmarks/peers_compare.py              # cnn, mlp, logistic at 10 and 50 clients per round
    python benchmarks/peers_compare.py --quick      # smoke run: mlp, 10 clients per round, few rounds
    python benchmarks/peers_compare.py --models cnn --clients-per-round 10 --peers pfl --json results.jsonl

The peers are not dependencies of fedstream. Each runs from its own virtual
environment, created by `--setup` with `python3 -m venv` and pip (through
pip's configured index): pfl==0.6.0 (pfl-research; the package is named
`pfl`) with torch==2.13.0+cpu (PyTorch's CPU wheel; plain torch==2.13.0 if
the index has no CPU wheel), and flwr[simulation]==1.42.0 (which pins
ray==2.55.1) with the same torch.

Data: the EMNIST-shaped synthetic dataset of round_efficiency.py (3,400
clients, log-normal sizes with mean ~200, 28x28x1 float32 pixels, 62
classes), exported to the same .npz as fedjax_compare.py (no pickle). pfl
loads it into memory (its clients are `pfl.data.dataset.Dataset` slices);
Flower's ClientApps run in Ray worker processes and memory-map .npy copies of
the same arrays (written once next to the .npz), the way a Flower client
loads its partition from local storage. All three train the same cohort in
each round: fedstream's `CohortPipeline.cohort(r)`.

Workload (all three): FedAvg weighted by client examples with a server Adam
(lr 10^-2.5, b1 0.9, b2 0.999, eps 1e-4), client SGD lr 10^-1.5, batch 20, 1
local epoch: ceil(n / 20) steps per client (the torch peers run the last,
partial batch as it is, fedstream masks it). Models, the same architecture in
each (parameter counts are checked):

* cnn: fedstream `get_model("cnn", (28, 28, 1), 62)`: conv 32 3x3 VALID ->
  ReLU -> conv 64 3x3 VALID -> ReLU -> max-pool 2x2 -> dropout 0.25 -> dense
  128 -> ReLU -> dropout 0.5 -> dense 62 (1,206,590 parameters). PyTorch:
  the same layers in NCHW (`nn.Conv2d`, `nn.MaxPool2d`, `nn.Dropout`,
  `nn.Linear`).
* mlp: `get_model("mlp", ..., hidden=(200, 200))`: dense 200 -> ReLU ->
  dense 200 -> ReLU -> dense 62 (209,662 parameters).
* logistic: `get_model("logistic", ...)`: one dense layer 784 -> 62 (48,670).

Each framework's own initialisation; the torch peers do not shuffle a
client's examples (fedstream does).

What is timed, per round (everything a training loop repeats each round):

* fedstream: as fedjax_compare.py (whose fedstream worker this script
  runs): `next(iterator)` (the cohort's data, prefetched in background
  threads while the previous round computes) + `shard_batch` + the jitted
  round + waiting for the new state; after each block the script waits until
  the background threads are idle, so a peer never shares the CPU with them.
  Every stream length is compiled before timing.
* pfl: one central iteration of `FederatedAveraging.run` with a
  `SimulatedBackend` (WeightByDatapoints postprocessor) and a `PyTorchModel`
  (local optimizer `torch.optim.SGD`, central optimizer `torch.optim.Adam`):
  `run` is called once per block with `central_num_iterations` set to the
  block's end, and a callback stamps the end of each central iteration (after
  the central update); the first round of a block is timed from the call. The
  user sampler hands out the cohort's clients in order. Evaluation is off
  (`evaluation_frequency` beyond the run; pfl evaluates in iteration 0, a
  warm-up round).
* Flower: a `ServerApp` whose main function serves this script's commands;
  one round = `FedAdam.configure_train` (a subclass that sends each sampled
  node one client id of the cohort in its ConfigRecord) + `grid.send_and_receive`
  + `FedAdam.aggregate_train` (weighted by "num-examples", then Flower's
  server Adam). The `ClientApp` (in Ray actors, as `run_simulation` starts
  them) builds the torch model, loads the received arrays, trains the
  client's steps with `torch.optim.SGD` and replies with its arrays and
  example count, as Flower's PyTorch quickstart does. One simulation per
  (model, clients per round) with `num_supernodes` = clients per round;
  client resources are Flower's default (2 CPUs per ClientApp, so one actor
  on this 2-core machine) unless `--flower-client-cpus` says otherwise. Ray
  start-up is not timed.

Per (model, clients per round): all set up, `--warmup-rounds` untimed
rounds each, then `--blocks` blocks of k rounds rotate through the
frameworks (the order rotates each block), so all see the same machine load.
Reported: ms per local step = median round time / the round's local steps
(the same cohorts, so the same steps in all three; checked), and the ratio
peer / fedstream (> 1: fedstream faster). Goals from the issue: >= 1.3x pfl
on the CNN, >= 3x pfl on the dense and logistic models.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE))
from fedjax_compare import Worker, _protocol, export_npz, venv_python

TORCH = "torch==2.13.0"
PEERS = {
    "pfl": {"requirements": ["pfl==0.6.0"], "check": "import pfl, torch; print(torch.__version__)"},
    "flower": {"requirements": ["flwr[simulation]==1.42.0"],
               "check": "import flwr, ray, torch; print(torch.__version__)"},
}
MODELS = ("cnn", "mlp", "logistic")
BATCH = 20
CLIENT_LR = 10**-1.5
SERVER_LR = 10**-2.5
NUM_CLASSES = 62


def default_blocks(model: str, cohort: int, quick: bool) -> tuple[int, int]:
    """(blocks, rounds per block): a CNN round takes seconds, a dense or logistic round a tenth of that."""
    if quick:
        return (2, 2)
    if model == "cnn":
        return (4, 2 if cohort <= 10 else 1)
    return (4, 4)


def default_venv(peer: str) -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / f"{peer}_venv"


# --------------------------------------------------------------------------- setup


def setup_venv(peer: str, venv: pathlib.Path, python: str) -> int:
    """Creates `peer`'s venv and installs it with torch (CPU wheel if offered); prints pip's error on failure."""
    if not venv_python(venv).exists():
        print(f"creating the {peer} venv with {python} -m venv", flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    proc = None
    for torch in (f"{TORCH}+cpu", TORCH):  # PyTorch's CPU wheel when the index has it (no CUDA libraries)
        cmd = [str(venv_python(venv)), "-m", "pip", "install", *PEERS[peer]["requirements"], torch]
        print(f"{peer}: running <venv>/bin/python " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode == 0:
            break
    if proc.returncode != 0:
        print(f"{peer} could not be installed; pip said:\n" + "\n".join(proc.stdout.splitlines()[-40:]), flush=True)
        return proc.returncode
    check = subprocess.run([str(venv_python(venv)), "-c", PEERS[peer]["check"]],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if check.returncode != 0:
        print(f"{peer} installed but does not import:\n" + check.stdout[-4000:], flush=True)
        return check.returncode
    print(f"{peer} venv ready (torch {check.stdout.strip()})", flush=True)
    return 0


# --------------------------------------------------------------------------- data


def export_npy(npz: pathlib.Path) -> pathlib.Path:
    """x.npy, y.npy, offsets.npy next to the .npz (for memory-mapping in Flower's Ray workers); reused."""
    import numpy as np

    out = npz.with_name(npz.stem + "_npy")
    with np.load(npz) as z:
        fingerprint = str(z["fingerprint"])
        if (out / "fingerprint.txt").exists() and (out / "fingerprint.txt").read_text() == fingerprint:
            return out
        out.mkdir(exist_ok=True)
        for key in ("x", "y", "offsets"):
            np.save(out / f"{key}.npy", z[key])
    (out / "fingerprint.txt").write_text(fingerprint)
    print(f"wrote the .npy copies to {out}", flush=True)
    return out


# --------------------------------------------------------------------------- torch models (peers)


def torch_model(name: str) -> Any:
    """fedstream's `get_model(name, (28, 28, 1), 62)` architecture in PyTorch (NCHW input)."""
    from torch import nn

    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Dropout(0.25), nn.Flatten(), nn.Linear(12 * 12 * 64, 128), nn.ReLU(),
                             nn.Dropout(0.5), nn.Linear(128, NUM_CLASSES))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                             nn.Linear(200, NUM_CLASSES))
    if name == "logistic":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, NUM_CLASSES))
    raise ValueError(f"unknown model {name!r}")


def count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# --------------------------------------------------------------------------- pfl worker


def pfl_worker(npz: str) -> None:
    """Serves setup / rounds commands for pfl 0.6.0 with PyTorch (runs under the pfl venv; no fedstream)."""
    stdin, reply = _protocol()
    import collections

    import numpy as np
    import pfl
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    t0 = time.perf_counter()
    with np.load(npz) as z:
        x, y, offsets = z["x"], z["y"], z["offsets"]
    x = x.reshape(len(x), 1, 28, 28)  # NHWC -> NCHW: a reshape for one channel
    y = y.astype(np.int64)
    load_s = time.perf_counter() - t0

    class Classifier(torch.nn.Module):
        """A torch model with the `loss` and `metrics` methods PyTorchModel requires."""

        def __init__(self, name: str) -> None:
            super().__init__()
            self.net = torch_model(name)

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def loss(self, x: Any, y: Any, eval: bool = False) -> Any:
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y.long())

        @torch.no_grad()
        def metrics(self, x: Any, y: Any, eval: bool = True) -> dict[str, Any]:
            self.eval() if eval else self.train()
            loss = F.cross_entropy(self(x), y.long(), reduction="sum").item()
            return {"loss": Weighted(loss, len(x))}

    class Clock(TrainingProcessCallback):
        """Stamps the end of each central iteration (after the central update)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def after_central_iteration(self, aggregate_metrics: Any, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Any]:
            self.stamps.append(time.perf_counter())
            return False, Metrics()

    queue: collections.deque[int] = collections.deque()

    def make_dataset(cid: int) -> Dataset:
        a, b = int(offsets[cid]), int(offsets[cid + 1])
        return Dataset((x[a:b], y[a:b]), user_id=str(cid))

    reply.write(json.dumps({"ready": True, "pfl": importlib.metadata.version("pfl"), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "load_s": load_s,
                            "clients": len(offsets) - 1}) + "\n")
    ctx: dict[str, Any] = {}
    for line in stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "setup":
            torch.manual_seed(0)
            module = Classifier(cmd["model"])
            model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                                 central_optimizer=torch.optim.Adam(module.parameters(), lr=SERVER_LR,
                                                                    betas=(0.9, 0.999), eps=1e-4))
            data = FederatedDataset(make_dataset, queue.popleft)
            backend = SimulatedBackend(training_data=data, val_data=None, postprocessors=[WeightByDatapoints()])
            ctx = {"model": model, "backend": backend, "algorithm": FederatedAveraging(), "cohort": cmd["cohort"],
                   "train": NNTrainHyperParams(local_learning_rate=CLIENT_LR, local_num_epochs=1,
                                               local_batch_size=BATCH)}
            out: dict[str, Any] = {"params": count_params(module)}
        elif cmd["cmd"] == "rounds":
            queue.clear()
            for clients in cmd["cohorts"]:
                queue.extend(clients)
            algorithm = ctx["algorithm"]
            params = NNAlgorithmParams(
                central_num_iterations=algorithm._current_central_iteration + len(cmd["rounds"]),
                evaluation_frequency=10**9, train_cohort_size=ctx["cohort"], val_cohort_size=None)
            clock = Clock()
            t0 = time.perf_counter()
            ctx["model"] = algorithm.run(params, ctx["backend"], ctx["model"], ctx["train"], callbacks=[clock],
                                         send_metrics_to_platform=False)  # no metrics printout per iteration
            if queue or len(clock.stamps) != len(cmd["rounds"]):
                raise RuntimeError(f"pfl left {len(queue)} clients unused or ran {len(clock.stamps)} iterations")
            stamps = [t0, *clock.stamps]
            out = {"rounds": [{"round": r, "s": stamps[i + 1] - stamps[i],
                               "steps": sum(math.ceil((offsets[c + 1] - offsets[c]) / BATCH) for c in clients)}
                              for i, (r, clients) in enumerate(zip(cmd["rounds"], cmd["cohorts"]))]}
        else:
            raise ValueError(f"unknown command {cmd}")
        reply.write(json.dumps(out) + "\n")
    del pfl


# --------------------------------------------------------------------------- Flower worker


def flower_worker(npy_dir: str, model_name: str, cohort: int, client_cpus: float) -> None:
    """One Flower simulation (`num_supernodes` = cohort) whose ServerApp serves rounds commands from stdin."""
    stdin, reply = _protocol()
    import logging

    import numpy as np
    import ray
    import torch
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAdam
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)  # no per-round INFO lines
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        import numpy as np
        import torch
        import torch.nn.functional as F

        config = msg.content["config"]
        cid = int(config["cid"])
        xs = np.load(f"{npy_dir}/x.npy", mmap_mode="r")
        offsets = np.load(f"{npy_dir}/offsets.npy")
        a, b = int(offsets[cid]), int(offsets[cid + 1])
        x = torch.from_numpy(np.array(xs[a:b])).reshape(b - a, 1, 28, 28)
        y = torch.from_numpy(np.load(f"{npy_dir}/y.npy", mmap_mode="r")[a:b].astype(np.int64))
        model = torch_model(str(config["model"]))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
        for i in range(0, b - a, BATCH):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH]).backward()
            optimizer.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": b - a})})
        return Message(content=content, reply_to=msg)

    class CohortFedAdam(FedAdam):
        """FedAdam whose sampled nodes each train one given client of the cohort (its id in the ConfigRecord)."""

        cohort: list[int] = []  # noqa: RUF012 (set before each round)

        def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
            if len(node_ids) != len(self.cohort):
                raise RuntimeError(f"{len(node_ids)} nodes sampled for a cohort of {len(self.cohort)}")
            return [Message(content=RecordDict({"arrays": record["arrays"],
                                                "config": ConfigRecord({**record["config"], "cid": int(c)})}),
                            message_type=message_type, dst_node_id=node)
                    for node, c in zip(node_ids, self.cohort)]

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        offsets = np.load(f"{npy_dir}/offsets.npy")
        torch.manual_seed(0)
        initial = torch_model(model_name)
        arrays = ArrayRecord(initial.state_dict())
        strategy = CohortFedAdam(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cohort,
                                 min_available_nodes=cohort, eta=SERVER_LR, eta_l=CLIENT_LR, beta_1=0.9,
                                 beta_2=0.999, tau=1e-4)
        config = ConfigRecord({"lr": CLIENT_LR, "model": model_name})
        server_round = 0
        reply.write(json.dumps({"ready": True, "flwr": importlib.metadata.version("flwr"), "ray": ray.__version__,
                                "torch": torch.__version__, "params": count_params(initial)}) + "\n")
        for line in stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] != "rounds":
                raise ValueError(f"unknown command {cmd}")
            rounds = []
            for r, clients in zip(cmd["rounds"], cmd["cohorts"]):
                server_round += 1
                t0 = time.perf_counter()
                strategy.cohort = clients
                replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, config, grid))
                aggregated, _ = strategy.aggregate_train(server_round, replies)
                if aggregated is None:
                    errors = [m.error for m in replies if m.has_error()]
                    raise RuntimeError(f"Flower round {r} failed: {errors[:1]}")
                arrays = aggregated
                rounds.append({"round": r, "s": time.perf_counter() - t0,
                               "steps": sum(math.ceil((offsets[c + 1] - offsets[c]) / BATCH) for c in clients)})
            reply.write(json.dumps({"rounds": rounds}) + "\n")

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cohort,
                   backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False}})


# --------------------------------------------------------------------------- driver


def compare(workers: dict[str, Any], model: str, cohort: int, warmup: int, blocks: int, per_block: int,
            start_flower: Any) -> dict:
    """Warm-up, then blocks of `per_block` rounds rotating through the frameworks; medians and ratios."""
    total = warmup + blocks * per_block
    load0 = os.getloadavg()[0]
    fs = workers["fedstream"]
    fs_setup = fs("setup", model=model, cohort=cohort, total_rounds=total)
    params: dict[str, int] = {}
    if "pfl" in workers:
        params["pfl"] = workers["pfl"]("setup", model=model, cohort=cohort)["params"]
    cohorts = fs("cohorts", rounds=list(range(total)))["cohorts"]
    active = dict(workers)
    if start_flower is not None:
        active["flower"] = start_flower(model, cohort)
        params["flower"] = active["flower"].hello["params"]
        flower_versions = {f"flower_{k}": active["flower"].hello[k] for k in ("flwr", "ray", "torch")}

    def run(name: str, rounds: list[int]) -> list[dict[str, Any]]:
        if name != "fedstream":
            return active[name]("rounds", rounds=rounds, cohorts=[cohorts[r] for r in rounds])["rounds"]
        reply = fs("rounds", rounds=rounds, limit=False)
        if reply["new_compiles"]:
            raise RuntimeError("fedstream compiled a new shape during timing; the warm-up missed a stream length")
        return reply["rounds"]

    try:
        t0 = time.perf_counter()
        names = list(active)
        warm = {name: run(name, list(range(warmup))) for name in names}
        timed: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for b in range(blocks):
            rounds = list(range(warmup + b * per_block, warmup + (b + 1) * per_block))
            for name in names[b % len(names):] + names[:b % len(names)]:  # rotate the order each block
                timed[name] += run(name, rounds)
    finally:
        if "flower" in active and start_flower is not None:
            active["flower"].close()
    for name in names:  # same rounds, same clients, same steps
        for a, b in zip(timed["fedstream"], timed[name]):
            if a["round"] != b["round"] or a["steps"] != b["steps"] or a["clients"] != cohorts[a["round"]]:
                raise RuntimeError(f"round {a['round']}: fedstream ran {a['steps']} steps, {name} {b['steps']}")
    steps = statistics.median(r["steps"] for r in timed["fedstream"])
    out: dict[str, Any] = {
        "model": model, "clients_per_round": cohort, "timed_rounds": len(timed["fedstream"]), "blocks": blocks,
        "rounds_per_block": per_block, "warmup_rounds": warmup, "steps_per_round": steps,
        "steps": [r["steps"] for r in timed["fedstream"]], "fedstream_setup_s": fs_setup["setup_s"],
        "fedstream_compiles": fs_setup["compiles"], "peer_params": params, "elapsed_s": time.perf_counter() - t0,
        "load_average_start": load0, "load_average_end": os.getloadavg()[0], "frameworks": {},
    }
    if start_flower is not None:
        out["flower_versions"] = flower_versions
    for name in names:
        s = [r["s"] for r in timed[name]]
        # ms per local step: median over rounds of (round time / the round's steps)
        per_step = [1e3 * r["s"] / r["steps"] for r in timed[name]]
        out["frameworks"][name] = {"median_s": statistics.median(s), "ms_per_step": statistics.median(per_step),
                                   "s": s, "warmup_s": [r["s"] for r in warm[name]]}
    fs_ms = out["frameworks"]["fedstream"]["ms_per_step"]
    out["speedup"] = {name: f["ms_per_step"] / fs_ms for name, f in out["frameworks"].items() if name != "fedstream"}
    return out


def format_result(r: dict[str, Any]) -> str:
    parts = [(f"model={r['model']} clients_per_round={r['clients_per_round']} timed_rounds={r['timed_rounds']} "
              f"steps/round={r['steps_per_round']:.0f}")]
    for name, f in r["frameworks"].items():
        parts.append(f"{name}_ms/step={f['ms_per_step']:.2f}")
    for name, s in r["speedup"].items():
        parts.append(f"{name}/fedstream={s:.2f}")
    parts.append(f"load={r['load_average_start']:.1f}->{r['load_average_end']:.1f}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="create the peers' venvs and exit")
    parser.add_argument("--pfl-venv", default=str(default_venv("pfl")), help="pfl virtual environment")
    parser.add_argument("--flower-venv", default=str(default_venv("flower")), help="Flower virtual environment")
    parser.add_argument("--python", default=shutil.which("python3") or sys.executable,
                        help="interpreter for `-m venv` (--setup)")
    parser.add_argument("--peers", default="pfl,flower", help="comma-separated: pfl, flower")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--clients-per-round", default="10,50", help="comma-separated cohort sizes")
    parser.add_argument("--blocks", type=int, default=0, help="rotating blocks per configuration; 0 = 4")
    parser.add_argument("--rounds-per-block", type=int, default=0,
                        help="0 = cnn: 2 at <= 10 clients per round, else 1; mlp, logistic: 4")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="untimed rounds of each framework first")
    parser.add_argument("--flower-client-cpus", type=float, default=2.0,
                        help="CPUs per Flower ClientApp (Ray actor); 2 is Flower's default")
    parser.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "fedstream_bench"),
                        help="cache of the synthetic dataset (shared with round_efficiency.py) and its exports")
    parser.add_argument("--quick", action="store_true", help="mlp, 10 clients per round, 2 blocks of 2 rounds")
    parser.add_argument("--json", help="append one line per (model, clients per round) to this file")
    parser.add_argument("--worker", choices=("pfl", "flower"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cohort", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "pfl":
        return pfl_worker(args.data)
    if args.worker == "flower":
        return flower_worker(args.data, args.model, args.cohort, args.flower_client_cpus)
    peers = [p for p in args.peers.split(",") if p]
    if unknown := [p for p in peers if p not in PEERS]:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    venvs = {"pfl": pathlib.Path(args.pfl_venv), "flower": pathlib.Path(args.flower_venv)}
    if args.setup:
        codes = {peer: setup_venv(peer, venvs[peer], args.python) for peer in peers}
        sys.exit(max(codes.values()))
    for peer in peers:
        if not venv_python(venvs[peer]).exists():
            sys.exit(f"no {peer} venv at {venvs[peer]}; run `python benchmarks/peers_compare.py --setup` first")

    from round_efficiency import dataset_dir
    from run_info import run_info, stamp

    run_info()  # stamped with the load average at the start

    models = args.models.split(",")
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    cohorts = [int(c) for c in args.clients_per_round.split(",")]
    if args.quick:
        if args.models == parser.get_default("models"):
            models = ["mlp"]
        if args.clients_per_round == parser.get_default("clients_per_round"):
            cohorts = [10]
    start = time.perf_counter()
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    root = pathlib.Path(args.data_dir)
    dataset = dataset_dir(root)
    npz = export_npz(dataset, root / "fedjax_emnist_like.npz")
    npy = export_npy(npz) if "flower" in peers else None
    me = str(pathlib.Path(__file__).resolve())
    # No usage reports from the workers; Ray's workers at nice 0 like the other frameworks' processes (Ray
    # starts them at nice 15, which on a shared machine hands their CPU to other jobs during Flower's turn).
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")

    def start_flower(model: str, cohort: int) -> Worker:
        cmd = [str(venv_python(venvs["flower"])), me, "--worker", "flower", "--data", str(npy), "--model", model,
               "--cohort", str(cohort), "--flower-client-cpus", str(args.flower_client_cpus)]
        return Worker("flower", cmd)

    workers: dict[str, Any] = {}
    try:
        workers["fedstream"] = Worker("fedstream", [sys.executable, str(HERE / "fedjax_compare.py"), "--worker",
                                                    "fedstream", "--data", str(dataset)])
        if "pfl" in peers:
            workers["pfl"] = Worker("pfl", [str(venv_python(venvs["pfl"])), me, "--worker", "pfl", "--data",
                                            str(npz)])
        versions = {"fedstream": importlib.metadata.version("fedstream"), "jax": workers["fedstream"].hello["jax"]}
        if "pfl" in workers:
            versions |= {"pfl": workers["pfl"].hello["pfl"], "pfl_torch": workers["pfl"].hello["torch"],
                         "pfl_torch_threads": workers["pfl"].hello["torch_threads"]}
        print("versions: " + " ".join(f"{k}={v}" for k, v in versions.items()), flush=True)
        for model in models:
            for cohort in cohorts:
                blocks, per_block = default_blocks(model, cohort, args.quick)
                r = compare(workers, model, cohort, args.warmup_rounds, args.blocks or blocks,
                            args.rounds_per_block or per_block, start_flower if "flower" in peers else None)
                r["versions"] = dict(versions)
                if "flower" in peers:
                    r["flower_client_cpus"] = args.flower_client_cpus
                    r["versions"] |= r.pop("flower_versions")
                print(format_result(r), flush=True)
                if args.json:  # one line per (framework, model, clients per round), as soon as measured
                    with open(args.json, "a") as f:
                        for name, fw in r["frameworks"].items():
                            line = {"framework": name, "model": r["model"], "clients_per_round": cohort,
                                    "ms_per_step": fw["ms_per_step"],
                                    "speedup_vs_fedstream": r["speedup"].get(name),
                                    **{k: v for k, v in r.items() if k not in ("frameworks", "speedup")},
                                    "framework_result": fw, "all_ms_per_step":
                                        {n: f["ms_per_step"] for n, f in r["frameworks"].items()}}
                            f.write(json.dumps(stamp(line)) + "\n")
    finally:
        for w in workers.values():
            w.close()
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
