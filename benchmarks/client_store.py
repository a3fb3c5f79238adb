"""Cost of the per-client state store (SCAFFOLD's c_i, Ditto's personal models, ...) per round.

For each population size and state size, simulates rounds of a stateful
algorithm on the host: read the cohort's states, write the trained clients'
new states (one file per round), note the committed checkpoint, collect
garbage (checkpoints kept: 3). Reports medians over the timed rounds, the
store's size on disk at the end, and the index size that goes into every
checkpoint.

    python benchmarks/client_store.py                      # 3,400 and 100,000 clients; dense 2x200 and CNN states
    python benchmarks/client_store.py --populations 3400 --rounds 20 --cohort 10
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import numpy as np

from fedstream.training.client_store import ClientStateStore

# Parameter counts of one client state shaped like the model (float32).
STATE_SIZES = {"mlp_2x200": 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62,  # 199,262
               "emnist_cnn": 1_206_590}


def simulate(population: int, state_floats: int, cohort: int, rounds: int, warmup: int, keep: int,
             seed: int = 0) -> dict[str, float]:
    """Times read/write/garbage collection of `rounds` rounds after `warmup` untimed ones."""
    directory = tempfile.mkdtemp(prefix="fedstream_store_")
    try:
        store = ClientStateStore(directory, {"c": np.zeros(state_floats, np.float32)}, population)
        rng = np.random.default_rng(seed)
        read_s, write_s, gc_s = [], [], []
        committed: list[int] = []
        for r in range(1, warmup + rounds + 1):
            clients = rng.choice(population, cohort, replace=False)
            t0 = time.perf_counter()
            states = store.read(clients)
            t1 = time.perf_counter()
            states["c"] += 1.0  # the round's "update"
            store.write(r, clients, np.ones(cohort, bool), states)
            t2 = time.perf_counter()
            store.note_committed(r, store.index())
            committed = (committed + [r])[-keep:]
            store.collect_garbage(committed)
            t3 = time.perf_counter()
            if r > warmup:
                read_s.append(t1 - t0)
                write_s.append(t2 - t1)
                gc_s.append(t3 - t2)
        disk = sum(p.stat().st_size for p in store.directory.iterdir())
        store.close()
        total = [a + b + c for a, b, c in zip(read_s, write_s, gc_s)]
        moved = 2 * cohort * state_floats * 4
        return {"read_ms": 1e3 * statistics.median(read_s), "write_ms": 1e3 * statistics.median(write_s),
                "gc_ms": 1e3 * statistics.median(gc_s), "round_ms": 1e3 * statistics.median(total),
                "mb_per_s": moved / 1e6 / statistics.median(total), "disk_mb": disk / 1e6,
                "index_kb": 2 * 4 * population / 1e3}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", default="3400,100000", help="comma-separated client counts")
    parser.add_argument("--states", default=",".join(STATE_SIZES), help=f"comma-separated: {', '.join(STATE_SIZES)}")
    parser.add_argument("--cohort", type=int, default=50, help="clients per round")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--keep", type=int, default=3, help="committed checkpoints kept")
    args = parser.parse_args()
    for population in (int(p) for p in args.populations.split(",")):
        for name in args.states.split(","):
            floats = STATE_SIZES[name]
            result = simulate(population, floats, args.cohort, args.rounds, args.warmup, args.keep)
            print(f"population={population} state={name} state_mb={floats * 4 / 1e6:.2f} cohort={args.cohort} "
                  + " ".join(f"{k}={v:.1f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
