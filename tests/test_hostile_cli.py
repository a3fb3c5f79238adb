"""Hostile inputs at the CLI's edge (issue 16): every failure is one stderr line and exit status 2 (130 for Ctrl-C),
sizes are checked before work, an unexpected error leaves its traceback in a file, and nothing is half-written.

The Python API is unchanged: it raises (checked here too).
"""

import builtins
import errno
import io
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from fedstream.config import BATCH_SIZE_MAX, ConfigError, SEED_MAX, load_config, validate_train_config
from fedstream.data.preprocessing import run_preprocess
from fedstream.training import limits
from support import run_cli

QUICK = ["--config.num_rounds=1", "--config.eval.every=0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return run_preprocess("digits", tmp_path_factory.mktemp("data") / "digits", progress=None)


def train_args(digits, workdir, *extra):
    return ["train", "digits_fedavg", "--workdir", str(workdir), f"--config.data.path={digits}", *QUICK, *extra]


def one_error_line(result, *fragments):
    """The result is exit status 2 with exactly one stderr line, 'fedstream: error: ...', holding `fragments`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedstream: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def nothing_trained(workdir: pathlib.Path) -> None:
    """No committed checkpoint and no metrics line in `workdir` (if it exists at all)."""
    checkpoints = workdir / "checkpoints"
    assert not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()))
    metrics = workdir / "metrics.jsonl"
    assert not (metrics.is_file() and metrics.stat().st_size)


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(dir)`: writes under `dir` fail with EROFS ("Read-only file system"), as on a read-only mount
    (tests run as root, where permission bits do not stop a write)."""
    roots: list[str] = []
    real_mkdir, real_os_open, real_open = os.mkdir, os.open, io.open

    def refused(path, writing) -> bool:
        if not writing or not isinstance(path, (str, os.PathLike)):
            return False
        p = os.path.abspath(os.fspath(path))
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def mkdir(path, *a, **k):
        if refused(path, True) and not os.path.lexists(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *a, **k)

    def os_open(path, flags, *a, **k):
        if refused(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        if refused(file, any(c in mode for c in "wax+")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    return lambda directory: roots.append(os.path.abspath(directory))


# --- the filesystem refusing: one line, exit 2 -------------------------------------------------------------------

def test_workdir_that_is_a_file(tmp_path, digits):
    workdir = tmp_path / "afile"
    workdir.write_text("mine")
    one_error_line(run_cli(*train_args(digits, workdir)), f"--workdir {workdir} exists and is not a directory")
    assert workdir.read_text() == "mine"


@pytest.mark.parametrize("name", ["metrics.jsonl", ".lock"])
def test_workdir_entry_that_is_a_directory(tmp_path, digits, name):
    workdir = tmp_path / "run"
    (workdir / name).mkdir(parents=True)
    line = one_error_line(run_cli(*train_args(digits, workdir)), name)
    assert "Is a directory" in line or "is not a regular file" in line, line
    nothing_trained(workdir)
    assert (workdir / name).is_dir() and not any((workdir / name).iterdir())


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_read_only_workdir(tmp_path, digits, read_only, existing):
    parent = tmp_path / "ro"
    workdir = parent / "run"
    if existing:
        workdir.mkdir(parents=True)
    else:
        parent.mkdir()
    read_only(parent)
    one_error_line(run_cli(*train_args(digits, workdir)), "Read-only file system")
    assert workdir.is_dir() == existing
    if existing:
        assert not any(workdir.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permission bits say")
def test_read_only_workdir_by_permissions(tmp_path, digits):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        one_error_line(run_cli(*train_args(digits, workdir)), "Permission denied")
    finally:
        workdir.chmod(0o755)


def test_preprocess_into_read_only_parent(tmp_path, read_only):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    one_error_line(run_cli("preprocess", "digits", "--output", parent / "digits"), "Read-only file system")
    assert not any(parent.iterdir())


# --- a user's pipeline file --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,fragment", [
    ("def get_config(:\n", "line 1: SyntaxError: invalid syntax"),
    ("raise RuntimeError('boom at import')\n", "importing it raised RuntimeError: boom at import"),
], ids=["syntax-error", "raises-at-import"])
def test_broken_pipeline_file(tmp_path, text, fragment):
    pipeline = tmp_path / "mine.py"
    pipeline.write_text(text)
    one_error_line(run_cli("config", pipeline), f"{pipeline}: {fragment}")
    workdir = tmp_path / "run"
    one_error_line(run_cli("train", pipeline, "--workdir", workdir), fragment)
    assert not workdir.exists()


# --- config sizes, refused before any work -----------------------------------------------------------------------

@pytest.mark.parametrize("override,fragment", [
    ("client.batch_size=100000000", f"'client.batch_size' must be an integer in [1, {BATCH_SIZE_MAX}]"),
    ("eval.batch_size=1000000000", f"'eval.batch_size' must be an integer in [1, {BATCH_SIZE_MAX}]"),
    ("num_rounds=100000000000000000000000", "'num_rounds' must be an integer in [0, 2147483647]"),
    ("seed=100000000000000000000000", f"'seed' must be an integer in [0, {SEED_MAX}]"),
    ("model.num_classes=1000000000000", "'model.num_classes' must be an integer in [1, 2147483647]"),
    ("client.batch_size=1e8", "'client.batch_size' expects int"),
    ("num_rounds=1e23", "'num_rounds' expects int"),
    ("seed=1e23", "'seed' expects int"),
    ("model.num_classes=1e12", "'model.num_classes' expects int"),
])
def test_config_sizes_refused_before_work(tmp_path, digits, override, fragment):
    workdir = tmp_path / "run"
    started = time.perf_counter()
    one_error_line(run_cli(*train_args(digits, workdir, f"--config.{override}")), fragment)
    assert time.perf_counter() - started < 10  # no data read, no JAX work
    assert not workdir.exists()


def test_seed_bound_is_where_jax_keys_start_to_collide():
    import jax

    def key(seed):
        return jax.random.key_data(jax.random.PRNGKey(seed)).tolist()

    assert key(SEED_MAX) != key(0) and key(2**31) != key(0)
    if not jax.config.jax_enable_x64:
        assert key(SEED_MAX + 1) == key(0)  # why larger seeds are refused


def test_model_too_large_for_memory_is_refused_with_its_bytes(tmp_path, digits, monkeypatch):
    monkeypatch.setattr(limits, "device_memory_bytes", lambda device=None: 1 << 30)
    workdir = tmp_path / "run"
    # 200 hidden units x 10,000,000 classes x 4 bytes: 8 GB of parameters, estimated without allocating them
    line = one_error_line(run_cli(*train_args(digits, workdir, "--config.model.num_classes=10000000")),
                          "the model's parameters alone would need", "model.num_classes is 10000000",
                          "more than the 1.0 GiB of memory")
    assert "8,04" in line  # 8,040,... bytes
    nothing_trained(workdir)


def test_batch_larger_than_every_client_is_cut_to_the_largest():
    sizes = [3, 17, 9]
    assert limits.fit_batch_size(10, sizes) == 10
    assert limits.fit_batch_size(10**6, sizes) == 17
    assert limits.fit_batch_size(10**6, sizes, epochs=3) == 51  # epochs are concatenated before batching
    assert limits.fit_batch_size(10**6, sizes, max_examples=5, epochs=2) == 10
    assert limits.fit_batch_size(10**6, [0, 0]) == 1
    assert limits.fit_eval_batch(64, sizes) == 17


def test_python_api_still_raises(tmp_path, digits):
    import fedstream

    config = load_config("digits_fedavg", "fedstream.pipelines", [f"data.path={digits}", "num_rounds=1"])
    with pytest.raises(ConfigError, match="'num_rounds' must be an integer in"):
        validate_train_config(load_config("digits_fedavg", "fedstream.pipelines", ["num_rounds=" + "9" * 23]))
    workdir = tmp_path / "run"
    (workdir / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(OSError, match="Is a directory|not a regular file"):
        fedstream.train(config, workdir, log=lambda _: None)
    from fedstream.training.train import build_algorithm

    dataset = fedstream.FederatedDataset(digits)
    with pytest.raises(ConfigError, match="'client.batch_size' must be an integer in"):
        fedstream.Simulation(dataset, build_algorithm(config, dataset), batch_size=10**8)


# --- unexpected errors: one line naming a traceback file; --traceback prints it ---------------------------------

def kaboom(*args, **kwargs):
    raise RuntimeError("kaboom in round 1\nsecond line of the message")


def test_unexpected_error_is_one_line_with_a_traceback_file(tmp_path, digits, monkeypatch):
    from fedstream.training import train as train_module

    monkeypatch.setattr(train_module, "train", kaboom)
    workdir = tmp_path / "run"
    workdir.mkdir()
    line = one_error_line(run_cli(*train_args(digits, workdir)), "RuntimeError: kaboom in round 1 [...]",
                          "full traceback in", "--traceback")
    path = pathlib.Path(line.split("full traceback in ")[1].split(";")[0])
    assert path.parent == workdir / "errors" and path.name.startswith("traceback-")
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "second line of the message" in text
    assert "kaboom" in text and "def kaboom" not in text and "in kaboom" in text

    # no usable workdir (not created yet): the system temp dir
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    line = one_error_line(run_cli(*train_args(digits, tmp_path / "new")), "RuntimeError: kaboom")
    path = pathlib.Path(line.split("full traceback in ")[1].split(";")[0])
    assert path.parent == tmp_path / "tmp" and "kaboom" in path.read_text()
    assert not (tmp_path / "new").exists()


def test_traceback_flag_prints_the_traceback(tmp_path, digits, monkeypatch):
    from fedstream.training import train as train_module

    monkeypatch.setattr(train_module, "train", kaboom)
    for args in (train_args(digits, tmp_path / "run", "--traceback"),
                 ["--traceback", *train_args(digits, tmp_path / "run")]):
        result = run_cli(*args)
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr and "second line of the message" in result.stderr
    assert not (tmp_path / "run" / "errors").exists()
    result = run_cli("config", tmp_path / "missing.py", "--traceback")  # expected errors too
    assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr


def test_ctrl_c_before_any_checkpoint(tmp_path, digits, monkeypatch):
    from fedstream.training import train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    result = run_cli(*train_args(digits, tmp_path / "run"))
    assert result.returncode == 130
    assert result.stderr.strip() == ("fedstream: interrupted before the first checkpoint was saved; rerun the same "
                                     "command to start the run again")


# --- Ctrl-C in a real run: exit 130, the round to resume from, and the rerun resumes --------------------------

def test_ctrl_c_during_train_says_how_to_resume_and_the_rerun_resumes(tmp_path, digits):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "fedstream.cli", "train", "digits_fedavg", "--workdir", str(workdir),
            f"--config.data.path={digits}", "--config.num_rounds=1000", "--config.eval.every=0"]
    env = {k: v for k, v in os.environ.items() if k != "FEDSTREAM_FAULT"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # the first Ctrl-C lets the round under way finish and save, then stops (see cli.stop_between_rounds)
    try:
        deadline = time.monotonic() + 300
        checkpoints = workdir / "checkpoints"
        while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    done = int(lines[0].split("after round ")[1].split(";")[0])
    assert lines[0] == (f"fedstream: interrupted after round {done}; rerun the same command to resume from round "
                        f"{done}")
    assert 1 <= done < 1000 and "Traceback" not in err + out

    # The same command resumes from that round (in this process, and shortened to one more round).
    rerun = run_cli(*args[3:], f"--config.num_rounds={done + 1}")
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed {workdir} from the checkpoint after round {done}" in rerun.stdout
