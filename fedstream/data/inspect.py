"""`fedstream inspect DIR`: a human summary of a dataset directory.

Besides sizes, it summarises how labels are spread over clients (for a
dataset with an integer scalar label feature) and can print a content digest
per split (`FederatedDataset.content_digest`).

Label skew is measured as the mean total-variation (TV) distance between a
client's label distribution and its split's pooled label distribution:

    skew = mean over non-empty clients i of  1/2 * sum_k |p_ik - q_k|

where p_ik is the share of class k among client i's examples and q_k its
share among all examples of the split. 0 means every client has the pooled
mix; it approaches 1 when clients hold classes nobody else holds. Small
clients are skewed by chance alone, so the summary also gives the same
measure for an IID split with the same client sizes (one multinomial draw per
client from q, seed 0): the gap between the two is the skew the partition put
there.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import numpy as np

from fedstream.data.format import DatasetFormatError, decode_examples
from fedstream.data.reader import FederatedDataset

DEFAULT_LABEL_KEY = "y"
# Splits whose shards hold more than this many bytes are not read for the label summary unless
# `--labels` asks (reading runs at ~0.1-1 GB/s, see docs/performance.md "inspect").
LABELS_AUTO_BYTES = 512 << 20
_DECODE_BATCH = 8192  # records decoded at once when counting labels
# Clients per batch of the IID baseline's multinomial draws (bounds its memory to ~chunk x classes).
_IID_CHUNK_ELEMENTS = 1 << 21


def _human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def find_label_key(ds: FederatedDataset, requested: str | None = None) -> tuple[str | None, str]:
    """The feature holding integer class labels, and why (or why none: the note to print).

    `requested` (`--label-key`) wins; else the `label_key` of the recipe config stored in the
    metadata (the `arrays` recipe has one); else `y`, the default `model.label_key`. The feature
    must be an integer scalar per example (a text dataset's `y` is a token sequence: no summary).
    """
    config = ds.metadata.get("config")
    stored = config.get("label_key") if isinstance(config, dict) else None
    key = requested or (stored if isinstance(stored, str) and stored else None) or DEFAULT_LABEL_KEY
    spec = ds.schema.get(key)
    if spec is None:
        return None, f"no label feature {key!r} (features: {', '.join(ds.schema)}); --label-key NAME picks one"
    if np.dtype(spec.dtype).kind not in "iub" or spec.shape != ():
        return None, (f"feature {key!r} is {spec.dtype}{list(spec.shape)}, not an integer label per example "
                      "(--label-key NAME picks another)")
    return key, ""


@dataclasses.dataclass
class LabelCounts:
    """Label counts of the clients of one split, stored sparsely (only the classes a client has).

    `classes` are the label values present, sorted; `positions` the clients counted (index
    positions, all of the split's unless sampled); `sizes` their example counts; the triplets
    (`pair_client`, `pair_class`, `pair_count`) say that client `positions[pair_client]` has
    `pair_count` examples of `classes[pair_class]`, sorted by client then class.
    """

    split: str
    key: str
    classes: np.ndarray
    positions: np.ndarray
    sizes: np.ndarray
    pair_client: np.ndarray
    pair_class: np.ndarray
    pair_count: np.ndarray
    num_clients: int  # clients in the split (more than len(positions) when sampled)

    @property
    def pooled(self) -> np.ndarray:
        """The label distribution of all counted examples, per class (sums to 1; empty if none)."""
        totals = np.bincount(self.pair_class, weights=self.pair_count, minlength=len(self.classes))
        return totals / totals.sum() if totals.sum() else totals

    def dense(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Counts as a [clients, classes] int64 matrix, for the counted clients `rows` (indices into
        `positions`; default all of them)."""
        rows = np.arange(len(self.positions)) if rows is None else np.asarray(rows, np.int64)
        where = np.full(len(self.positions), -1, np.int64)
        where[rows] = np.arange(len(rows))
        out = np.zeros((len(rows), len(self.classes)), np.int64)
        keep = where[self.pair_client] >= 0
        out[where[self.pair_client[keep]], self.pair_class[keep]] = self.pair_count[keep]
        return out

    def classes_per_client(self) -> np.ndarray:
        """Number of distinct labels of each counted non-empty client."""
        per = np.bincount(self.pair_client, minlength=len(self.positions))
        return per[self.sizes > 0]

    def skew(self) -> np.ndarray:
        """Each counted non-empty client's total-variation distance from the pooled distribution.

        Computed sparsely: 1/2 sum_k |p_k - q_k| = 1/2 (1 + sum over the client's classes of
        (|p_k - q_k| - q_k)), as the classes it lacks contribute q_k each.
        """
        q = self.pooled
        p = self.pair_count / self.sizes[self.pair_client]
        per_pair = np.abs(p - q[self.pair_class]) - q[self.pair_class]
        tv = 0.5 * (1.0 + np.bincount(self.pair_client, weights=per_pair, minlength=len(self.positions)))
        return np.clip(tv[self.sizes > 0], 0.0, 1.0)

    def iid_skew(self, seed: int = 0) -> np.ndarray:
        """`skew()` of an IID split with the same client sizes: each client's labels one multinomial
        draw from the pooled distribution."""
        q = self.pooled
        sizes = self.sizes[self.sizes > 0]
        if not len(q) or not len(sizes):
            return np.zeros(0)
        rng = np.random.default_rng(seed)
        chunk = max(1, _IID_CHUNK_ELEMENTS // len(q))
        out = []
        for begin in range(0, len(sizes), chunk):
            n = sizes[begin:begin + chunk]
            draws = rng.multinomial(n, q)
            out.append(0.5 * np.abs(draws / n[:, None] - q).sum(axis=1))
        return np.concatenate(out)


def label_counts(ds: FederatedDataset, split: str, key: str, max_clients: int | None = None,
                 seed: int = 0, positions: np.ndarray | None = None) -> LabelCounts:
    """Counts the labels `key` of every client of `split` (one sequential pass over its shards), or of
    `max_clients` clients drawn uniformly without replacement (seed `seed`) when the split has more,
    or of the clients at index `positions`."""
    sizes_all = np.asarray(ds.client_sizes(split), np.int64)
    n = len(sizes_all)
    if positions is not None:
        positions = np.unique(np.asarray(positions, np.int64))
        if len(positions) and (positions[0] < 0 or positions[-1] >= n):
            raise ValueError(f"client positions outside 0..{n - 1} of split {split!r}")
    elif max_clients is not None and n > max_clients:
        positions = np.sort(np.random.default_rng(seed).choice(n, int(max_clients), replace=False))
    else:
        positions = np.arange(n)
    row_of = np.full(n, -1, np.int64)
    row_of[positions] = np.arange(len(positions))
    labels: list[np.ndarray] = []
    pending: list[bytes] = []  # records of several clients, decoded together (per-call overhead)
    order: list[int] = []  # the clients in the order their records were decoded

    def decode() -> None:
        if pending:
            decoded = decode_examples(ds.schema, pending, source=f"{ds.path} (split {split!r})")[key]
            labels.append(np.asarray(decoded).astype(np.int64))
            pending.clear()

    only = None if len(positions) == n else positions
    for pos, records in ds.iter_client_records(split, only):
        order.append(pos)
        pending += records
        if len(pending) >= _DECODE_BATCH:
            decode()
    decode()
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    order_array = np.asarray(order, np.int64)
    all_rows = np.repeat(row_of[order_array], sizes_all[order_array])
    classes, label_index = np.unique(all_labels, return_inverse=True)
    pairs, counts = np.unique(all_rows * max(len(classes), 1) + label_index.reshape(-1), return_counts=True)
    k = max(len(classes), 1)
    return LabelCounts(split, key, classes, positions, sizes_all[positions], pairs // k, pairs % k,
                       counts.astype(np.int64), n)


def _split_bytes(ds: FederatedDataset, split: str) -> int:
    return sum(int(sh["bytes"]) for sh in ds.metadata["splits"][split]["shards"])


def describe_labels(ds: FederatedDataset, splits: Sequence[str], width: int, *, labels: bool | None = None,
                    label_key: str | None = None, max_clients: int | None = None) -> list[str]:
    """The label-distribution lines of `describe_dataset` (see the module docstring for the skew measure).

    `labels`: True reads every split, False none, None (default) the splits of at most
    LABELS_AUTO_BYTES. `max_clients` samples that many clients per split.
    """
    if labels is False:
        return []
    key, why = find_label_key(ds, label_key)
    if key is None:
        return [f"{'labels':<{width + 6}} none: {why}"]
    lines = [(f"{'labels':<{width + 6}} feature {key}; skew = mean total-variation distance of a client's label "
              "distribution from its split's (0: IID mix, 1: disjoint classes)")]
    for split in splits:
        head = f"{'labels ' + split:<{width + 6}} "
        size = _split_bytes(ds, split)
        if labels is None and size > LABELS_AUTO_BYTES:
            lines.append(f"{head}not read: {_human_bytes(size)} of shards (--labels reads them, --label-sample N "
                         "reads N clients)")
            continue
        try:
            counts = label_counts(ds, split, key, max_clients)
        except DatasetFormatError as e:  # a damaged shard: the summary still prints; --verify names the file
            lines.append(f"{head}not read: {str(e).splitlines()[0][:300]} (--verify checks every shard)")
            continue
        per_client = counts.classes_per_client()
        if not len(per_client):
            lines.append(f"{head}no examples")
            continue
        q = np.percentile(per_client, [0, 50, 100])
        sampled = (f" ({len(counts.positions):,} of {counts.num_clients:,} clients, sampled)"
                   if len(counts.positions) < counts.num_clients else "")
        lines.append(f"{head}{len(counts.classes):,} classes; classes per client min {q[0]:.0f} / median {q[1]:.0f} "
                     f"/ max {q[2]:.0f}; skew {counts.skew().mean():.3f} (IID with these client sizes: "
                     f"{counts.iid_skew().mean():.3f}){sampled}")
    return lines


def describe_dataset(path: str | os.PathLike, *, labels: bool | None = None, label_key: str | None = None,
                     label_sample: int | None = None, digest: bool = False) -> str:
    """A multi-line summary: provenance, format, features, and per split the clients, examples,
    shards, disk size and client-size quantiles; then the label distribution over clients
    (`describe_labels`) and, with `digest`, each split's content digest. Opens (and so checks)
    the dataset first."""
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
    width = max([6, *(len(s) for s in ds.splits)])
    for split in ds.splits:
        sizes = ds.client_sizes(split)
        q = np.percentile(sizes, [0, 50, 90, 100]) if len(sizes) else np.zeros(4)
        split_disk = sum(p.stat().st_size for p in (ds.path / split).rglob("*") if p.is_file())
        lines.append(
            f"split {split:<{width}s} {len(sizes):,} clients, {int(sizes.sum()):,} examples, "
            f"{len(meta['splits'][split]['shards'])} shards, {_human_bytes(split_disk)}; examples per client "
            f"min {q[0]:.0f} / median {q[1]:.0f} / p90 {q[2]:.0f} / max {q[3]:.0f}")
    lines += describe_labels(ds, ds.splits, width, labels=labels, label_key=label_key, max_clients=label_sample)
    if digest:
        lines += [f"{'digest ' + split:<{width + 6}} sha256:{ds.content_digest(split)}" for split in ds.splits]
    return "\n".join(lines)
