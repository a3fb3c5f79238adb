"""Chaos resume: one training run SIGKILLed at many random moments ends bit-identical to an uninterrupted one.

DP-FedAvg with Poisson sampling on the embedded digits (`digits_dp_fedavg`, so
the privacy ledger is checked too), checkpoint every round. The uninterrupted
reference runs once; the chaos run is relaunched with the same command until it
finishes, each launch killed with SIGKILL at a random moment:

* timed: after a random delay from launch (start-up, restore, compilation, a round, a save, ...);
* kill_in_data: as a round asks for its data (the reader threads busy);
* kill_in_round: while a round's jitted computation runs;
* kill_during_save: right after an asynchronous checkpoint save started;
* kill_after_round: between rounds, after a committed checkpoint;

the last four through the train loop's FEDSTREAM_FAULT hook at a random round
1-3 rounds ahead of the last checkpoint. Each block of five kills uses every
kind once, in random order; a timed kill waits 0.5-20 s (start-up, restore and
compilation take most of the first ~10 s of a launch on 2 cores). At the end it compares, exactly: every array of
the final checkpoint's state, the privacy ledger in its metadata, and
metrics.jsonl without its timing fields (which must hold one train line per
round, no duplicate, no gap).

    python benchmarks/chaos_resume.py                       # 20 kills, 60 rounds (~6-10 min on 2 cores)
    python benchmarks/chaos_resume.py --kills 5 --rounds 20 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

PIPELINE = "digits_dp_fedavg"
TIMING_KEYS = {"round_seconds", "data_wait_seconds", "examples_per_second"}
HOOK_KINDS = ("kill_in_data", "kill_in_round", "kill_during_save", "kill_after_round")


def command(workdir: pathlib.Path, data: pathlib.Path, rounds: int) -> list[str]:
    return [sys.executable, "-m", "fedstream.cli", "train", PIPELINE, "--workdir", str(workdir),
            f"--config.data.path={data}", f"--config.num_rounds={rounds}", "--config.eval.every=5",
            "--config.checkpoint.every=1", "--config.checkpoint.keep=2"]


def latest_round(workdir: pathlib.Path) -> int:
    """Rounds of the newest committed checkpoint (0 if none): the directory names Orbax commits."""
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=0)


def launch(cmd: list[str], fault: str | None, kill_after: float | None, timeout: float) -> tuple[int, float]:
    """Runs one launch; returns (exit code, seconds). A timed kill sends SIGKILL after `kill_after` seconds."""
    env = dict(os.environ)
    env.pop("FEDSTREAM_FAULT", None)
    if fault:
        env["FEDSTREAM_FAULT"] = fault
    start = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            process.kill()
            raise
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
    code = process.returncode
    if code not in (0, -signal.SIGKILL):
        raise RuntimeError(f"launch failed with exit code {code}: {stderr.strip()[-2000:]}")
    return code, time.perf_counter() - start


def final_checkpoint(workdir: pathlib.Path) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """(step, flat state arrays, meta) of the newest checkpoint, restored on one CPU device."""
    import jax
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta"),
                               item_handlers=handlers) as manager:
        step = manager.latest_step()
        saved = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  meta=ocp.args.JsonRestore()))
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(restored["state"])}
    return step, flat, dict(restored["meta"])


def metric_lines(workdir: pathlib.Path) -> list[dict[str, Any]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def compare(reference: pathlib.Path, chaos: pathlib.Path, rounds: int) -> dict[str, Any]:
    """Exact comparison of the two workdirs; returns the findings (`identical` True when all agree)."""
    step_a, state_a, meta_a = final_checkpoint(reference)
    step_b, state_b, meta_b = final_checkpoint(chaos)
    differing = sorted(k for k in state_a if k not in state_b or state_a[k].dtype != state_b[k].dtype
                       or not np.array_equal(state_a[k], state_b[k]))
    lines_a, lines_b = metric_lines(reference), metric_lines(chaos)
    train_rounds = [r["round"] for r in lines_b if r["kind"] == "train"]
    findings = {
        "steps": (step_a, step_b),
        "arrays_compared": len(state_a),
        "arrays_differing": differing,
        "privacy_ledger_equal": meta_a.get("privacy") == meta_b.get("privacy") and "privacy" in meta_a,
        "final_epsilon": [r for r in lines_b if r["kind"] == "train"][-1].get("dp_epsilon"),
        "metrics_lines_equal": lines_a == lines_b,
        "one_train_line_per_round": train_rounds == list(range(1, rounds + 1)),
        "metrics_lines": len(lines_b),
    }
    findings["identical"] = (step_a == step_b == rounds and not differing and findings["privacy_ledger_equal"]
                             and findings["metrics_lines_equal"] and findings["one_train_line_per_round"])
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver before letting the run finish")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--max-delay", type=float, default=20.0, help="longest wait of a timed kill (s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="fedstream_chaos_") as tmp:
        root = pathlib.Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        from fedstream.data.preprocessing import run_preprocess

        data = run_preprocess("digits", root / "digits", progress=None)
        reference, chaos = root / "reference", root / "chaos"
        code, seconds = launch(command(reference, data, args.rounds), None, None, timeout=1800)
        print(f"uninterrupted run: {args.rounds} rounds in {seconds:.1f} s (exit {code})", flush=True)
        kinds = [k for _ in range(args.kills // 5 + 1) for k in rng.sample(("timed",) + HOOK_KINDS, 5)]

        kills: collections.Counter[str] = collections.Counter()
        progress = []
        launches = 0
        while True:
            launches += 1
            done = latest_round(chaos)
            fault, kill_after, what = None, None, "finish"
            if sum(kills.values()) < args.kills:
                kind = kinds[sum(kills.values())]
                if kind == "timed":
                    kill_after = rng.uniform(0.5, args.max_delay)
                    what = f"timed {kill_after:.1f} s"
                else:
                    target = rng.randint(done + 1, min(done + 3, args.rounds))
                    fault, what = f"{kind}:{target}", f"{kind}:{target}"
            code, seconds = launch(command(chaos, data, args.rounds), fault, kill_after, timeout=1800)
            after = latest_round(chaos)
            killed = code == -signal.SIGKILL
            if killed:
                kills[what.split(" ")[0].split(":")[0]] += 1
            progress.append((what, done, after, killed))
            print(f"launch {launches:2d}: {what:24s} checkpoint {done:2d} -> {after:2d} "
                  f"{'KILLED' if killed else 'finished'} after {seconds:.1f} s", flush=True)
            if not killed:
                break

        findings = compare(reference, chaos, args.rounds)
        print(f"kills delivered: {sum(kills.values())} ({', '.join(f'{k} {v}' for k, v in sorted(kills.items()))}); "
              f"launches: {launches}", flush=True)
        for key, value in findings.items():
            print(f"  {key}: {value}", flush=True)
        print("RESULT: bit-identical" if findings["identical"] else "RESULT: DIFFERENT", flush=True)
        return 0 if findings["identical"] and sum(kills.values()) >= args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
