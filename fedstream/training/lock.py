"""One run per workdir: an exclusive `flock` on `<workdir>/.lock`.

The lock is held on an open file descriptor, so the kernel releases it when
the owner exits in any way, SIGKILL included: there is never a stale lock to
delete by hand. While held, the file names the owner (pid, host, start time,
command) so that a second run can say who has the workdir:

    fedstream: error: workdir runs/a is in use by another fedstream run (pid 4242 on host h1, ...)

In a multi-process run (jax.distributed) every process shares the workdir and
only process 0 takes the lock (`enabled=False` elsewhere). `flock` is local
to one machine (and unreliable on some network filesystems), which is why the
processes of one run do not lock against each other.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import inspect
import json
import os
import pathlib
import socket
import sys
from typing import Any, Callable, TypeVar

from fedstream.io_safety import open_fd_no_follow

LOCK_FILE = ".lock"
F = TypeVar("F", bound=Callable[..., Any])


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock; the message names the workdir and the owner."""


def _owner_text(raw: str) -> str:
    """A human description of the owner recorded in a lock file ('unknown owner' if unreadable)."""
    try:
        info = json.loads(raw)
        parts = [f"pid {int(info['pid'])} on host {info['host']}"]
    except (ValueError, KeyError, TypeError):
        return "owner unknown: it has just started or did not record itself"
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        parts.append("this very process")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)


class WorkdirLock:
    """An exclusive, non-blocking lock on `<workdir>/.lock`, released on `release()` or process exit.

    Usage:
        with WorkdirLock(workdir, enabled=jax.process_index() == 0):
            ...  # train
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True) -> None:
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.enabled = enabled
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises WorkdirLockedError at once (never waits). No-op when disabled."""
        if not self.enabled or self._fd is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC, no following a planted symbolic link: the owner record is written with ftruncate
        # only once the lock is ours, and only into a regular file of the workdir.
        fd = open_fd_no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = _owner_text(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
            finally:
                os.close(fd)
            raise WorkdirLockedError(
                f"workdir {self.workdir} is in use by another fedstream run ({owner}); wait for it to finish "
                "or use another --workdir") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([pathlib.Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
                                     *sys.argv[1:]])[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clears the owner record and drops the lock (the file itself stays: deleting it would race)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.release()


def _is_primary() -> bool:
    """Process 0 of a (possibly multi-process) JAX run."""
    import jax

    return jax.process_index() == 0


def locked_workdir(fn: F) -> F:
    """Decorator: holds the lock of the call's `workdir` argument for the duration of the call.

    Only process 0 of a multi-process run locks (`jax.process_index() == 0`).
    Marks the wrapper with `fedstream_locks_workdir = True`.
    """
    signature = inspect.signature(fn)
    if "workdir" not in signature.parameters:
        raise TypeError(f"{fn.__qualname__} has no 'workdir' parameter to lock")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        workdir = signature.bind(*args, **kwargs).arguments["workdir"]
        with WorkdirLock(workdir, enabled=_is_primary()):
            return fn(*args, **kwargs)

    wrapper.fedstream_locks_workdir = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
