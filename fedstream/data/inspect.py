"""`fedstream inspect DIR`: a human summary of a dataset directory."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fedstream.data.reader import FederatedDataset


def _human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def describe_dataset(path: str | os.PathLike) -> str:
    """A multi-line summary: provenance, format, features, and per split the clients, examples,
    shards, disk size and client-size quantiles. Opens (and so checks) the dataset first."""
    ds = FederatedDataset(path)
    meta = ds.metadata
    disk = sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())
    lines = [
        f"dataset      {ds.path}",
        f"recipe       {meta.get('recipe', '?')}   source: {meta.get('source', '?')}",
        f"format       version {meta['format_version']}, {meta.get('created_by', '?')}",
        f"disk size    {_human_bytes(disk)}",
        "features     " + ", ".join(f"{name} {spec.dtype}{list(spec.shape)}" for name, spec in ds.schema.items()),
    ]
    for split in ds.splits:
        sizes = ds.client_sizes(split)
        q = np.percentile(sizes, [0, 50, 90, 100]) if len(sizes) else np.zeros(4)
        split_disk = sum(p.stat().st_size for p in (ds.path / split).rglob("*") if p.is_file())
        lines.append(
            f"split {split:<7s}{len(sizes):,} clients, {int(sizes.sum()):,} examples, "
            f"{len(meta['splits'][split]['shards'])} shards, {_human_bytes(split_disk)}; examples per client "
            f"min {q[0]:.0f} / median {q[1]:.0f} / p90 {q[2]:.0f} / max {q[3]:.0f}")
    return "\n".join(lines)
