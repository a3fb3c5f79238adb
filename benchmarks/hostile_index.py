"""Peak memory of opening a dataset whose `index.npz` was crafted to make the reader allocate.

Builds a small valid dataset, then replaces `train/index.npz` (and, as a hostile user can, edits
`metadata.json` to match and records its new sha256 in `_SUCCESS`) with:

- `huge-shape`: a ~1 KB npz whose `client_ids` npy header declares 10^15 entries (NumPy alone
  asks for petabytes);
- `zip-bomb`: a ~2.3 MB npz whose `start` array is ~2.4 GB of deflated zeros;
- `stored-lie`: an uncompressed member whose zip headers declare 4 GB;
- `many-members`: ~2.3 MB of tiny zip entries (the central directory alone).

For each, a fresh Python process opens the dataset with `FederatedDataset` (it must refuse it
with one DatasetFormatError line) and reports its peak RSS; `numpy` shows the same file loaded
the way the reader used to (`np.load(...)[key]`), for comparison. Usage:

    python benchmarks/hostile_index.py [--skip-numpy]
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

from fedstream.data.format import FeatureSpec, success_marker
from fedstream.data.writer import DatasetWriter

TARGET_BYTES = 2_300_000
_OPEN = """
import sys, time
t = time.perf_counter()
try:
    from fedstream.data.reader import FederatedDataset
    FederatedDataset(sys.argv[1])
    print("opened (not refused)")
except Exception as e:
    print(f"{type(e).__name__}: {str(e)[-160:]}")
print(f"{time.perf_counter() - t:.2f} s")
print("VmHWM", [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""
_NUMPY = """
import sys, time
import numpy as np
t = time.perf_counter()
try:
    with np.load(sys.argv[1] + "/train/index.npz", allow_pickle=False) as f:
        {k: f[k] for k in ("client_ids", "shard", "start", "count")}
    print("loaded")
except Exception as e:
    print(f"{type(e).__name__}: {str(e)[:120]}")
print(f"{time.perf_counter() - t:.2f} s")
print("VmHWM", [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _valid_members(n: int) -> dict[str, bytes]:
    return {"client_ids.npy": _npy(np.array([f"c{i}" for i in range(n)])),
            "shard.npy": _npy(np.zeros(n, np.int32)), "start.npy": _npy(np.zeros(n, np.int64)),
            "count.npy": _npy(np.zeros(n, np.int64))}


def craft(kind: str, path: pathlib.Path, n: int) -> int:
    """Writes the crafted index to `path`; returns the client count to claim in metadata.json."""
    members = _valid_members(n)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        if kind == "huge-shape":
            members["client_ids.npy"] = _npy_header("<U8", (10**15,)) + b"\0" * 64
            for name, data in members.items():
                zf.writestr(name, data)
            return 10**15
        if kind == "many-members":
            for name, data in members.items():
                zf.writestr(name, data)
            for i in range(TARGET_BYTES // 80):  # ~80 bytes per entry: local header + central directory
                zf.writestr(f"x{i}", b"")
            return n
        big = 300_000_000  # 2.4 GB of int64 zeros
        for name, data in members.items():
            if name != "start.npy":
                zf.writestr(name, data)
        if kind == "zip-bomb":
            info = zipfile.ZipInfo("start.npy")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                f.write(_npy_header("<i8", (big,)))
                block = bytes(1 << 24)
                for _ in range(big * 8 // len(block)):
                    f.write(block)
                f.write(bytes(big * 8 % len(block)))
            return n  # metadata keeps the true client count: the member sizes alone must give it away
        else:  # stored-lie: written small, then the sizes in both headers patched to claim 4 GB
            zf.writestr("start.npy", _npy_header("<i8", (big,)) + bytes(64))
    if kind == "stored-lie":
        data = bytearray(path.read_bytes())
        old = (len(_npy_header("<i8", (big,))) + 64).to_bytes(4, "little")  # sizes in local and central headers
        at = data.find(old)
        while at >= 0:
            data[at:at + 4] = (0xFFFFFFF0).to_bytes(4, "little")
            at = data.find(old, at + 4)
        path.write_bytes(bytes(data))
    return n


def make_dataset(root: pathlib.Path, kind: str) -> pathlib.Path:
    out = root / kind
    rng = np.random.default_rng(0)
    with DatasetWriter(out, {"x": FeatureSpec("float32", (4,)), "y": FeatureSpec("int32", ())}) as writer:
        for i in range(4):
            writer.add_client("train", f"c{i}", {"x": rng.normal(size=(3, 4)), "y": np.arange(3)})
    claimed = craft(kind, out / "train" / "index.npz", 4)
    meta = json.loads((out / "metadata.json").read_text())
    meta["splits"]["train"]["num_clients"] = claimed
    data = json.dumps(meta).encode()
    (out / "metadata.json").write_bytes(data)
    (out / "_SUCCESS").write_bytes(success_marker(data))
    return out


def peak_rss_mib(code: str, path: pathlib.Path) -> tuple[float, str]:
    """Runs `code` in a fresh interpreter; returns its peak RSS (MiB, the child's own `VmHWM`: the
    parent's memory before `exec` does not count, as it would in `ru_maxrss`) and its output."""
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    hwm = [line for line in lines if line.startswith("VmHWM")]
    rest = " | ".join(line for line in lines if not line.startswith("VmHWM")) + result.stderr.strip()[-200:]
    return (int(hwm[0].split()[1].strip("'[]")) / 1024 if hwm else float("nan")), rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-numpy", action="store_true", help="do not load the files with plain NumPy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        baseline, _ = peak_rss_mib("from fedstream.data.reader import FederatedDataset\nprint('VmHWM', [l.split()[1] "
                                   "for l in open('/proc/self/status') if l.startswith('VmHWM')][0])", root)
        print(f"{'interpreter + fedstream.data.reader imported':45s} peak RSS {baseline:7.1f} MiB")
        for kind in ("huge-shape", "zip-bomb", "stored-lie", "many-members"):
            t = time.perf_counter()
            path = make_dataset(root, kind)
            size = (path / "train" / "index.npz").stat().st_size
            print(f"{kind}: index.npz {size:,} bytes (crafted in {time.perf_counter() - t:.1f} s)")
            rss, out = peak_rss_mib(_OPEN, path)
            print(f"  {'FederatedDataset(path)':43s} peak RSS {rss:7.1f} MiB   {out}")
            if not args.skip_numpy:
                rss, out = peak_rss_mib(_NUMPY, path)
                print(f"  {'np.load(index)[key] (the old reader)':43s} peak RSS {rss:7.1f} MiB   {out}")


if __name__ == "__main__":
    main()
