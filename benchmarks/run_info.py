"""Where and when a benchmark ran: stamped on every JSON line the benchmarks write.

`docs/performance.md` is generated from these lines (`performance_report.py`), and
every figure there is quoted with the command, machine and date of the runs behind it.
Path arguments are replaced by placeholders so no machine path reaches the docs.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import pathlib
import platform
import sys
from typing import Any

# Flags whose value is a path on this machine: shown as a placeholder in the recorded command.
PATH_FLAGS = {"--data-dir": "DIR", "--json": "FILE.jsonl", "--plot": "FILE.png", "--summarize": "FILE.jsonl",
              "--fedjax-venv": "VENV", "--pfl-venv": "VENV", "--flower-venv": "VENV", "--python": "PYTHON",
              "--out": "DIR", "--path": "DIR"}


def public_command(argv: list[str]) -> str:
    """`python benchmarks/<script> <args>` with path-valued arguments replaced by placeholders."""
    script = f"benchmarks/{pathlib.Path(argv[0]).name}"
    out: list[str] = []
    hide_next = ""
    for arg in argv[1:]:
        if hide_next:
            out.append(hide_next)
            hide_next = ""
            continue
        flag, eq, _ = arg.partition("=")
        if flag in PATH_FLAGS:
            if eq:
                out.append(f"{flag}={PATH_FLAGS[flag]}")
            else:
                out.append(arg)
                hide_next = PATH_FLAGS[flag]
            continue
        out.append(arg)
    return " ".join(["python", script, *out])


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> str:
    """JAX's backend and devices, when this process has imported JAX (the parent of a subprocess may not)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return "not recorded (JAX not imported in this process)"
    devices = jax.devices()
    return f"{jax.default_backend()}: {len(devices)} x {devices[0].device_kind}"


@functools.lru_cache(maxsize=1)
def run_info() -> dict[str, Any]:
    """Date (UTC), command, machine and library versions of this benchmark process (computed once)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": public_command(sys.argv),
        "machine": f"{os.cpu_count()} CPU cores ({_cpu_model()}), {memory / 2**30:.1f} GiB memory",
        "devices": _devices(),
        "versions": {p: _version(p) for p in ("fedstream", "jax", "grain", "array-record", "numpy")},
        "python": platform.python_version(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with this run's `run_info()` under the key `run`."""
    return {**record, "run": run_info()}
