"""Recipe fedjax-sqlite: FedJAX SQLite files with real zlib + msgpack rows in FedJAX's ndarray encoding."""

import sqlite3
import zlib

import numpy as np
import pytest

from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset
from fedstream.recipes import fedjax_sqlite

msgpack = pytest.importorskip("msgpack")

CREATE = ("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, "
          "num_examples INTEGER NOT NULL);")  # fedjax.core.sqlite_federated_data.SQLiteFederatedDataBuilder


def fedjax_ext_pack(x):
    """fedjax/core/serialization.py `_msgpack_ext_pack`, re-typed here without FedJAX or JAX."""
    if isinstance(x, np.ndarray) and x.dtype.hasobject:
        flat = list(x.flatten())
        return msgpack.ExtType(4, msgpack.packb((x.shape, flat), use_bin_type=True))
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
    if isinstance(x, np.generic):
        a = np.asarray(x)
        return msgpack.ExtType(3, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
    return x


def fedjax_blob(examples):
    """`zlib.compress(serialization.msgpack_serialize(examples))`, as SQLiteFederatedDataBuilder.add_many."""
    return zlib.compress(msgpack.packb(examples, default=fedjax_ext_pack, strict_types=True))


def write_db(path, rows, create=CREATE):
    """rows: (client_id bytes, examples dict or raw blob, num_examples or None = computed)."""
    conn = sqlite3.connect(path)
    conn.execute(create)
    for cid, examples, n in rows:
        blob = examples if isinstance(examples, bytes) else fedjax_blob(examples)
        if n is None:
            n = len(next(iter(examples.values())))
        conn.execute("INSERT INTO federated_data VALUES (?, ?, ?);", (cid, blob, n))
    conn.commit()
    conn.close()
    return path


def emnist_like(seed, sizes, prefix=True):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        cid = f"f{seed:02d}{i:02d}_{i % 7:02d}"
        raw_id = (f"{rng.integers(0, 2**63):016x}:" if prefix else "") + cid
        out.append((raw_id.encode(), {"pixels": rng.random((n, 28, 28), dtype=np.float32),
                                      "label": rng.integers(0, 62, n).astype(np.int32)}))
    return out


EMNIST = ["input_key=pixels", "label_key=label", "input_shape=28,28,1"]


def assert_fails(tmp_path, overrides, *fragments):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        run_preprocess("fedjax-sqlite", out, overrides, progress=None)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary directory left
    return message


def test_decodes_fedjax_bytes_exactly():
    # {"x": np.array([1, 2], int32)} as FedJAX writes it, byte by byte: a fixmap of one str key, then
    # ext 8 (0xc7), length 19, type 1, holding fixarray(3) [fixarray [2], fixstr 'int32', bin8 of 8 bytes].
    inner = bytes.fromhex("93 91 02 a5") + b"int32" + bytes.fromhex("c4 08 01000000 02000000")
    blob = bytes.fromhex("81 a1") + b"x" + bytes.fromhex("c7 13 01") + inner
    assert fedjax_blob({"x": np.array([1, 2], np.int32)}) == zlib.compress(blob)  # the test's encoder agrees
    decoded = fedjax_sqlite.decode_examples(zlib.compress(blob))
    assert list(decoded) == ["x"] and decoded["x"].dtype == np.int32
    np.testing.assert_array_equal(decoded["x"], [1, 2])
    # scalars (ext 3) are not example arrays; bytes arrays (ext 4) decode without pickle
    with pytest.raises(ValueError, match="not an array"):
        fedjax_sqlite.decode_examples(fedjax_blob({"s": np.float32(1.5)}))
    strings = fedjax_sqlite.decode_examples(fedjax_blob({"t": np.array([b"ab", b"c"], dtype=object)}))["t"]
    assert strings.dtype == object and strings.tolist() == [b"ab", b"c"]
    ml_dtypes = pytest.importorskip("ml_dtypes")  # FedJAX names JAX's bfloat16 'bfloat16'; stored as float32
    half = np.array([1.5, -2.0], ml_dtypes.bfloat16)
    wide = fedjax_sqlite.decode_examples(fedjax_blob({"h": half}))["h"]
    assert wide.dtype == np.float32 and wide.tolist() == [1.5, -2.0]


def test_emnist_like_round_trip(tmp_path):
    train, test = emnist_like(1, [5, 0, 12, 3]), emnist_like(2, [2, 4])
    write_db(tmp_path / "train.sqlite", [(c, e, None) for c, e in train])
    write_db(tmp_path / "test.sqlite", [(c, e, None) for c, e in test])
    out = run_preprocess("fedjax-sqlite", tmp_path / "ds", [f"train={tmp_path / 'train.sqlite'}",
                                                            f"test={tmp_path / 'test.sqlite'}", *EMNIST],
                         progress=None)
    ds = FederatedDataset(out)
    assert ds.metadata["recipe"] == "fedjax_sqlite" and ds.metadata["input_fingerprint"].startswith("sha256:")
    assert ds.metadata["schema"]["features"] == [{"name": "x", "dtype": "float32", "shape": [28, 28, 1]},
                                                 {"name": "y", "dtype": "int32", "shape": []}]
    for split, rows in (("train", train), ("test", test)):
        assert ds.client_ids(split).tolist() == [c.decode() for c, _ in rows]  # rowid order, ids as stored
        for i, (_, examples) in enumerate(rows):
            got = ds.get_client(split, i)
            np.testing.assert_array_equal(got["x"], examples["pixels"][..., None])
            np.testing.assert_array_equal(got["y"], examples["label"])
    # the same again is up to date; strip_id_prefix drops FedJAX's "<16 hex>:" prefix
    assert run_preprocess("fedjax-sqlite", out, [f"train={tmp_path / 'train.sqlite'}",
                                                 f"test={tmp_path / 'test.sqlite'}", *EMNIST], progress=None) == out
    out2 = run_preprocess("fedjax-sqlite", tmp_path / "ds2", [f"files=train={tmp_path / 'train.sqlite'}",
                                                              "strip_id_prefix=True"], progress=None)
    ds2 = FederatedDataset(out2)
    assert ds2.client_ids("train").tolist() == [c.decode().split(":", 1)[1] for c, _ in train]
    assert ds2.splits == ["train"]
    assert [f["name"] for f in ds2.metadata["schema"]["features"]] == ["pixels", "label"]  # as in the file
    np.testing.assert_array_equal(ds2.get_client("train", 2)["pixels"], train[2][1]["pixels"])


def test_dtypes_feature_selection_and_extra_splits(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for i, n in enumerate([4, 1, 6]):
        rows.append((f"user/{i}".encode(), {"tokens": rng.integers(0, 1000, (n, 20)).astype(np.int64),
                                            "score": rng.normal(size=n),  # float64 -> float32
                                            "label": rng.integers(0, 5, n).astype(np.int64),
                                            "text": np.array([b"w" * (k + 1) for k in range(n)], dtype=object)}))
    write_db(tmp_path / "a.sqlite", [(c, e, None) for c, e in rows])
    write_db(tmp_path / "b.sqlite", [(c, e, None) for c, e in rows[:1]])
    assert_fails(tmp_path, [f"train={tmp_path / 'a.sqlite'}"], "a.sqlite", "client 'user/0'", "'text'",
                 "bytes strings", "--config.features")
    out = run_preprocess("fedjax-sqlite", tmp_path / "ds", [
        f"train={tmp_path / 'a.sqlite'}", f"files=held_out={tmp_path / 'b.sqlite'}",
        "features=tokens,score", "label_key=label"], progress=None)
    ds = FederatedDataset(out)
    assert ds.splits == ["held_out", "train"]
    assert {f["name"]: f["dtype"] for f in ds.metadata["schema"]["features"]} == {
        "tokens": "int64", "score": "float32", "y": "int32"}
    for i, (cid, examples) in enumerate(rows):
        got = ds.get_client("train", cid.decode())
        np.testing.assert_array_equal(got["tokens"], examples["tokens"])
        np.testing.assert_array_equal(got["score"], examples["score"].astype(np.float32))
        np.testing.assert_array_equal(got["y"], examples["label"])
    assert ds.client_ids("held_out").tolist() == ["user/0"]


@pytest.mark.parametrize("case", ["truncated_file", "truncated_blob", "missing_feature", "mismatched_counts",
                                  "mismatched_shape", "duplicate_id", "non_utf8_id", "wrong_num_examples",
                                  "not_msgpack", "no_table"])
def test_bad_input(tmp_path, case):
    good = emnist_like(4, [3, 2, 4], prefix=False)
    rows = [(c, e, None) for c, e in good]
    create = CREATE
    bad_id = good[1][0].decode()
    expect = [f"client {bad_id!r}"]
    if case == "truncated_blob":
        rows[1] = (rows[1][0], fedjax_blob(good[1][1])[:-20], 2)
        expect.append("truncated")
    elif case == "missing_feature":
        rows[1] = (rows[1][0], {"pixels": good[1][1]["pixels"]}, None)
        expect.append("'label'")
    elif case == "mismatched_counts":
        rows[1] = (rows[1][0], {"pixels": good[1][1]["pixels"], "label": good[1][1]["label"][:1]}, 2)
        expect.append("different example counts")
    elif case == "mismatched_shape":
        rows[1] = (rows[1][0], {"pixels": good[1][1]["pixels"][:, :, :27], "label": good[1][1]["label"]}, None)
        expect.append("cannot be reshaped")
    elif case == "duplicate_id":
        create = CREATE.replace(" PRIMARY KEY", "")  # FedJAX's table forbids it; a hand-made one may not
        rows[2] = (rows[0][0], good[2][1], None)
        expect = [f"client {good[0][0].decode()!r}", "duplicate client id"]
    elif case == "non_utf8_id":
        rows[1] = (b"f\xff\xfe_01", good[1][1], None)
        expect = ["client b'f\\xff\\xfe_01'", "not valid UTF-8"]
    elif case == "wrong_num_examples":
        rows[1] = (rows[1][0], good[1][1], 7)
        expect.append("num_examples is 7")
    elif case == "not_msgpack":
        rows[1] = (rows[1][0], zlib.compress(b"\xc1 definitely not msgpack"), 2)
        expect.append("not FedJAX msgpack")
    elif case == "no_table":
        create = CREATE.replace("federated_data", "examples")
        rows = []
        expect = ["no table 'federated_data'"]
    path = tmp_path / "train.sqlite"
    if rows:
        write_db(path, rows, create)
    else:
        sqlite3.connect(path).execute(create).connection.close()
    if case == "truncated_file":
        big = [(f"c{i:03d}".encode(), {"pixels": np.random.default_rng(i).random((20, 28, 28), dtype=np.float32),
                                       "label": np.zeros(20, np.int32)}, None) for i in range(8)]
        path.unlink()
        write_db(path, big)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expect = ["truncated or corrupt"]
    message = assert_fails(tmp_path, [f"train={path}", *EMNIST], str(path), *expect)
    assert len(message) < 400


def test_config_errors(tmp_path):
    assert_fails(tmp_path, [], "needs --config.train")
    assert_fails(tmp_path, [f"train={tmp_path / 'nope.sqlite'}"], "nope.sqlite", "no such file")
    assert not (tmp_path / "nope.sqlite").exists()  # opened read-only: never created
    (tmp_path / "text.sqlite").write_text("hello, not a database " * 100)
    assert_fails(tmp_path, [f"train={tmp_path / 'text.sqlite'}"], "text.sqlite", "not a readable SQLite file")
    write_db(tmp_path / "t.sqlite", [(c, e, None) for c, e in emnist_like(5, [2])])
    assert_fails(tmp_path, [f"train={tmp_path / 't.sqlite'}", f"files=train={tmp_path / 't.sqlite'}"],
                 "given twice")
    assert_fails(tmp_path, [f"train={tmp_path / 't.sqlite'}", "input_key=pixels", "input_shape=5,"],
                 "cannot be reshaped")
