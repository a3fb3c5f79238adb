"""Kill-and-resume bit-identity for DP-FedAvg with Poisson sampling (the privacy ledger too) and top-k with
error feedback (residuals in the client-state store)."""

import os
import subprocess
import sys

import pytest

from fedstream.data.preprocessing import run_preprocess
from test_resume import _flatten, final_state, train_records

pytestmark = pytest.mark.slow
ROUNDS = 5


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return run_preprocess("digits", tmp_path_factory.mktemp("data") / "digits", progress=None)


def train(pipeline, workdir, digits, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "FEDSTREAM_FAULT"}
    if fault:
        env["FEDSTREAM_FAULT"] = fault
    cmd = [sys.executable, "-m", "fedstream.cli", "train", pipeline, "--workdir", str(workdir),
           f"--config.data.path={digits}", f"--config.num_rounds={ROUNDS}", "--config.eval.every=0",
           "--config.checkpoint.keep=2"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("pipeline", ["digits_dp_fedavg", "digits_topk"])
def test_kill_and_resume_is_bit_identical(tmp_path, digits, pipeline):
    full = train(pipeline, tmp_path / "full", digits)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    assert train(pipeline, killed, digits, "kill_after_round:2").returncode == -9
    assert train(pipeline, killed, digits, "kill_during_save:3").returncode == -9
    resumed = train(pipeline, killed, digits)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step_a, a = final_state(tmp_path / "full")
    step_b, b = final_state(killed)
    assert step_a == step_b == ROUNDS
    flat_a = {k: v for k, v in _flatten(a) if v is not None}
    flat_b = {k: v for k, v in _flatten(b) if v is not None}
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert (flat_a[key] == flat_b[key]).all(), key
    rows_a = [r for r in train_records(tmp_path / "full")]
    rows_b = [r for r in train_records(killed)]
    assert rows_a == rows_b  # includes dp_epsilon per round, bits_sent, cohort sizes
    if pipeline == "digits_dp_fedavg":
        sizes = {r["cohort_size"] for r in rows_a if r["kind"] == "train"}
        assert len(sizes) > 1  # Poisson: the cohort size varies
        eps = [r["dp_epsilon"] for r in rows_a if r["kind"] == "train"]
        assert all(b > a for a, b in zip(eps, eps[1:]))  # the ledger grows every round
    else:
        assert all(r["bits_sent"] > 0 for r in rows_a if r["kind"] == "train")
