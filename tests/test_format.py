"""Dataset format v1: writer/reader round trip, atomicity, and corruption errors."""

import json
import pickle
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedstream.data.format import (DatasetFormatError, success_marker, FeatureSpec, decode_examples, encode_example, encode_examples,
                                   schema_from_json, schema_to_json)
from fedstream.data.inspect import describe_dataset
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DatasetWriteError, DatasetWriter

SCHEMA = {"x": FeatureSpec("float32", (8, 8, 1)), "y": FeatureSpec("int32", ()),
          "tokens": FeatureSpec("int32", (None,))}
SIZES = [3, 0, 70, 10, 45, 5, 1, 38, 12]  # 70 > records_per_shard
RECORDS_PER_SHARD = 50


def make_client(rng, n):
    return {"x": rng.normal(size=(n, 8, 8, 1)).astype(np.float32), "y": rng.integers(0, 10, n).astype(np.int32),
            "tokens": [rng.integers(0, 100, rng.integers(0, 6)).astype(np.int32) for _ in range(n)]}


def split_sizes(split):
    return {"train": SIZES, "test": [n // 2 for n in SIZES], "val": [n % 4 for n in SIZES[::3]]}[split]


@pytest.fixture
def written(tmp_path):
    """Three splits whose clients are added interleaved: train c0, test c0, val c0, train c1, ..."""
    rng = np.random.default_rng(0)
    data = {}
    with DatasetWriter(tmp_path / "ds", SCHEMA, metadata={"recipe": "test", "source": "unit test"},
                       records_per_shard=RECORDS_PER_SHARD) as writer:
        for i in range(len(SIZES)):
            for split in ("train", "test", "val"):
                if split == "val" and i % 3:
                    continue
                data[split, f"c{i}"] = make_client(rng, split_sizes(split)[i // 3 if split == "val" else i])
                writer.add_client(split, f"c{i}", data[split, f"c{i}"])
    return tmp_path / "ds", data


def assert_client_equal(got, want):
    np.testing.assert_array_equal(got["x"], want["x"])
    np.testing.assert_array_equal(got["y"], want["y"])
    assert got["x"].dtype == np.float32 and got["y"].dtype == np.int32
    assert got["x"].shape == want["x"].shape and got["y"].shape == want["y"].shape
    assert len(got["tokens"]) == len(want["tokens"])
    for a, b in zip(got["tokens"], want["tokens"]):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, b)


def test_round_trip_exact(written):
    path, data = written
    ds = FederatedDataset(path)
    assert ds.splits == ["test", "train", "val"]
    assert ds.schema == SCHEMA and list(ds.schema) == list(SCHEMA)
    assert ds.metadata["recipe"] == "test" and ds.metadata["format_version"] == 1
    for split in ds.splits:
        ids = [c for s, c in data if s == split]
        assert ds.client_ids(split).tolist() == ids
        assert ds.client_sizes(split).tolist() == split_sizes(split)
        assert ds.client_sizes(split).dtype == np.int64
        assert ds.num_clients(split) == len(ids)
        for position, client in enumerate(ids):
            assert ds.client_index(split, client) == position
            assert_client_equal(ds.get_client(split, client), data[split, client])
            assert_client_equal(ds.get_client(split, position), data[split, client])
    meta = ds.metadata["splits"]
    assert meta["train"]["num_examples"] == sum(SIZES) and meta["test"]["num_clients"] == len(SIZES)
    ds.verify()


def test_shards_are_client_contiguous(written):
    path, _ = written
    meta = json.loads((path / "metadata.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) >= 3
    for split, info in meta["splits"].items():
        records = [s["num_records"] for s in info["shards"]]
        assert [s["file"] for s in info["shards"]] == [f"{split}/shard-{k:05d}.array_record"
                                                       for k in range(len(records))]
        with np.load(path / split / "index.npz", allow_pickle=False) as f:
            shard, start, count = f["shard"], f["start"], f["count"]
            assert shard.dtype == np.int32 and start.dtype == count.dtype == np.int64
        # Shards are filled in index order, and within each shard the clients' ranges tile it exactly.
        assert (np.diff(shard) >= 0).all()
        for k, n in enumerate(records):
            mine = shard == k
            ends = start[mine] + count[mine]
            assert start[mine][0] == 0 and (start[mine][1:] == ends[:-1]).all() and ends[-1] == n
            # A new shard starts only once the previous one holds >= records_per_shard records,
            # and a client starting in a shard never found it already full.
            if k < len(records) - 1:
                assert n >= RECORDS_PER_SHARD
            nonempty_starts = start[mine][count[mine] > 0]
            assert (nonempty_starts[1:] < RECORDS_PER_SHARD).all()
    # The 70-example client exceeds records_per_shard and still lies whole in one shard.
    ds = FederatedDataset(path)
    assert ds.get_client("train", "c2")["x"].shape == (70, 8, 8, 1)


DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "bool"]


@st.composite
def schemas_and_examples(draw):
    schema = {}
    for k in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
        if draw(st.booleans()):
            shape = (None, *shape)
        schema[f"f{k}"] = FeatureSpec(draw(st.sampled_from(DTYPES)), shape)
    examples = []
    for _ in range(draw(st.integers(0, 4))):
        examples.append({name: draw(hnp.arrays(np.dtype(spec.dtype),
                                               tuple(draw(st.integers(0, 4)) if d is None else d for d in spec.shape)))
                         for name, spec in schema.items()})
    return schema, examples


@settings(max_examples=150, deadline=None)
@given(schemas_and_examples())
def test_encode_decode_property(case):
    schema, examples = case
    assert schema_from_json(json.loads(json.dumps(schema_to_json(schema)))) == schema
    records = [encode_example(schema, ex) for ex in examples]
    columns = {name: (np.stack([ex[name] for ex in examples]) if examples and not spec.variable
                      else [ex[name] for ex in examples]) for name, spec in schema.items()}
    assert encode_examples(schema, columns, len(examples)) == records
    out = decode_examples(schema, records)
    for name, spec in schema.items():
        got = out[name]
        if not spec.variable:
            assert isinstance(got, np.ndarray) and got.shape == (len(examples), *spec.shape)
        assert len(got) == len(examples)
        for k, ex in enumerate(examples):
            value = np.asarray(got[k])
            assert value.dtype == np.dtype(spec.dtype) and value.shape == ex[name].shape
            assert np.ascontiguousarray(value).tobytes() == ex[name].tobytes()  # bitwise, NaN payloads included


def test_record_layout_is_documented_one():
    schema = {"x": FeatureSpec("float32", (8, 8, 1)), "y": FeatureSpec("int32", ())}
    x = np.arange(64, dtype=np.float32).reshape(8, 8, 1)
    assert encode_example(schema, {"x": x, "y": 7}) == x.astype("<f4").tobytes() + np.int32(7).astype("<i4").tobytes()
    tokens = {"t": FeatureSpec("int16", (None, 2)), "y": FeatureSpec("uint8", ())}
    assert encode_example(tokens, {"t": [[1, 2], [3, 4], [5, 6]], "y": 9}) == (
        b"\x03\x00\x00\x00" + np.arange(1, 7, dtype="<i2").tobytes() + b"\x09")


def test_fixed_schema_decodes_with_one_buffer():
    schema = {"x": FeatureSpec("float32", (3,)), "y": FeatureSpec("int32", ())}
    rec = [encode_example(schema, {"x": np.arange(3) + k, "y": k}) for k in range(4)]
    out = decode_examples(schema, rec)
    np.testing.assert_array_equal(out["y"], np.arange(4))
    np.testing.assert_array_equal(out["x"][3], [3, 4, 5])
    with pytest.raises(DatasetFormatError, match="shard-7.*record 2 has 15 bytes"):
        decode_examples(schema, rec[:2] + [rec[2][:-1]], source="shard-7")
    # Same total length, but one record too short and one too long: still caught.
    with pytest.raises(DatasetFormatError, match="shard-7"):
        decode_examples(schema, [rec[0][:-1], rec[1] + b"\x00"], source="shard-7")
    with pytest.raises(DatasetFormatError, match="shard-8.*record 1"):
        decode_examples({"t": FeatureSpec("int32", (None,))}, [b"\x00" * 4, b"\x09\x00\x00\x00"], source="shard-8")


def test_missing_success_marker(written):
    path, _ = written
    (path / "_SUCCESS").unlink()
    with pytest.raises(DatasetFormatError, match=f"{path}.*no _SUCCESS"):
        FederatedDataset(path)


def rewrite_metadata(path, edit):
    """Edits metadata.json and records its new sha256 in _SUCCESS, so that the checks behind the digest run."""
    meta = json.loads((path / "metadata.json").read_text())
    edit(meta)
    data = json.dumps(meta).encode()
    (path / "metadata.json").write_bytes(data)
    (path / "_SUCCESS").write_bytes(success_marker(data))


def test_wrong_format_version_names_file(written):
    path, _ = written
    rewrite_metadata(path, lambda m: m.update(format_version=99))
    with pytest.raises(DatasetFormatError, match=r"metadata\.json: format_version 99.*version 1"):
        FederatedDataset(path)


def test_malformed_metadata_named(written):
    path, _ = written
    rewrite_metadata(path, lambda m: m["splits"]["train"]["shards"][0].pop("bytes"))
    with pytest.raises(DatasetFormatError, match=r"metadata\.json: split 'train'.*bytes"):
        FederatedDataset(path)
    rewrite_metadata(path, lambda m: m["splits"].update({"../x": m["splits"].pop("train")}))
    with pytest.raises(DatasetFormatError, match=r"metadata\.json: split '\.\./x': invalid split name"):
        FederatedDataset(path)
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match=r"metadata\.json"):
        FederatedDataset(path)


def test_truncated_shard_named(written):
    path, _ = written
    shard = path / "train" / "shard-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match="train/shard-00000.array_record.*truncated"):
        FederatedDataset(path)
    shard.unlink()
    with pytest.raises(DatasetFormatError, match="train/shard-00000.array_record.*missing"):
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


def test_corrupt_record_named_at_read(written):
    path, clients = written
    shard = path / "train" / "shard-00000.array_record"
    data = bytearray(shard.read_bytes())
    where = data.find(clients["train", "c2"]["x"][-1].tobytes())  # shards are uncompressed by default
    assert where > 0
    data[where + 10] ^= 0xFF  # inside c2's last record, past the first chunk (which opening reads)
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"train/shard-00000\.array_record.*client 'c2'"):
        FederatedDataset(path).get_client("train", "c2")
    data[where + 10] ^= 0xFF
    data[64 + 40] ^= 0xFF  # in the first chunk: opening reads record 0 and names the shard
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"train/shard-00000\.array_record: cannot read record 0"):
        FederatedDataset(path)


def test_schema_mismatch_named_at_read(written):
    path, _ = written
    rewrite_metadata(path, lambda m: m["schema"]["features"][1].update(dtype="int16"))
    # The schema itself is valid; opening decodes one record per split and names the shard and the features.
    with pytest.raises(DatasetFormatError, match=r"shard-00000\.array_record: record 0 has 2 trailing bytes; "
                                                 r"the schema in metadata\.json \(x float32\[8, 8, 1\] = 256 B, "
                                                 r"y int16\[\] = 2 B"):
        FederatedDataset(path)


def test_record_count_mismatch_named_at_read(written):
    path, _ = written

    def grow(m):  # claim one more record in the last train shard and give it to the last client
        m["splits"]["train"]["shards"][-1]["num_records"] += 1
        m["splits"]["train"]["num_examples"] += 1
    rewrite_metadata(path, grow)
    with np.load(path / "train" / "index.npz") as f:
        index = {k: f[k] for k in f.files}
    index["count"][-1] += 1
    np.savez(path / "train" / "index.npz", **index)
    ds = FederatedDataset(path)
    with pytest.raises(DatasetFormatError, match=r"train/shard-0000\d\.array_record: \d+ records, metadata.json says"):
        ds.get_client("train", len(SIZES) - 1)


@pytest.mark.parametrize("edit", ["count", "start", "shard", "duplicate", "length", "ids", "garbage"])
def test_inconsistent_index_named(written, edit):
    path, _ = written
    index_path = path / "train" / "index.npz"
    with np.load(index_path) as f:
        index = {k: f[k] for k in f.files}
    if edit == "count":
        index["count"][0] += 1
    elif edit == "start":
        index["start"][-1] += 1
    elif edit == "shard":
        index["shard"][-1] = 99
    elif edit == "duplicate":
        index["client_ids"][1] = index["client_ids"][0]
    elif edit == "length":
        index["start"] = index["start"][:-1]
    elif edit == "ids":
        index["client_ids"] = np.arange(len(SIZES))
    np.savez(index_path, **index)
    if edit == "garbage":
        index_path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DatasetFormatError, match=r"train/index\.npz"):
        FederatedDataset(path)


def test_bad_input_leaves_nothing_and_names_client(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "out"

    def attempt(edit, match):
        with pytest.raises(ValueError, match=match):
            with DatasetWriter(out, SCHEMA) as writer:
                writer.add_client("train", "good", make_client(rng, 4))
                bad = make_client(rng, 3)
                edit(bad)
                writer.add_client("train", "bad", bad)
        assert list(tmp_path.iterdir()) == []  # neither output_dir nor a tmp dir

    attempt(lambda ex: ex.update(x=ex["x"][:, :4]), r"split 'train', client 'bad', feature 'x'.*shape")
    attempt(lambda ex: ex.update(y=ex["y"].astype(np.float64)), r"client 'bad', feature 'y'.*float64.*int32")
    attempt(lambda ex: ex.update(y=np.array([0, 1, 2**40])), r"client 'bad', feature 'y'.*do not fit int32")
    attempt(lambda ex: ex.update(y=np.int32(3)), r"client 'bad', feature 'y'.*shape \(\)")
    attempt(lambda ex: ex.update(tokens=[np.zeros((2, 2), np.int32)] * 3), r"client 'bad', feature 'tokens'")
    attempt(lambda ex: ex.update(y=ex["y"][:2]), r"client 'bad'.*different example counts")
    attempt(lambda ex: ex.pop("tokens"), r"client 'bad'.*do not match the schema")
    attempt(lambda ex: ex.update(x=ex["x"].astype(np.complex64)), r"client 'bad', feature 'x'.*complex64")
    with pytest.raises(ValueError, match="client 'a' was already added"):
        with DatasetWriter(out, SCHEMA) as writer:
            writer.add_client("train", "a", make_client(rng, 2))
            writer.add_client("test", "a", make_client(rng, 2))  # same id in another split is fine
            writer.add_client("train", "a", make_client(rng, 2))
    for split, client in [("", "a"), ("../up", "a"), (".hidden", "a"), ("train", ""), ("train", 3)]:
        with pytest.raises(ValueError, match="split|client id"):
            with DatasetWriter(out, SCHEMA) as writer:
                writer.add_client(split, client, make_client(rng, 1))
    with pytest.raises(ValueError, match="reserved"):
        DatasetWriter(out, SCHEMA, metadata={"splits": {}})
    assert list(tmp_path.iterdir()) == []


def test_rejected_client_leaves_no_trace(tmp_path):
    rng = np.random.default_rng(1)
    writer = DatasetWriter(tmp_path / "ds", SCHEMA)
    with pytest.raises(ValueError):
        writer.add_client("val", "v0", {**make_client(rng, 2), "y": np.zeros(2, np.float32)})
    good = make_client(rng, 3)
    writer.add_client("train", "t0", good)
    writer.close()
    ds = FederatedDataset(tmp_path / "ds")
    assert ds.splits == ["train"]  # the rejected first client of 'val' did not create the split
    assert_client_equal(ds.get_client("train", "t0"), good)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_overwrite_replaces_complete_dataset(written):
    path, _ = written
    schema = {"v": FeatureSpec("float32", ())}
    with DatasetWriter(path, schema) as writer:
        writer.add_client("train", "only", {"v": np.ones(3, np.float32)})
    ds = FederatedDataset(path)
    assert ds.splits == ["train"] and ds.client_ids("train").tolist() == ["only"]
    assert not (path / "test").exists()
    assert [p.name for p in path.parent.iterdir()] == ["ds"]
    # A failed rewrite leaves the previous dataset untouched.
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(path, schema) as writer:
            writer.add_client("train", "other", {"v": np.zeros(5, np.float32)})
            raise RuntimeError("boom")
    ds = FederatedDataset(path)
    ds.verify()
    np.testing.assert_array_equal(ds.get_client("train", "only")["v"], np.ones(3, np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["ds"]


def test_failed_final_rename_restores_previous_dataset(written, monkeypatch):
    path, data = written
    import fedstream.data.writer as writer_module

    real_replace = writer_module.os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", failing_replace)
    with pytest.raises(DatasetWriteError, match=f"could not write the dataset {path}: disk gone"):
        with DatasetWriter(path, {"v": FeatureSpec("float32", ())}) as writer:
            writer.add_client("train", "new", {"v": np.ones(2, np.float32)})
    assert [p.name for p in path.parent.iterdir()] == ["ds"]
    assert_client_equal(FederatedDataset(path).get_client("train", "c0"), data["train", "c0"])


def test_empty_dataset_and_empty_split(tmp_path):
    with DatasetWriter(tmp_path / "none", SCHEMA):
        pass
    assert FederatedDataset(tmp_path / "none").splits == []
    with DatasetWriter(tmp_path / "zero", SCHEMA) as writer:
        writer.add_client("train", "empty", {"x": np.zeros((0, 8, 8, 1), np.float32), "y": [], "tokens": []})
    ds = FederatedDataset(tmp_path / "zero")
    got = ds.get_client("train", "empty")
    assert got["x"].shape == (0, 8, 8, 1) and got["y"].shape == (0,) and got["tokens"] == []
    assert ds.client_sizes("train").tolist() == [0]


def test_picklable_and_thread_safe(written):
    path, data = written
    original = FederatedDataset(path)
    original.get_client("train", 0)  # an open reader must not end up in the pickle
    ds = pickle.loads(pickle.dumps(original))  # pickle only to prove Grain workers can take it
    errors = []

    def read(split):
        try:
            ids = ds.client_ids(split).tolist()
            for _ in range(10):
                for i, client in enumerate(ids):
                    assert_client_equal(ds.get_client(split, i), data[split, client])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=read, args=(s,)) for s in ("train", "test", "train", "val")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors


def test_describe_and_unknown_lookups(written):
    path, _ = written
    text = describe_dataset(path)
    assert f"{len(SIZES)} clients, {sum(SIZES)} examples" in text
    assert f"{len(SIZES)} clients, {sum(split_sizes('test'))} examples" in text
    assert "max 70" in text and "min 0" in text and "tokens int32[None]" in text
    assert "recipe       test" in text and "unit test" in text and "version 1" in text and "KiB" in text
    ds = FederatedDataset(path)
    with pytest.raises(DatasetFormatError, match=r"no split 'valid' \(splits: test, train, val\)"):
        ds.client_ids("valid")
    with pytest.raises(DatasetFormatError, match="no client 'zz' in split 'train'"):
        ds.get_client("train", "zz")
    with pytest.raises(DatasetFormatError, match="out of range"):
        ds.get_client("train", len(SIZES))


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


def test_assets_round_trip_and_corruption_is_named(tmp_path):
    schema = {"y": FeatureSpec("int32", ())}
    vocab = json.dumps(["<pad>", "the", "ü"]).encode()
    with DatasetWriter(tmp_path / "ds", schema) as writer:
        writer.add_client("train", "a", {"y": np.arange(3)})
        writer.add_asset("vocab.json", vocab)
        with pytest.raises(ValueError, match="duplicate asset"):
            writer.add_asset("vocab.json", b"")
        with pytest.raises(ValueError, match="invalid"):
            writer.add_asset("../escape", b"")
    ds = FederatedDataset(tmp_path / "ds")
    assert ds.asset("vocab.json") == vocab
    with pytest.raises(DatasetFormatError, match="no asset 'words'"):
        ds.asset("words")
    (tmp_path / "ds" / "assets" / "vocab.json").write_bytes(vocab.replace(b"the", b"tha"))
    with pytest.raises(DatasetFormatError, match=r"assets/vocab.json: size or sha256"):
        ds.asset("vocab.json")
