"""Kill-and-resume with real processes: SIGKILL, relaunch, bit-identical end state."""

import shutil
import signal

import pytest

from support import assert_bit_identical, run_cli, run_cli_process, train_records

ROUNDS = 5
BASE = ["--config.num_rounds=%d" % ROUNDS, "--config.model.name=cnn", "--config.eval.every=2",
        "--config.server.optimizer=adam", "--config.server.learning_rate=0.01", "--config.checkpoint.keep=2"]


def train_args(workdir, digits, *extra):
    return ["train", "digits_fedavg", "--workdir", str(workdir), f"--config.data.path={digits}", *BASE, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*train_args(workdir, digits))
    assert result.returncode == 0, result.stderr
    return workdir


# A kill during the async save is also among the kills of tests/test_chaos.py (slow); here it is slow-marked too.
@pytest.mark.parametrize("fault", ["kill_after_round:2", pytest.param("kill_during_save:3", marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, digits, uninterrupted, fault):
    killed = run_cli_process(*train_args(tmp_path, digits), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli(*train_args(tmp_path, digits))  # the relaunch need not be a process of its own
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert_bit_identical(uninterrupted, tmp_path, ROUNDS)


def test_changed_config_is_refused_and_num_rounds_can_grow(tmp_path, digits, uninterrupted):
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    refused = run_cli(*train_args(tmp_path, digits, "--config.client.learning_rate=0.5"))
    assert refused.returncode == 2
    assert "'client.learning_rate'" in refused.stderr
    extended = run_cli(*train_args(tmp_path, digits, f"--config.num_rounds={ROUNDS + 2}"))
    assert extended.returncode == 0, extended.stderr
    assert f"after round {ROUNDS}" in extended.stdout
    rounds = [r["round"] for r in train_records(tmp_path) if r["kind"] == "train"]
    assert rounds == list(range(1, ROUNDS + 3))
