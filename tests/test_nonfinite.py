"""NaN policy end to end: 'stop' names the round and client; a diverged evaluation stops with the last checkpoint intact."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fedstream.data.preprocessing import run_preprocess


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return run_preprocess("digits", tmp_path_factory.mktemp("data") / "digits", progress=None)


def train(workdir, digits, *extra):
    cmd = [sys.executable, "-m", "fedstream.cli", "train", "digits_fedavg", "--workdir", str(workdir),
           f"--config.data.path={digits}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "FEDSTREAM_FAULT"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_stop_policy_names_round_and_client(tmp_path, digits):
    result = train(tmp_path / "w", digits, "--config.num_rounds=3", "--config.client.learning_rate=1e30",
                   "--config.nonfinite=stop")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "round 1: client 'client_" in line and "non-finite" in line and "no checkpoint was saved yet" in line


def test_skip_policy_counts_and_continues(tmp_path, digits):
    """lr 1e30 makes about half the clients' updates overflow: they are skipped and counted, and the
    round's train metrics come from the others (finite)."""
    result = train(tmp_path / "w", digits, "--config.num_rounds=1", "--config.client.learning_rate=1e30")
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["kind"] == "train" and 0 < first["nonfinite_clients_skipped"] < first["clients"]
    assert first["loss"] is not None  # written as null when not finite
    # The surviving clients' huge updates then make the model diverge: the evaluation stops the run.
    assert result.returncode == 2 and "diverged" in result.stderr


def test_diverged_evaluation_stops_and_keeps_last_good_checkpoint(tmp_path, digits):
    result = train(tmp_path / "w", digits, "--config.num_rounds=4", "--config.eval.every=2",
                   "--config.server.learning_rate=1e30")
    assert result.returncode == 2
    assert "evaluation after round 2" in result.stderr and "checkpoint of round 1 is intact" in result.stderr
    assert sorted(p.name for p in (pathlib.Path(tmp_path) / "w" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
