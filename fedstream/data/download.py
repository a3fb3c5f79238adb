"""Downloading upstream dataset files into a local cache, verified and atomic.

    path = fetch(Remote(url, sha256="...", size=...), cache="", progress=print)

`download(url, dest, ...)` streams the body with `urllib` into `<dest>.part`,
resuming a partial `.part` with an HTTP `Range` request (a server that
ignores `Range` and answers 200 restarts the file from byte 0), retries a
connection that breaks mid-body, checks the byte count and sha256 against
pinned values and only then renames `.part` to `dest` (atomic within a
directory). A size or checksum mismatch deletes the bad file and raises a
one-line `DownloadError` naming the URL and the file, so nothing that looks
complete is ever left behind. `fetch` adds the cache: `<cache>/<file name>`,
reused when it matches the pins.

The cache directory is the `cache` argument (a recipe's `cache_dir` config
key) or else `$FEDSTREAM_CACHE`, else `~/.cache/fedstream`. Nothing is
downloaded at import time. Two processes downloading the same file into the
same cache at the same time are not coordinated (run one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from fedstream import __version__
from fedstream.data.format import file_sha256

CACHE_ENV = "FEDSTREAM_CACHE"
CHUNK_BYTES = 1 << 20
PROGRESS_EVERY_S = 2.0

Progress = Callable[[str], None]


class DownloadError(ValueError):
    """A download failed or did not match its pinned size or sha256. The message names the URL and file."""


@dataclasses.dataclass(frozen=True)
class Remote:
    """An upstream file: its URL and the pinned sha256 (hex) and size in bytes (None = not pinned)."""

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        """The last path component of the URL: the file's name in the cache."""
        name = pathlib.PurePosixPath(urllib.parse.urlparse(self.url).path).name
        if not name:
            raise ValueError(f"{self.url}: URL has no file name")
        return name


def cache_dir(configured: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache directory: `configured` if non-empty, else $FEDSTREAM_CACHE, else ~/.cache/fedstream."""
    chosen = str(configured) if configured else os.environ.get(CACHE_ENV, "")
    return pathlib.Path(chosen).expanduser() if chosen else pathlib.Path.home() / ".cache" / "fedstream"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class _Meter:
    """Progress lines: bytes so far, MB/s since this attempt started, percent when the total is known."""

    def __init__(self, name: str, total: int | None, progress: Progress | None, start_bytes: int) -> None:
        self.name, self.total, self.say = name, total, progress
        self.start_bytes = start_bytes
        self.start = self.last = time.perf_counter()

    def line(self, done: int) -> str:
        rate = (done - self.start_bytes) / max(time.perf_counter() - self.start, 1e-9) / 1e6
        if self.total:
            percent = 100.0 * done / self.total
            return f"  {self.name}: {_mb(done)} of {_mb(self.total)} ({percent:.1f}%), {rate:.1f} MB/s"
        return f"  {self.name}: {_mb(done)}, {rate:.1f} MB/s"

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.say is not None and (final or now - self.last >= PROGRESS_EVERY_S):
            self.last = now
            self.say(self.line(done))


class _Incomplete(Exception):
    """The connection ended before the announced number of bytes arrived."""


def _hash_existing(part: pathlib.Path) -> tuple["hashlib._Hash", int]:
    """The sha256 of what an earlier attempt left in `part` (to continue from), and its size."""
    digest = hashlib.sha256()
    if not part.exists():
        return digest, 0
    file_sha256(part, digest)
    return digest, part.stat().st_size


def _content_range_start(header: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes a-b/n` header, None if it does not parse."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    return int(match.group(1)) if match else None


def _attempt(url: str, part: pathlib.Path, *, size: int | None, timeout: float, progress: Progress | None,
             name: str) -> "hashlib._Hash":
    """One HTTP request: appends to (or restarts) `part`; returns the sha256 of the whole part file.

    Raises _Incomplete, OSError or http.client errors for the retry loop; HTTPError 416 goes up too.
    """
    digest, have = _hash_existing(part)
    if size is not None and have > size:  # longer than the pinned size: cannot be a prefix of the file
        part.unlink()
        digest, have = hashlib.sha256(), 0
    headers = {"User-Agent": f"fedstream/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    # A fresh opener per request: proxy settings are read from the environment now, not at first use.
    with urllib.request.build_opener().open(request, timeout=timeout) as response:
        status = response.status
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if have and status == 206 and _content_range_start(response.headers.get("Content-Range")) == have:
            mode = "ab"
            if progress is not None:
                progress(f"  {name}: resuming at {_mb(have)}")
        elif status == 206:  # a range other than the one asked for: start again without Range
            part.unlink(missing_ok=True)
            raise _Incomplete(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        elif status == 200:  # the whole file (the server ignored Range): restart from byte 0
            if have and progress is not None:
                progress(f"  {name}: the server does not resume; restarting from 0 bytes")
            mode, digest, have = "wb", hashlib.sha256(), 0
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status} while downloading to {part}")
        total = size if size is not None else (have + length if length is not None else None)
        meter = _Meter(name, total, progress, have)
        received = 0
        with open(part, mode) as f:
            while True:
                block = response.read(CHUNK_BYTES)
                if not block:
                    break
                f.write(block)
                digest.update(block)
                received += len(block)
                meter.update(have + received)
            f.flush()
            os.fsync(f.fileno())
        if length is not None and received < length:
            raise _Incomplete(f"connection closed after {received:,} of {length:,} bytes")
        meter.update(have + received, final=True)
    return digest


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             progress: Progress | None = None, retries: int = 3, timeout: float = 60.0,
             retry_wait_s: float = 1.0) -> pathlib.Path:
    """Downloads `url` to `dest` through `<dest>.part`, verified against the pins; returns `dest`.

    An existing `<dest>.part` is resumed with a Range request. A broken
    connection is retried up to `retries` times, each resuming where the
    previous one stopped (waiting `retry_wait_s`, doubling). After the body,
    the size (if `size`) and sha256 (if `sha256`) are checked; on a mismatch
    the part file is deleted and DownloadError raised. `progress` receives
    lines with the bytes so far, the rate in MB/s and the percentage.
    """
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    name = dest.name
    expected_sha = sha256.lower() if sha256 else None
    failures = 0
    while True:
        try:
            digest = _attempt(url, part, size=size, timeout=timeout, progress=progress, name=name)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and part.exists() and size is not None and part.stat().st_size == size:
                digest, _ = _hash_existing(part)  # the part file already holds every byte
                break
            if e.code == 416 and part.exists():
                part.unlink()  # the partial file is not a prefix the server can continue: start again
                error: Exception = e
            elif 500 <= e.code < 600:
                error = e
            else:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (downloading to {dest})") from None
        except (_Incomplete, http.client.HTTPException, urllib.error.URLError, OSError) as e:
            error = e
        failures += 1
        if failures > retries:
            kept = (f"; {_mb(part.stat().st_size)} kept in {part} to resume next time"
                    if part.exists() and part.stat().st_size else "")
            reason = getattr(error, "reason", None) or error
            raise DownloadError(f"{url}: download to {dest} failed after {failures} attempts "
                                f"({reason}){kept}") from None
        if progress is not None:
            progress(f"  {name}: {error}; retrying ({failures}/{retries})")
        time.sleep(retry_wait_s * 2 ** (failures - 1))

    got_size = part.stat().st_size
    if size is not None and got_size != size:
        part.unlink()
        raise DownloadError(f"{url}: downloaded {got_size:,} bytes to {dest}, expected {size:,}; the file was deleted")
    got_sha = digest.hexdigest()
    if expected_sha is not None and got_sha != expected_sha:
        part.unlink()
        raise DownloadError(f"{url}: sha256 of the download to {dest} is {got_sha}, expected {expected_sha}; "
                            "the file was deleted")
    os.replace(part, dest)
    return dest


def verify_file(path: str | os.PathLike, *, sha256: str | None = None, size: int | None = None) -> None:
    """Raises DownloadError (naming the file) if `path` does not have the pinned size or sha256."""
    path = pathlib.Path(path)
    got = path.stat().st_size
    if size is not None and got != size:
        raise DownloadError(f"{path}: {got:,} bytes, expected {size:,}")
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256.lower():
            raise DownloadError(f"{path}: sha256 {digest}, expected {sha256.lower()}")


def fetch(remote: Remote, cache: str | os.PathLike | None = None, *, progress: Progress | None = None,
          retries: int = 3, timeout: float = 60.0) -> pathlib.Path:
    """The cached copy of `remote` (`<cache dir>/<file name>`), downloaded and verified if needed.

    A cached file that no longer matches the pins (e.g. truncated by a full
    disk) is deleted and downloaded again.
    """
    dest = cache_dir(cache) / remote.filename
    if dest.exists():
        if progress is not None:
            progress(f"checking the cached {dest}")
        try:
            verify_file(dest, sha256=remote.sha256, size=remote.size)
            return dest
        except DownloadError as e:
            if progress is not None:
                progress(f"  {e}; downloading it again")
            dest.unlink()
    if progress is not None:
        progress(f"downloading {remote.url} to {dest}")
    return download(remote.url, dest, sha256=remote.sha256, size=remote.size, progress=progress, retries=retries,
                    timeout=timeout)
