"""The workdir lock: one run per workdir, released by the kernel when its owner dies (even by SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fedstream.training.lock import LOCK_FILE, WorkdirLock, WorkdirLockedError, locked_workdir
from support import run_cli

HOLDER = textwrap.dedent("""
    import sys, time
    from fedstream.training.lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")
TRY = textwrap.dedent("""
    import sys
    from fedstream.training.lock import WorkdirLock, WorkdirLockedError
    try:
        WorkdirLock(sys.argv[1]).acquire()
    except WorkdirLockedError as e:
        print(e)
        sys.exit(3)
    print("acquired")
""")


def _python(code, *args, **kwargs):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of tmp_path / 'run'; yields (process, workdir)."""
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process, workdir
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_second_process_is_refused_and_sigkill_releases(holder):
    process, workdir = holder
    refused = _python(TRY, workdir)
    assert refused.returncode == 3, refused.stderr
    message = refused.stdout.strip()
    assert "\n" not in message
    assert str(workdir) in message and f"pid {process.pid}" in message and "in use" in message

    process.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
    assert process.wait(timeout=30) == -signal.SIGKILL
    owner = json.loads((workdir / LOCK_FILE).read_text())  # the dead owner's record is still in the file
    assert owner["pid"] == process.pid
    taken = _python(TRY, workdir)
    assert taken.returncode == 0 and taken.stdout.strip() == "acquired", taken.stdout + taken.stderr


def test_in_process_exclusive_release_and_reacquire(tmp_path):
    first = WorkdirLock(tmp_path / "w").acquire()
    with pytest.raises(WorkdirLockedError, match="this very process"):
        WorkdirLock(tmp_path / "w").acquire()
    first.release()
    assert (tmp_path / "w" / LOCK_FILE).read_text() == ""  # owner record cleared on release
    with WorkdirLock(tmp_path / "w") as again:
        assert again.held
    assert not again.held
    WorkdirLock(tmp_path / "w").acquire().release()


def test_disabled_lock_takes_nothing(tmp_path):
    """Processes other than 0 of a multi-process run share process 0's workdir without locking."""
    with WorkdirLock(tmp_path / "w"):
        with WorkdirLock(tmp_path / "w", enabled=False) as other:
            assert not other.held


def test_decorator_locks_the_workdir_argument(tmp_path):
    seen = []

    @locked_workdir
    def run(config, workdir, log=print):
        seen.append(os.path.exists(os.path.join(workdir, LOCK_FILE)))
        with pytest.raises(WorkdirLockedError):
            WorkdirLock(workdir).acquire()
        return "done"

    assert run.fedstream_locks_workdir
    assert run(None, workdir=tmp_path / "a") == "done"
    assert run(None, tmp_path / "a") == "done"  # released after each call
    assert seen == [True, True]
    with pytest.raises(TypeError, match="workdir"):
        locked_workdir(lambda path: None)


def test_fedstream_train_refuses_a_busy_workdir(holder):
    process, workdir = holder  # the lock is held by another process
    result = run_cli("train", "digits_fedavg", "--workdir", workdir, "--config.num_rounds=1",
                     f"--config.data.path={workdir.parent / 'no_data'}", "--config.data.recipe=")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(workdir) in lines[0] and f"pid {process.pid}" in lines[0], result.stderr
    assert not (workdir / "checkpoints").exists()  # refused before touching anything
