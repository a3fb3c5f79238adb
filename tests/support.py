"""Shared test helpers: in-memory client sources, NumPy maths, running the CLI, reading workdirs."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from fedstream.data.format import FeatureSpec


class InMemorySource:
    """Clients held in memory with the reader's interface (client_sizes, get_client, schema)."""

    def __init__(self, sizes, input_shape=(8, 8, 1), num_classes=10, seed=0):
        rng = np.random.default_rng(seed)
        self.schema = {"x": FeatureSpec("float32", tuple(input_shape)), "y": FeatureSpec("int32", ())}
        self.clients = [
            {"x": rng.normal(size=(int(n), *input_shape)).astype(np.float32),
             "y": rng.integers(0, num_classes, int(n)).astype(np.int32)}
            for n in sizes
        ]

    def client_sizes(self, split):
        return np.array([len(c["y"]) for c in self.clients], np.int64)

    def get_client(self, split, client):
        return self.clients[int(client)]


class SplitSource:
    """In-memory clients in named splits, each with an id (`FederatedDataset`'s client_ids, client_sizes, get_client).

    `splits` maps a split name to `{client_id: num_examples}`; the same id in
    two splits is the same client (e.g. its train and test data).
    """

    def __init__(self, splits, input_shape=(8, 8, 1), num_classes=10, seed=0):
        rng = np.random.default_rng(seed)
        self.schema = {"x": FeatureSpec("float32", tuple(input_shape)), "y": FeatureSpec("int32", ())}
        self.ids = {name: np.array(list(sizes), dtype=str) for name, sizes in splits.items()}
        self.data = {
            name: [{"x": rng.normal(size=(int(n), *input_shape)).astype(np.float32),
                    "y": rng.integers(0, num_classes, int(n)).astype(np.int32)} for n in sizes.values()]
            for name, sizes in splits.items()
        }

    def client_ids(self, split):
        return self.ids[split]

    def client_sizes(self, split):
        return np.array([len(c["y"]) for c in self.data[split]], np.int64)

    def get_client(self, split, client):
        if isinstance(client, str):
            client = self.ids[split].tolist().index(client)
        return self.data[split][int(client)]


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in NumPy (the references' float64 maths)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- runs and their workdirs --------------------------------------------------------------------------------------

TIMING_KEYS = {"round_seconds", "data_wait_seconds", "examples_per_second"}


@dataclasses.dataclass
class CliResult:
    """What a `fedstream` command returned and printed."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Runs `fedstream ARGS` in this process (the CLI's exit code, stdout and stderr).

    For everything but what needs a process of its own (SIGKILL, locks held by another process,
    multi-process runs, Ctrl-C): those tests start `python -m fedstream.cli` themselves.
    """
    from fedstream import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse errors, --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return CliResult(int(code), out.getvalue(), err.getvalue())


def run_cli_process(*args: str, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m fedstream.cli ARGS` as a process of its own (optionally with a FEDSTREAM_FAULT kill point)."""
    env = {k: v for k, v in os.environ.items() if k != "FEDSTREAM_FAULT"}
    if fault:
        env["FEDSTREAM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fedstream.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def final_state(workdir: str | os.PathLike) -> tuple[int, dict]:
    """The latest checkpoint's step and state, restored onto this process's first device (whatever
    device or process count saved it)."""
    import jax
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints", item_names=("state",),
                               item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
        step = manager.latest_step()
        saved = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return step, restored["state"]


def flatten_tree(tree, prefix: str = ""):
    """(path, leaf) pairs of nested dicts and sequences, paths like `/params/Dense_0/kernel`."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten_tree(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from flatten_tree(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def train_records(workdir: str | os.PathLike) -> list[dict]:
    """The run's metrics.jsonl lines without the wall-clock timings."""
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_bit_identical(a: str | os.PathLike, b: str | os.PathLike, rounds: int) -> None:
    """Both workdirs end at `rounds` with bit-identical states and the same metrics lines (timings aside)."""
    step_a, state_a = final_state(a)
    step_b, state_b = final_state(b)
    assert step_a == step_b == rounds
    flat_a = {k: np.asarray(v) for k, v in flatten_tree(state_a) if v is not None}
    flat_b = {k: np.asarray(v) for k, v in flatten_tree(state_b) if v is not None}
    assert flat_a.keys() == flat_b.keys() and len(flat_a) > 1
    for key in flat_a:
        assert flat_a[key].dtype == flat_b[key].dtype
        assert np.array_equal(flat_a[key], flat_b[key]), f"{key} differs after resume"
    assert train_records(a) == train_records(b)
