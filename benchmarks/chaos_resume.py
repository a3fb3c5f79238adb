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
compilation take most of the first ~10 s of a launch on 2 cores).

Every launch but the last is killed, on any machine: the hook kills are placed
by events (a round), not by time, and a timed launch also carries a
kill_after_round hook at a later round as a backstop, which kills it if the run
gets there before its timer (reported as a backstop, not as a timed kill). So
the number of kills is exactly --kills, each hook kind is delivered as
scheduled, and the run never finishes early; how many timed kills land before
their backstop depends on the machine's speed and is only reported. Hook rounds
leave one round for every later kill, so all of them fit in --rounds.

At the end it compares, exactly: every array of the final checkpoint's state,
the privacy ledger in its metadata, and metrics.jsonl without its timing fields
(which must hold one train line per round, no duplicate, no gap). The last line
printed is `SUMMARY {json}` (kills scheduled and delivered per kind, launches,
the result); the exit code is 0 only when the end state is bit-identical and
every scheduled kill was delivered.

    python benchmarks/chaos_resume.py                       # 20 kills, 60 rounds (~6-10 min on 2 cores)
    python benchmarks/chaos_resume.py --kills 5 --rounds 20 --seed 1
    python benchmarks/chaos_resume.py --kills 8 --rounds 30 --seed 3 --max-delay 10 --reference-alongside  # the test
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
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
KINDS = ("timed",) + HOOK_KINDS
BACKSTOP = "timed_backstop"  # a timed launch killed by its kill_after_round backstop before its timer


def command(workdir: pathlib.Path, data: pathlib.Path, rounds: int) -> list[str]:
    """The training command, the same for every launch of a run."""
    return [sys.executable, "-m", "fedstream.cli", "train", PIPELINE, "--workdir", str(workdir),
            f"--config.data.path={data}", f"--config.num_rounds={rounds}", "--config.eval.every=5",
            "--config.checkpoint.every=1", "--config.checkpoint.keep=2"]


def latest_round(workdir: pathlib.Path) -> int:
    """Rounds of the newest committed checkpoint (0 if none): the directory names Orbax commits."""
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=0)


def launch(cmd: list[str], fault: str | None, kill_after: float | None,
           timeout: float) -> tuple[int, float, bool]:
    """Runs one launch with FEDSTREAM_FAULT=`fault` (if any); returns (exit code, seconds, timer fired).

    A timed kill sends SIGKILL after `kill_after` seconds unless the process has ended by then.
    """
    env = dict(os.environ)
    env.pop("FEDSTREAM_FAULT", None)
    if fault:
        env["FEDSTREAM_FAULT"] = fault
    start = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=kill_after if kill_after is not None else timeout)
        timer = False
    except subprocess.TimeoutExpired:
        if kill_after is None:
            process.kill()
            raise
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        timer = True
    code = process.returncode
    if code not in (0, -signal.SIGKILL):
        raise RuntimeError(f"launch failed with exit code {code}: {stderr.strip()[-2000:]}")
    return code, time.perf_counter() - start, timer


def kill_schedule(kills: int, rng: random.Random) -> list[str]:
    """The kind of each kill: blocks of five, every kind once per block in random order."""
    return [k for _ in range(kills // len(KINDS) + 1) for k in rng.sample(KINDS, len(KINDS))][:kills]


def place_kill(kind: str, done: int, later: int, rounds: int, max_delay: float,
               rng: random.Random) -> tuple[str, float | None]:
    """(FEDSTREAM_FAULT value, timer seconds or None) of one kill, `done` rounds checkpointed, `later` kills to come.

    A hook kill goes 1-3 rounds past the checkpoint; a timed kill gets a random
    delay and a kill_after_round backstop that leaves 3 rounds for each later
    kill where it can. Neither goes past round `rounds - later`, so every later
    kill still has a round ahead of the checkpoint.
    """
    ceiling = rounds - later
    if kind == "timed":
        return f"kill_after_round:{min(ceiling, max(done + 1, rounds - 3 * later))}", rng.uniform(0.5, max_delay)
    return f"{kind}:{rng.randint(done + 1, min(done + 3, ceiling))}", None


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
    """metrics.jsonl of a run, without the timing fields."""
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


def chaos_launches(chaos: pathlib.Path, data: pathlib.Path, rounds: int, kinds: list[str], max_delay: float,
                   rng: random.Random) -> tuple[collections.Counter[str], int, bool]:
    """Relaunches the chaos run until it finishes, one kill of `kinds` per launch.

    Returns (kills delivered per kind, launches, whether the newest
    checkpoint never went back); a timed launch killed by its backstop counts
    as BACKSTOP.
    """
    delivered: collections.Counter[str] = collections.Counter()
    never_went_back = True
    launches = 0
    while True:
        launches += 1
        done = latest_round(chaos)
        index = sum(delivered.values())  # every earlier launch was killed
        kind = kinds[index] if index < len(kinds) else "finish"
        fault, kill_after = (None, None) if kind == "finish" else place_kill(
            kind, done, len(kinds) - index - 1, rounds, max_delay, rng)
        what = f"timed {kill_after:.1f} s, backstop {fault.partition(':')[2]}" if kind == "timed" else fault or kind
        code, seconds, timer = launch(command(chaos, data, rounds), fault, kill_after, timeout=1800)
        after = latest_round(chaos)
        never_went_back &= after >= done
        killed = code == -signal.SIGKILL
        if killed:
            delivered[("timed" if timer else BACKSTOP) if kind == "timed" else kind] += 1
        outcome = f"KILLED ({'timer' if timer else 'hook'})" if killed else "finished"
        print(f"launch {launches:2d}: {what:32s} checkpoint {done:2d} -> {after:2d} {outcome} after {seconds:.1f} s",
              flush=True)
        if not killed:
            return delivered, launches, never_went_back


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; 0 when the end state is bit-identical and every scheduled kill was delivered."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver before letting the run finish")
    parser.add_argument("--rounds", type=int, default=60, help="rounds of the run (at least --kills)")
    parser.add_argument("--max-delay", type=float, default=20.0, help="longest wait of a timed kill (s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--reference-alongside", action="store_true",
                        help="run the uninterrupted reference at the same time as the chaos launches (sooner done "
                             "on 2+ cores; the seconds printed are then not those of a machine to itself)")
    args = parser.parse_args(argv)
    if not 0 <= args.kills <= args.rounds:
        parser.error(f"--kills must be 0 to --rounds ({args.rounds}): each kill needs a round ahead of the last "
                     "checkpoint")
    rng = random.Random(args.seed)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fedstream_chaos_") as tmp:
        root = pathlib.Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        from fedstream.data.preprocessing import run_preprocess

        data = run_preprocess("digits", root / "digits", progress=None)
        reference, chaos = root / "reference", root / "chaos"
        kinds = kill_schedule(args.kills, rng)

        def report(code: int, seconds: float, _: bool) -> None:
            alongside = ", alongside the chaos launches" if args.reference_alongside else ""
            print(f"uninterrupted run: {args.rounds} rounds in {seconds:.1f} s (exit {code}){alongside}", flush=True)

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # its exit waits for the reference
            uninterrupted = pool.submit(launch, command(reference, data, args.rounds), None, None, timeout=1800)
            if not args.reference_alongside:
                report(*uninterrupted.result())
            delivered, launches, never_went_back = chaos_launches(chaos, data, args.rounds, kinds, args.max_delay,
                                                                  rng)
            if args.reference_alongside:
                report(*uninterrupted.result())

        findings = compare(reference, chaos, args.rounds)
        findings["checkpoint_never_went_back"] = never_went_back
        scheduled = collections.Counter(kinds)
        all_delivered = (sum(delivered.values()) == len(kinds) == launches - 1
                         and all(delivered[k] == scheduled[k] for k in HOOK_KINDS)
                         and delivered["timed"] + delivered[BACKSTOP] == scheduled["timed"])
        print(f"kills delivered: {sum(delivered.values())} of {len(kinds)} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(delivered.items()))}); launches: {launches}; "
              f"timed kills that landed before their backstop: {delivered['timed']} of {scheduled['timed']}",
              flush=True)
        for key, value in findings.items():
            print(f"  {key}: {value}", flush=True)
        identical = findings["identical"] and never_went_back
        print("RESULT: bit-identical" if identical else "RESULT: DIFFERENT", flush=True)
        summary = {"kills_scheduled": len(kinds), "kills_delivered": sum(delivered.values()),
                   "scheduled": dict(sorted(scheduled.items())), "delivered": dict(sorted(delivered.items())),
                   "all_delivered": all_delivered, "launches": launches, "rounds": args.rounds,
                   "identical": identical, "seconds": round(time.perf_counter() - started, 1)}
        print(f"SUMMARY {json.dumps(summary)}", flush=True)
        return 0 if identical and all_delivered else 1


if __name__ == "__main__":
    sys.exit(main())
