"""NaN policy end to end: 'stop' names the round and client; a diverged evaluation stops with the last checkpoint intact."""

import json
import pathlib

from support import run_cli


def train(workdir, digits, *extra):
    return run_cli("train", "digits_fedavg", "--workdir", workdir, f"--config.data.path={digits}", *extra)


def test_stop_policy_names_round_and_client(tmp_path, digits):
    result = train(tmp_path / "w", digits, "--config.num_rounds=3", "--config.client.learning_rate=1e30",
                   "--config.nonfinite=stop")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "round 1: client 'client_" in line and "non-finite" in line and "no checkpoint was saved yet" in line


def test_skip_policy_counts_and_continues(tmp_path, digits):
    """lr 1e30 makes about half the clients' updates overflow: they are skipped and counted (`clients`
    counts only the others), and the round's train metrics come from the others (finite)."""
    result = train(tmp_path / "w", digits, "--config.num_rounds=1", "--config.client.learning_rate=1e30")
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["kind"] == "train" and first["nonfinite_clients_skipped"] > 0 and first["clients"] > 0
    assert first["clients"] + first["nonfinite_clients_skipped"] == 10  # the cohort
    assert first["loss"] is not None  # written as null when not finite
    # The surviving clients' huge updates then make the model diverge: the evaluation stops the run.
    assert result.returncode == 2 and "diverged" in result.stderr


def test_diverged_model_stops_and_keeps_last_good_checkpoint(tmp_path, digits):
    """Server lr 1e30: the model after round 1 is huge, so round 2's clients all overflow. The run stops at
    round 2, before its evaluation, with round 1's checkpoint intact (a diverged evaluation alone stops it
    too: test_skip_policy_counts_and_continues)."""
    result = train(tmp_path / "w", digits, "--config.num_rounds=4", "--config.eval.every=2",
                   "--config.server.learning_rate=1e30")
    assert result.returncode == 2
    assert "round 2: all 10 clients sent non-finite" in result.stderr
    assert "checkpoint of round 1 is intact" in result.stderr
    assert sorted(p.name for p in (pathlib.Path(tmp_path) / "w" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
