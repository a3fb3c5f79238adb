"""Kill-and-resume with real processes: SIGKILL, relaunch, bit-identical end state."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedstream.data.preprocessing import run_preprocess

ROUNDS = 5
BASE = ["--config.num_rounds=%d" % ROUNDS, "--config.model.name=cnn", "--config.eval.every=2",
        "--config.server.optimizer=adam", "--config.server.learning_rate=0.01", "--config.checkpoint.keep=2"]
TIMING_KEYS = {"round_seconds", "data_wait_seconds", "examples_per_second"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return run_preprocess("digits", tmp_path_factory.mktemp("data") / "digits", progress=None)


def train(workdir, digits, *extra, fault=None):
    env = dict(os.environ)
    env.pop("FEDSTREAM_FAULT", None)
    if fault:
        env["FEDSTREAM_FAULT"] = fault
    cmd = [sys.executable, "-m", "fedstream.cli", "train", "digits_fedavg", "--workdir", str(workdir),
           f"--config.data.path={digits}", *BASE, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def final_state(workdir):
    """The latest checkpoint's state, restored onto this process's first device (whatever
    device or process count saved it)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints", item_names=("state",),
                               item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
        step = manager.latest_step()
        saved = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return step, restored["state"]


def train_records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_bit_identical(a, b):
    step_a, state_a = final_state(a)
    step_b, state_b = final_state(b)
    assert step_a == step_b == ROUNDS
    flat_a = {k: np.asarray(v) for k, v in _flatten(state_a)}
    flat_b = {k: np.asarray(v) for k, v in _flatten(state_b)}
    assert flat_a.keys() == flat_b.keys() and len(flat_a) > 5
    for key in flat_a:
        assert flat_a[key].dtype == flat_b[key].dtype
        assert np.array_equal(flat_a[key], flat_b[key]), f"{key} differs after resume"
    assert train_records(a) == train_records(b)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train(workdir, digits)
    assert result.returncode == 0, result.stderr
    return workdir


# A kill during the async save is also among the 8 kills of tests/test_chaos.py (slow); here it is slow-marked
# too, to keep the default run near 10 minutes.
@pytest.mark.parametrize("fault", ["kill_after_round:2", pytest.param("kill_during_save:3", marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, digits, uninterrupted, fault):
    killed = train(tmp_path, digits, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = train(tmp_path, digits)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert_bit_identical(uninterrupted, tmp_path)


def test_changed_config_is_refused_and_num_rounds_can_grow(tmp_path, digits, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    refused = train(tmp_path, digits, "--config.client.learning_rate=0.5")
    assert refused.returncode == 2
    assert "'client.learning_rate'" in refused.stderr
    extended = train(tmp_path, digits, f"--config.num_rounds={ROUNDS + 2}")
    assert extended.returncode == 0, extended.stderr
    assert f"after round {ROUNDS}" in extended.stdout
    rounds = [r["round"] for r in train_records(tmp_path) if r["kind"] == "train"]
    assert rounds == list(range(1, ROUNDS + 3))
