"""Opening files in a workdir without following symbolic links.

A workdir is written by a long-running process, and anyone who can write to
the directory could plant `metrics.jsonl.tmp -> ~/.bashrc`: a plain `open(...,
"w")` would then empty or overwrite the link's target. Every file that
fedstream writes into a workdir is opened here instead, with `O_NOFOLLOW` (a
symbolic link as the last path component is refused) and only if it is a
regular file (a FIFO or device would block or misbehave).

Temporary files, which fedstream owns by name, are created with
`create_exclusive` after any leftover of that name (a file from a killed run,
or a planted link) has been unlinked; unlinking a link never touches its target.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
from typing import IO, Any

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_MODES = {
    "r": os.O_RDONLY, "rb": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL, "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "r+": os.O_RDWR, "r+b": os.O_RDWR,
}


class UnsafeFileError(OSError):
    """A path that fedstream would write (or read back) is a symbolic link or not a regular file.

    `str()` is the one-line message (no `[Errno N]` prefix).
    """

    def __str__(self) -> str:
        return str(self.strerror)


def open_fd_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """`os.open(path, flags | O_NOFOLLOW | O_CLOEXEC)` that also refuses anything but a regular file.

    The file is opened non-blocking (a FIFO cannot hang the caller), checked with `fstat`, and
    switched back to blocking mode. Raises UnsafeFileError naming the path for a symbolic link or
    a non-regular file; other OSErrors pass through.
    """
    try:
        fd = os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno in (errno.EEXIST, errno.EMLINK) and os.path.islink(path)):
            raise UnsafeFileError(e.errno, f"{os.fspath(path)} is a symbolic link; fedstream does not write "
                                           "through links in a workdir (remove it)") from None
        try:
            info = os.lstat(path)
        except OSError:
            raise e from None
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):  # a FIFO without a reader: ENXIO
            raise UnsafeFileError(errno.EINVAL, f"{os.fspath(path)} is not a regular file (remove it)") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(errno.EINVAL, f"{os.fspath(path)} is not a regular file (remove it)")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_no_follow(path: str | os.PathLike, mode: str = "r", *, encoding: str | None = None,
                   errors: str | None = None) -> IO[Any]:
    """Like `open(path, mode)` for modes r, w, a, x, r+ (text or `b`), but never through a symbolic
    link and only on a regular file (see `open_fd_no_follow`)."""
    if mode not in _MODES:
        raise ValueError(f"unsupported mode {mode!r}")
    fd = open_fd_no_follow(path, _MODES[mode])
    try:
        if "b" in mode:
            return os.fdopen(fd, mode)
        return io.open(fd, mode, encoding=encoding or "utf-8", errors=errors)
    except BaseException:
        os.close(fd)
        raise


def create_exclusive(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None) -> IO[Any]:
    """A new regular file at `path` (a temporary name the caller owns), opened for writing.

    Whatever was at `path` (a leftover of a killed run, a planted symbolic link) is unlinked
    first, then the file is created with `O_EXCL | O_NOFOLLOW`: the write can never land
    anywhere but in a fresh file in that directory.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"unsupported mode {mode!r}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise UnsafeFileError(errno.EISDIR, f"{os.fspath(path)} is a directory (remove it)") from None
    return open_no_follow(path, "x" + mode[1:], encoding=encoding)


def write_bytes_exclusive(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` into a fresh file at `path` (see `create_exclusive`)."""
    with create_exclusive(path, "wb") as f:
        f.write(data)
