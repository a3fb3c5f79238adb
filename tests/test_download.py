"""fedstream.data.download against a local HTTP server: full download, resume, Range ignored, bad checksums."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading

import numpy as np
import pytest

from fedstream.data import download
from fedstream.data.download import DownloadError, Remote


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.payload` at any path; honours `Range: bytes=N-` unless `server.ignore_range`.

    With `server.cut_requests = k`, the first k responses announce the full length but
    send only half of the body, then close the connection.
    """

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path.endswith("/missing"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = server.payload
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not server.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if len(server.requests) <= server.cut_requests:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.payload = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    httpd.requests = []
    httpd.ignore_range = False
    httpd.cut_requests = 0
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/files/data.bin"
    httpd.sha256 = hashlib.sha256(httpd.payload).hexdigest()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_full_download_with_progress(server, tmp_path):
    lines = []
    path = download.download(server.url, tmp_path / "data.bin", sha256=server.sha256, size=len(server.payload),
                             progress=lines.append)
    assert path.read_bytes() == server.payload
    assert _leftovers(tmp_path) == ["data.bin"]
    assert server.requests == [("/files/data.bin", None)]
    final = lines[-1]
    assert "3.0 MB of 3.0 MB (100.0%)" in final and "MB/s" in final


def test_resume_after_cut_connection(server, tmp_path):
    server.cut_requests = 1  # the first response stops half-way through the body and closes
    lines = []
    path = download.download(server.url, tmp_path / "data.bin", sha256=server.sha256, size=len(server.payload),
                             progress=lines.append, retry_wait_s=0)
    assert path.read_bytes() == server.payload
    half = len(server.payload) // 2
    assert server.requests == [("/files/data.bin", None), ("/files/data.bin", f"bytes={half}-")]
    assert any("retrying" in line for line in lines) and any("resuming at" in line for line in lines)
    assert _leftovers(tmp_path) == ["data.bin"]


def test_resume_of_a_partial_file_from_an_earlier_run(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(server.payload[:1_000_000])
    path = download.download(server.url, tmp_path / "data.bin", sha256=server.sha256, size=len(server.payload))
    assert path.read_bytes() == server.payload
    assert server.requests == [("/files/data.bin", "bytes=1000000-")]


def test_complete_part_file_gets_416_and_is_accepted(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(server.payload)
    path = download.download(server.url, tmp_path / "data.bin", sha256=server.sha256, size=len(server.payload))
    assert path.read_bytes() == server.payload
    assert _leftovers(tmp_path) == ["data.bin"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(server.payload[:1_000_000])
    lines = []
    path = download.download(server.url, tmp_path / "data.bin", sha256=server.sha256, size=len(server.payload),
                             progress=lines.append)
    assert path.read_bytes() == server.payload  # not the prefix twice
    assert server.requests == [("/files/data.bin", "bytes=1000000-")]
    assert any("does not resume" in line for line in lines)


def test_cut_connection_and_ignored_range_together(server, tmp_path):
    server.ignore_range = True
    server.cut_requests = 2
    path = download.download(server.url, tmp_path / "data.bin", sha256=server.sha256, retry_wait_s=0)
    assert path.read_bytes() == server.payload
    assert len(server.requests) == 3


@pytest.mark.parametrize("pin", ["sha256", "size"])
def test_mismatch_is_refused_and_nothing_is_left(server, tmp_path, pin):
    kwargs = {"sha256": "0" * 64} if pin == "sha256" else {"size": len(server.payload) + 1, "sha256": server.sha256}
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as info:
        download.download(server.url, dest, **kwargs, retry_wait_s=0)
    message = str(info.value)
    assert "\n" not in message and server.url in message and str(dest) in message and "deleted" in message
    assert _leftovers(tmp_path) == []


def test_part_file_longer_than_the_pinned_size_is_restarted(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(server.payload + b"junk")
    path = download.download(server.url, tmp_path / "data.bin", sha256=server.sha256, size=len(server.payload))
    assert path.read_bytes() == server.payload
    assert server.requests == [("/files/data.bin", None)]


def test_giving_up_keeps_the_partial_file_for_later(server, tmp_path):
    server.cut_requests = 10
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as info:
        download.download(server.url, dest, sha256=server.sha256, retries=1, retry_wait_s=0)
    message = str(info.value)
    assert "\n" not in message and "after 2 attempts" in message and "resume next time" in message
    assert _leftovers(tmp_path) == ["data.bin.part"]  # never the final name
    server.cut_requests = 0
    assert download.download(server.url, dest, sha256=server.sha256).read_bytes() == server.payload
    assert server.requests[-1][1] is not None  # resumed


def test_http_error_is_one_line(server, tmp_path):
    url = server.url.rsplit("/", 1)[0] + "/missing"
    with pytest.raises(DownloadError, match=r"HTTP 404") as info:
        download.download(url, tmp_path / "x", retry_wait_s=0)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert _leftovers(tmp_path) == []


def test_fetch_uses_and_checks_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "env_cache"))
    remote = Remote(server.url, sha256=server.sha256, size=len(server.payload))
    assert remote.filename == "data.bin"
    path = download.fetch(remote)
    assert path == tmp_path / "env_cache" / "data.bin" and path.read_bytes() == server.payload
    assert download.fetch(remote) == path and len(server.requests) == 1  # reused, verified, no request
    path.write_bytes(server.payload[:10])  # a damaged cache entry is replaced
    assert download.fetch(remote).read_bytes() == server.payload and len(server.requests) == 2
    explicit = download.fetch(remote, tmp_path / "explicit")  # the config key wins over the environment
    assert explicit == tmp_path / "explicit" / "data.bin"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(download.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert download.cache_dir("") == tmp_path / ".cache" / "fedstream"
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "c"))
    assert download.cache_dir(None) == tmp_path / "c"
    assert download.cache_dir(tmp_path / "d") == tmp_path / "d"


def test_import_does_not_touch_the_network():
    import subprocess
    import sys

    code = ("import socket\n"
            "def refuse(*a, **k): raise AssertionError('network used at import')\n"
            "socket.socket.connect = refuse\n"
            "socket.create_connection = refuse\n"
            "import fedstream.data.download, fedstream.data.tff\n"
            "import fedstream.recipes.emnist, fedstream.recipes.cifar100\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
