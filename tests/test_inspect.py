"""`fedstream inspect`: label-distribution summaries, the layout-independent content digest, split names."""

import shutil

import numpy as np
import pytest

from fedstream.data import inspect as inspect_module
from fedstream.data.format import FeatureSpec
from fedstream.data.inspect import describe_dataset, find_label_key, label_counts
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DatasetWriter
from tests.support import run_cli

SCHEMA = {"x": FeatureSpec("float32", (3,)), "y": FeatureSpec("int32", ()), "tokens": FeatureSpec("int32", (None,))}


def make_clients(seed=0, num=12):
    """Clients with Dirichlet-skewed labels over 5 classes, one empty, and variable-length tokens."""
    rng = np.random.default_rng(seed)
    clients = {}
    for c in range(num):
        n = 0 if c == 3 else int(rng.integers(1, 40))
        y = rng.choice(5, n, p=rng.dirichlet(np.full(5, 0.3))).astype(np.int32)
        clients[f"client_{c:03d}"] = {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": y,
                                      "tokens": [rng.integers(0, 9, rng.integers(0, 5)).astype(np.int32)
                                                 for _ in range(n)]}
    return clients


def write(path, clients, order=None, **options):
    with DatasetWriter(path, SCHEMA, metadata={"recipe": "test"}, **options) as writer:
        for cid in order or clients:
            writer.add_client("train", cid, clients[cid])
    return path


def test_label_summary_matches_dense_maths(tmp_path):
    clients = make_clients()
    ds = FederatedDataset(write(tmp_path / "ds", clients, records_per_shard=16))
    counts = label_counts(ds, "train", "y")
    dense = np.stack([np.bincount(c["y"], minlength=5) for c in clients.values()])
    assert list(counts.classes) == [k for k in range(5) if dense[:, k].any()]
    np.testing.assert_array_equal(counts.dense(), dense[:, counts.classes])
    full = dense[dense.sum(1) > 0]
    q = full.sum(0) / full.sum()
    tv = 0.5 * np.abs(full / full.sum(1, keepdims=True) - q).sum(1)
    np.testing.assert_allclose(counts.skew(), tv)
    np.testing.assert_array_equal(counts.classes_per_client(), (full > 0).sum(1))
    assert len(counts.iid_skew()) == len(full)

    # A sample of clients: the counts are those clients' own rows.
    sample = label_counts(ds, "train", "y", max_clients=5)
    assert len(sample.positions) == 5 and sample.num_clients == 12
    np.testing.assert_array_equal(sample.dense(), dense[sample.positions][:, sample.classes])


def test_skew_is_zero_for_identical_mixes_and_high_for_disjoint_classes(tmp_path):
    schema = {"x": FeatureSpec("float32", (1,)), "label": FeatureSpec("int64", ())}

    def dataset(name, labels_per_client):
        with DatasetWriter(tmp_path / name, schema, metadata={"config": {"label_key": "label"}}) as writer:
            for c, labels in enumerate(labels_per_client):
                writer.add_client("train", f"c{c}", {"x": np.zeros((len(labels), 1)), "label": np.array(labels)})
        return FederatedDataset(tmp_path / name)

    same = dataset("same", [[0, 1, 2, 3]] * 6)
    assert find_label_key(same) == ("label", "")  # from the recipe config in the metadata
    assert label_counts(same, "train", "label").skew().max() == pytest.approx(0.0)
    disjoint = dataset("disjoint", [[k] * 5 for k in range(4)])
    counts = label_counts(disjoint, "train", "label")
    np.testing.assert_allclose(counts.skew(), 0.75)  # 1 - 1/4: all mass on one of 4 equal classes
    assert list(counts.classes_per_client()) == [1] * 4
    text = describe_dataset(tmp_path / "disjoint")
    assert "labels train 4 classes; classes per client min 1 / median 1 / max 1; skew 0.750" in text


def test_cli_inspect_digits_labels_and_notes(digits, tmp_path, monkeypatch):
    result = run_cli("inspect", digits)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "labels       feature y; skew = mean total-variation distance" in result.stdout
    for split in ("train", "test"):
        line = next(line for line in lines if line.startswith(f"labels {split}"))
        assert "10 classes; classes per client min " in line and "(IID with these client sizes: " in line
        skew, iid = _skews(line)
        assert 0 < iid < skew < 1, line  # Dirichlet(0.5) label skew is more than chance alone gives
    sampled = run_cli("inspect", digits, "--label-sample", "7")
    assert sampled.stdout.count("(7 of 100 clients, sampled)") == 2
    assert "labels" not in run_cli("inspect", digits, "--no-labels").stdout
    note = run_cli("inspect", digits, "--label-key", "x").stdout
    assert "labels       none: feature 'x' is float32[8, 8, 1], not an integer label" in note
    assert "no label feature 'z'" in run_cli("inspect", digits, "--label-key", "z").stdout
    assert run_cli("inspect", digits, "--label-sample", "0").returncode == 2
    monkeypatch.setattr(inspect_module, "LABELS_AUTO_BYTES", 1000)  # as if the splits were large
    big = run_cli("inspect", digits).stdout
    assert "labels train not read: " in big and "--labels reads them" in big
    assert "labels train 10 classes" in run_cli("inspect", digits, "--labels").stdout


def _skews(line):
    """(skew, IID skew) from a `labels SPLIT` line."""
    after = line.split("; skew ")[1]
    return float(after.split(" ")[0]), float(after.split("client sizes: ")[1].split(")")[0])


def test_text_label_feature_is_skipped_with_a_note(tmp_path):
    schema = {"x": FeatureSpec("int32", (None,)), "y": FeatureSpec("int32", (None,))}
    with DatasetWriter(tmp_path / "text", schema) as writer:
        writer.add_client("train", "a", {"x": [np.arange(3)], "y": [np.arange(3)]})
    text = describe_dataset(tmp_path / "text")
    assert "labels       none: feature 'y' is int32[None], not an integer label per example" in text


def test_long_split_names_keep_a_space(tmp_path):
    with DatasetWriter(tmp_path / "ds", {"y": FeatureSpec("int32", ())}) as writer:
        writer.add_client("heldout", "a", {"y": np.arange(6) % 2})
        writer.add_client("train", "a", {"y": np.arange(3)})
    text = describe_dataset(tmp_path / "ds")
    assert "split heldout 1 clients, 6 examples" in text
    assert "split train   1 clients, 3 examples" in text
    assert "labels heldout 2 classes" in text


def test_content_digest_ignores_layout_and_sees_every_change(tmp_path):
    clients = make_clients(seed=1, num=30)
    ids = list(clients)
    a = write(tmp_path / "a", clients)
    # Another route to the same data: tiny shards, one record per chunk, compressed, clients written reversed.
    b = write(tmp_path / "b", clients, order=ids[::-1], records_per_shard=7, group_size=1, compression="zstd:1")
    ds_a, ds_b = FederatedDataset(a), FederatedDataset(b)
    assert len(ds_a.metadata["splits"]["train"]["shards"]) == 1 < len(ds_b.metadata["splits"]["train"]["shards"])
    digest = ds_a.content_digest("train")
    assert len(digest) == 64 and digest == ds_b.content_digest("train")
    cli = run_cli("inspect", b, "--digest")
    assert f"digest train sha256:{digest}" in cli.stdout, cli.stdout

    changed = {cid: dict(data) for cid, data in clients.items()}
    x = changed[ids[5]]["x"].copy()
    x[0, 1] += 1e-3  # one value of one example
    changed[ids[5]]["x"] = x
    renamed = {("other" if cid == ids[0] else cid): data for cid, data in clients.items()}
    moved = {cid: dict(data) for cid, data in clients.items()}  # one example moved to another client
    moved[ids[1]] = {k: v[1:] for k, v in clients[ids[1]].items()}
    moved[ids[2]] = {k: (v + list(clients[ids[1]][k][:1])) if isinstance(v, list)
                     else np.concatenate([v, clients[ids[1]][k][:1]]) for k, v in clients[ids[2]].items()}
    for name, variant in (("changed", changed), ("renamed", renamed), ("moved", moved)):
        other = FederatedDataset(write(tmp_path / name, variant)).content_digest("train")
        assert other != digest, name


def test_damaged_shard_still_prints_the_summary(tmp_path, digits):
    path = tmp_path / "digits"
    shutil.copytree(digits, path)
    shard = max((path / "train").glob("shard-*.array_record"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[int(len(data) * 0.3)] ^= 0x01  # inside a chunk: ArrayRecord's chunk hash catches it on reading
    shard.write_bytes(bytes(data))
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "split train " in result.stdout and "labels train not read: " in result.stdout
    assert "--verify checks every shard" in result.stdout
    verify = run_cli("inspect", path, "--verify")
    assert verify.returncode == 2 and "sha256 does not match" in verify.stderr
