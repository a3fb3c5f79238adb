"""Dataset format v1: writer/reader round trip, atomicity, and corruption errors."""

import json
import pickle
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.data.format import DatasetFormatError, FeatureSpec, decode_examples, encode_example
from fedstream.data.inspect import describe_dataset
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DatasetWriter

SCHEMA = {"x": FeatureSpec("float32", (8, 8, 1)), "y": FeatureSpec("int32", ()),
          "tokens": FeatureSpec("int32", (None,))}
SIZES = [3, 0, 70, 10, 45, 5, 1]


def make_client(rng, n):
    return {"x": rng.normal(size=(n, 8, 8, 1)).astype(np.float32), "y": rng.integers(0, 10, n).astype(np.int32),
            "tokens": [rng.integers(0, 100, rng.integers(0, 6)).astype(np.int32) for _ in range(n)]}


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    with DatasetWriter(tmp_path / "ds", SCHEMA, metadata={"recipe": "test"}, records_per_shard=50) as writer:
        for i, n in enumerate(SIZES):  # train and test clients interleaved
            for split in ("train", "test"):
                data[split, f"c{i}"] = make_client(rng, n if split == "train" else n // 2)
                writer.add_client(split, f"c{i}", data[split, f"c{i}"])
    return tmp_path / "ds", data


def test_round_trip_exact_and_client_contiguous(written):
    path, data = written
    ds = FederatedDataset(path)
    assert sorted(ds.splits) == ["test", "train"]
    assert ds.client_ids("train").tolist() == [f"c{i}" for i in range(len(SIZES))]
    assert ds.client_sizes("train").tolist() == SIZES
    for (split, client), ex in data.items():
        got = ds.get_client(split, client)
        np.testing.assert_array_equal(got["x"], ex["x"])
        np.testing.assert_array_equal(got["y"], ex["y"])
        assert len(got["tokens"]) == len(ex["tokens"])
        for a, b in zip(got["tokens"], ex["tokens"]):
            np.testing.assert_array_equal(a, b)
        assert got["x"].dtype == np.float32 and got["y"].dtype == np.int32
    meta = json.loads((path / "metadata.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) >= 2  # 70 > records_per_shard
    # Each client lies inside one shard: start + count <= records of that shard.
    with np.load(path / "train" / "index.npz") as index:
        records = [s["num_records"] for s in meta["splits"]["train"]["shards"]]
        assert all(s + c <= records[h] for s, c, h in zip(index["start"], index["count"], index["shard"]))
    assert ds.get_client("train", 2)["x"].shape == (70, 8, 8, 1)  # by position


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(allow_nan=False, width=32), st.integers(-2**31, 2**31 - 1),
                          st.lists(st.integers(0, 2**16), max_size=5)), max_size=8))
def test_encode_decode_property(rows):
    schema = {"a": FeatureSpec("float32", (2,)), "b": FeatureSpec("int64", ()), "c": FeatureSpec("uint32", (None,))}
    records = [encode_example(schema, {"a": [f, -f], "b": i, "c": np.array(c, np.uint32)}) for f, i, c in rows]
    out = decode_examples(schema, records)
    assert out["a"].shape == (len(rows), 2) and out["b"].dtype == np.int64
    for k, (f, i, c) in enumerate(rows):
        assert out["a"][k, 0] == np.float32(f) and out["b"][k] == i and out["c"][k].tolist() == c


def test_fixed_schema_decodes_with_one_buffer():
    schema = {"x": FeatureSpec("float32", (3,)), "y": FeatureSpec("int32", ())}
    rec = [encode_example(schema, {"x": np.arange(3) + k, "y": k}) for k in range(4)]
    out = decode_examples(schema, rec)
    np.testing.assert_array_equal(out["y"], np.arange(4))
    with pytest.raises(DatasetFormatError, match="shard-7"):
        decode_examples(schema, rec[:2] + [rec[2][:-1]], source="shard-7")


def test_missing_success_marker(written):
    path, _ = written
    (path / "_SUCCESS").unlink()
    with pytest.raises(DatasetFormatError, match="no _SUCCESS"):
        FederatedDataset(path)


def test_wrong_format_version_names_file(written):
    path, _ = written
    meta = json.loads((path / "metadata.json").read_text())
    meta["format_version"] = 99
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetFormatError, match=r"metadata\.json.*99"):
        FederatedDataset(path)


def test_truncated_shard_named(written):
    path, _ = written
    shard = path / "train" / "shard-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match="shard-00000.array_record.*truncated"):
        FederatedDataset(path)


def test_flipped_byte_caught_by_verify(written):
    path, _ = written
    shard = path / "test" / "shard-00000.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = FederatedDataset(path)  # same size: the cheap checks pass
    with pytest.raises(DatasetFormatError, match="test/shard-00000.array_record: sha256"):
        ds.verify()


def test_inconsistent_index_named(written):
    path, _ = written
    with np.load(path / "train" / "index.npz") as f:
        index = {k: f[k] for k in f.files}
    index["count"][0] += 1
    np.savez(path / "train" / "index.npz", **index)
    with pytest.raises(DatasetFormatError, match=r"train/index\.npz"):
        FederatedDataset(path)


def test_bad_input_leaves_nothing_and_names_client(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"client 'bad'.*feature 'x'"):
        with DatasetWriter(tmp_path / "out", SCHEMA) as writer:
            writer.add_client("train", "good", make_client(rng, 4))
            bad = make_client(rng, 3)
            bad["x"] = bad["x"][:, :4]
            writer.add_client("train", "bad", bad)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="already added"):
        with DatasetWriter(tmp_path / "out", SCHEMA) as writer:
            writer.add_client("train", "a", make_client(rng, 2))
            writer.add_client("train", "a", make_client(rng, 2))
    with pytest.raises(ValueError, match="do not fit int32"):
        with DatasetWriter(tmp_path / "out", SCHEMA) as writer:
            ex = make_client(rng, 2)
            ex["y"] = np.array([0, 2**40])
            writer.add_client("train", "a", ex)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_complete_dataset(written):
    path, _ = written
    schema = {"v": FeatureSpec("float32", ())}
    with DatasetWriter(path, schema) as writer:
        writer.add_client("train", "only", {"v": np.ones(3, np.float32)})
    ds = FederatedDataset(path)
    assert ds.splits == ["train"] and ds.client_ids("train").tolist() == ["only"]
    assert [p.name for p in path.parent.iterdir()] == ["ds"]


def test_picklable_and_thread_safe(written):
    path, data = written
    ds = pickle.loads(pickle.dumps(FederatedDataset(path)))  # pickle only to prove Grain workers can take it
    errors = []

    def read(split):
        try:
            for _ in range(20):
                for i in range(len(SIZES)):
                    np.testing.assert_array_equal(ds.get_client(split, i)["x"], data[split, f"c{i}"]["x"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=read, args=(s,)) for s in ("train", "test", "train", "test")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors


def test_describe_and_unknown_lookups(written):
    path, _ = written
    text = describe_dataset(path)
    assert f"{len(SIZES)} clients, {sum(SIZES)} examples" in text
    assert "max 70" in text and "tokens int32[None]" in text
    ds = FederatedDataset(path)
    with pytest.raises(DatasetFormatError, match="no split 'valid'"):
        ds.client_ids("valid")
    with pytest.raises(DatasetFormatError, match="no client 'zz'"):
        ds.get_client("train", "zz")


def test_stale_tmp_dirs_removed_and_foreign_dirs_kept(tmp_path):
    stale = tmp_path / ".ds.tmp-999999999-abcd"
    stale.mkdir()
    with DatasetWriter(tmp_path / "ds", {"v": FeatureSpec("int32", ())}) as writer:
        writer.add_client("train", "a", {"v": np.arange(2)})
    assert not stale.exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a fedstream dataset"):
        DatasetWriter(foreign, {"v": FeatureSpec("int32", ())})
    assert (foreign / "notes.txt").exists()
