"""Recipe fedjax-sqlite: FedJAX SQLite files with real zlib + msgpack rows in FedJAX's ndarray encoding."""

import sqlite3
import zlib

import numpy as np
import pytest

from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset
from fedstream.recipes import fedjax_sqlite

msgpack = pytest.importorskip("msgpack")

from fedjax_fixtures import CREATE, fedjax_blob, write_db  # noqa: E402 - needs msgpack


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
                                                              "strip_id_prefix=True", "require_xy=False",
                                                              "features=pixels,label"], progress=None)
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
    # numeric features without x / y: refused, naming what was found and the keys to set
    assert_fails(tmp_path, [f"train={tmp_path / 'a.sqlite'}", "features=tokens,score", "label_key=label"],
                 "a.sqlite", "features tokens, score, y but no 'x'", "--config.input_key=FEATURE",
                 "--config.require_xy=False")
    out = run_preprocess("fedjax-sqlite", tmp_path / "ds", [
        f"train={tmp_path / 'a.sqlite'}", f"files=held_out={tmp_path / 'b.sqlite'}",
        "features=tokens,score", "label_key=label", "require_xy=False"], progress=None)
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


def test_known_datasets_inferred_without_keys(tmp_path, capsys):
    """No input_key / label_key: FedJAX's EMNIST and CIFAR-100 get their mapping; anything else is refused."""
    train = emnist_like(6, [3, 2])
    write_db(tmp_path / "emnist.sqlite", [(c, e, None) for c, e in train])
    out = run_preprocess("fedjax-sqlite", tmp_path / "e", [f"train={tmp_path / 'emnist.sqlite'}"], progress=None)
    ds = FederatedDataset(out)
    assert ds.metadata["schema"]["features"] == [{"name": "x", "dtype": "float32", "shape": [28, 28, 1]},
                                                 {"name": "y", "dtype": "int32", "shape": []}]
    np.testing.assert_array_equal(ds.get_client("train", 1)["x"], train[1][1]["pixels"][..., None])  # as stored
    assert "FedJAX's EMNIST recognised: x = pixels as 28,28,1, y = label (values as stored)" in capsys.readouterr().err
    rng = np.random.default_rng(7)
    cifar = [(f"{i:016x}:{i}".encode(), {"image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                                         "label": rng.integers(0, 100, n), "coarse_label": rng.integers(0, 20, n)})
             for i, n in enumerate([2, 4])]
    write_db(tmp_path / "cifar.sqlite", [(c, e, None) for c, e in cifar])
    ds = FederatedDataset(run_preprocess("fedjax-sqlite", tmp_path / "c", [f"train={tmp_path / 'cifar.sqlite'}"],
                                         progress=None))
    assert {f["name"]: (f["dtype"], f["shape"]) for f in ds.metadata["schema"]["features"]} == {
        "x": ("uint8", [32, 32, 3]), "y": ("int32", []), "coarse_label": ("int64", [])}
    np.testing.assert_array_equal(ds.get_client("train", 1)["x"], cifar[1][1]["image"])
    np.testing.assert_array_equal(ds.get_client("train", 1)["y"], cifar[1][1]["label"])
    # not a known dataset: one line naming the features found and the config keys
    write_db(tmp_path / "other.sqlite", [(b"u1", {"pixels": np.zeros((2, 5), np.float32),
                                                 "label": np.zeros(2, np.int32)}, None)])
    message = assert_fails(tmp_path, [f"train={tmp_path / 'other.sqlite'}"], "other.sqlite",
                           "features pixels, label but no 'x' or 'y', which the trainer reads",
                           "--config.input_key=FEATURE and --config.label_key=FEATURE")
    assert len(message) < 400
    out = run_preprocess("fedjax-sqlite", tmp_path / "o", [f"train={tmp_path / 'other.sqlite'}", "require_xy=False"],
                         progress=None)
    assert [f["name"] for f in FederatedDataset(out).metadata["schema"]["features"]] == ["pixels", "label"]


def test_fedjax_convention(tmp_path):
    """x = 1 - pixels and domain_id as FedJAX's emnist.load_data computes them (fedjax/datasets/emnist.py)."""
    rng = np.random.default_rng(8)
    ids = [b"0123456789abcdef:f2100_01", b"fedcba9876543210:f2599_99", b"00000000000000aa:f2600_00", b"f0042_07"]
    rows = [(cid, {"pixels": rng.random((n, 28, 28), dtype=np.float32), "label": rng.integers(0, 62, n).astype(
        np.int32)}, None) for cid, n in zip(ids, [2, 3, 1, 2])]
    write_db(tmp_path / "train.sqlite", rows)
    out = run_preprocess("fedjax-sqlite", tmp_path / "ds", [f"train={tmp_path / 'train.sqlite'}",
                                                            "fedjax_convention=True", "strip_id_prefix=True"],
                         progress=None)
    ds = FederatedDataset(out)
    assert ds.client_ids("train").tolist() == ["f2100_01", "f2599_99", "f2600_00", "f0042_07"]
    assert {f["name"]: (f["dtype"], f["shape"]) for f in ds.metadata["schema"]["features"]} == {
        "x": ("float32", [28, 28, 1]), "y": ("int32", []), "domain_id": ("int32", [])}
    for i, (cid, examples, _) in enumerate(rows):
        got = ds.get_client("train", i)
        np.testing.assert_array_equal(got["x"], 1 - examples["pixels"][..., np.newaxis])  # FedJAX's preprocess_batch
        np.testing.assert_array_equal(got["y"], examples["label"])
        # fedjax.datasets.emnist.domain_id: writers 2100-2599 (high school) -> 0, else (census) 1
        assert got["domain_id"].dtype == np.int32 and got["domain_id"].tolist() == [[0, 0, 1, 1][i]] * len(got["y"])
    assert ds.metadata["config"]["fedjax_convention"] is True
    # an id FedJAX's domain_id rejects; a file of no known dataset; keys that the convention sets itself
    write_db(tmp_path / "bad_id.sqlite", [(b"writer_7", rows[0][1], None)])
    assert_fails(tmp_path, [f"train={tmp_path / 'bad_id.sqlite'}", "fedjax_convention=True"], "bad_id.sqlite",
                 "client 'writer_7'", "domain_id (fedjax_convention) is undefined")
    write_db(tmp_path / "other.sqlite", [(b"f0000_00", {"tokens": np.zeros((2, 3), np.int64)}, None)])
    assert_fails(tmp_path, [f"train={tmp_path / 'other.sqlite'}", "fedjax_convention=True"], "other.sqlite",
                 "needs a file of FedJAX's EMNIST (pixels, label) or CIFAR-100", "has features tokens")
    assert_fails(tmp_path, [f"train={tmp_path / 'train.sqlite'}", "fedjax_convention=True", "input_key=pixels"],
                 "fedjax_convention=True sets x and y itself; leave input_key unset")


def test_both_spellings(tmp_path):
    """`fedjax-sqlite` (README) and `fedjax_sqlite` (module) name the same recipe, also for the up-to-date check."""
    from fedstream.catalog import catalog

    write_db(tmp_path / "t.sqlite", [(c, e, None) for c, e in emnist_like(9, [2])])
    args = [f"train={tmp_path / 't.sqlite'}"]
    out = run_preprocess("fedjax_sqlite", tmp_path / "ds", args, progress=None)
    assert run_preprocess("fedjax-sqlite", out, args, progress=None) == out  # same recipe: up to date
    listing = catalog(("recipes",))
    assert "  fedjax-sqlite " in listing and "fedjax_sqlite" not in listing.replace("fedjax-sqlite", "")
