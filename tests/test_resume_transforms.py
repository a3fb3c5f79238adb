"""Kill-and-resume bit-identity for DP-FedAvg with Poisson sampling (the privacy ledger too), top-k with
error feedback (residuals in the client-state store), APFL (personal models and alpha_i in the store), and the
simulated clock, synchronous (over-selection, deadline) and asynchronous (FedBuff's schedule and version ring)."""

import pytest

from support import assert_bit_identical, run_cli, run_cli_process, train_records

pytestmark = pytest.mark.slow
ROUNDS = 5


def train_args(pipeline, workdir, digits):
    return ["train", pipeline, "--workdir", str(workdir), f"--config.data.path={digits}",
            f"--config.num_rounds={ROUNDS}", "--config.eval.every=0", "--config.checkpoint.keep=2"]


@pytest.mark.parametrize("pipeline", ["digits_dp_fedavg", "digits_topk", "digits_apfl", "digits_fedavg_clock",
                                      "digits_fedbuff"])
def test_kill_and_resume_is_bit_identical(tmp_path, digits, pipeline):
    full = run_cli(*train_args(pipeline, tmp_path / "full", digits))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    assert run_cli_process(*train_args(pipeline, killed, digits), fault="kill_after_round:2").returncode == -9
    assert run_cli_process(*train_args(pipeline, killed, digits), fault="kill_during_save:3").returncode == -9
    resumed = run_cli(*train_args(pipeline, killed, digits))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bit_identical(tmp_path / "full", killed, ROUNDS)  # params, ledger/residual state, metrics lines
    rows = [r for r in train_records(tmp_path / "full") if r["kind"] == "train"]
    if pipeline == "digits_dp_fedavg":
        assert len({r["cohort_size"] for r in rows}) > 1  # Poisson: the cohort size varies
        eps = [r["dp_epsilon"] for r in rows]
        assert all(b > a for a, b in zip(eps, eps[1:]))  # the ledger grows every round
    elif pipeline == "digits_topk":
        assert all(r["bits_sent"] > 0 for r in rows)
    elif pipeline == "digits_apfl":
        assert all(0.0 <= r["apfl_alpha_mean"] <= 1.0 for r in rows)
    else:  # on the simulated clock: time moves forward every round (server step)
        times = [r["simulated_time"] for r in rows]
        assert all(b > a for a, b in zip(times, times[1:]))
        if pipeline == "digits_fedbuff":
            assert any(r["staleness_max"] > 0 for r in rows)  # clients started from older versions
