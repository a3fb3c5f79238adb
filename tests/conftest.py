"""Test setup: one process, 8 virtual CPU devices, a compilation cache, shared fixtures.

The device count must be fixed before JAX is imported, so it is set here, at
import time of the test session: tests build meshes of 1, 2, 4 or 8 of these
devices in-process (`fedstream.training.rounds.make_mesh(n)`) instead of
starting a Python process per device count. Subprocesses started by tests
(where a process is the subject: SIGKILL, locks, two-process runs) inherit
the same settings through the environment.

Slow tests run on CI (CI=true) or with --runslow, and are skipped otherwise.
"""

import os
import pathlib
import tempfile

NUM_TEST_DEVICES = 8


def _set_test_environment() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NUM_TEST_DEVICES}".strip()
    # JAX's persistent compilation cache: rounds of the same shapes compiled by several tests (and by the
    # subprocesses they start) are compiled once per machine. Kept between runs in the system's temp dir.
    cache = pathlib.Path(tempfile.gettempdir()) / "fedstream-test-jax-cache"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    # Every compilation, even a small one: hundreds of small programs (eager operations, tiny rounds) add up to
    # more than loading them (a warm default run measured 3:34 with a 0.2 s floor, 3:17 with none).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.pop("FEDSTREAM_FAULT", None)


_set_test_environment()

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow: runs on CI (CI=true) or with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> pathlib.Path:
    """The embedded digits preprocessed with the recipe's defaults (100 clients), shared by the session.

    Read-only for tests: a test that needs to alter a dataset copies it first.
    """
    from fedstream.data.preprocessing import run_preprocess

    return run_preprocess("digits", tmp_path_factory.mktemp("data") / "digits", progress=None)
