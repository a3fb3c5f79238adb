"""Two local processes × 2 CPU devices on jax.distributed (gloo) against one process × 4 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from support import final_state, flatten_tree, train_records

ROUNDS = 4
ARGS = [f"--config.num_rounds={ROUNDS}", "--config.eval.every=2", "--config.clients_per_round=12",
        "--config.server.optimizer=adam", "--config.server.learning_rate=0.01"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDSTREAM_FAULT", "XLA_FLAGS")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if fault:
        env["FEDSTREAM_FAULT"] = fault
    return env


def _cmd(workdir, digits):
    return [sys.executable, "-m", "fedstream.cli", "train", "digits_fedavg", "--workdir", str(workdir),
            f"--config.data.path={digits}", *ARGS]


def run_single(workdir, digits):
    result = subprocess.run(_cmd(workdir, digits), env=_env(4), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def run_pair(workdir, digits, fault=None):
    """Launches processes 0 and 1 (2 devices each) and returns their exit codes and stderr."""
    port = _free_port()
    procs = [subprocess.Popen(_cmd(workdir, digits) + ["--coordinator-address", f"127.0.0.1:{port}",
                                                       "--num-processes", "2", "--process-id", str(i)],
                              env=_env(2, fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outs]


def _params(workdir):
    step, state = final_state(workdir)
    return step, {k: np.asarray(v) for k, v in flatten_tree(state) if v is not None}


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, digits):
    workdir = tmp_path_factory.mktemp("pair")
    codes, errs = run_pair(workdir, digits)
    assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    return workdir


def test_two_processes_match_one_process_of_four_devices(tmp_path, digits, pair_run):
    run_single(tmp_path / "single", digits)
    step_a, a = _params(tmp_path / "single")
    step_b, b = _params(pair_run)
    assert step_a == step_b == ROUNDS and a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Metrics come from process 0 only: one line per round and eval, as in the single-process run.
    single, pair = train_records(tmp_path / "single"), train_records(pair_run)
    assert [(r["round"], r["kind"]) for r in single] == [(r["round"], r["kind"]) for r in pair]
    for x, y in zip(single, pair):
        for k in ("loss", "accuracy"):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-4


def test_kill_both_processes_and_relaunch_is_bit_identical(tmp_path, digits, pair_run):
    workdir = tmp_path / "killed"
    codes, _ = run_pair(workdir, digits, fault="kill_after_round:2")
    assert codes == [-9, -9]
    step, _ = final_state(workdir)
    assert step == 2
    codes, errs = run_pair(workdir, digits)
    assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    step_a, a = _params(pair_run)
    step_b, b = _params(workdir)
    assert step_a == step_b == ROUNDS
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key} differs after the relaunch"
    assert train_records(pair_run) == train_records(workdir)
