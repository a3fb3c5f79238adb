"""TFF readers (fedstream.data.tff) and the emnist / cifar100 recipes on files in TFF's upstream layouts."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import lzma
import sqlite3
import sys
import threading

import numpy as np
import pytest

from fedstream.data import tff
from fedstream.data.download import Remote
from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset
from fedstream.recipes import cifar100, emnist
from tff_fixtures import (cifar100_clients, emnist_clients, truncate, write_tff_h5, write_tff_h5_archive,
                          write_tff_sqlite)

HAS_H5PY = importlib.util.find_spec("h5py") is not None
needs_h5py = pytest.mark.skipif(not HAS_H5PY, reason="h5py is not installed (pip install 'fedstream[tff-h5]')")

EMNIST_IDS = ["f0003_12", "f0000_14", "f2100_00", "f0001_41"]  # deliberately not sorted


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def emnist_data():
    """Train/test clients for the 62-class and the digits-only splits (as in emnist_all.sqlite)."""
    rng = np.random.default_rng(1)
    return {
        "all_train": emnist_clients(rng, EMNIST_IDS, [7, 1, 12, 3]),
        "all_test": emnist_clients(rng, EMNIST_IDS, [2, 1, 3, 1]),
        "digits_only_train": emnist_clients(rng, EMNIST_IDS[:3], [4, 2, 5], num_classes=10),
        "digits_only_test": emnist_clients(rng, EMNIST_IDS[:3], [1, 1, 2], num_classes=10),
    }


@pytest.fixture(scope="module")
def emnist_sqlite(emnist_data, tmp_path_factory):
    return write_tff_sqlite(tmp_path_factory.mktemp("up") / "emnist_all.sqlite.lzma", emnist_data)


@pytest.fixture(scope="module")
def cifar_data():
    rng = np.random.default_rng(2)
    return {"train": cifar100_clients(rng, [str(i) for i in range(12)], size=3),
            "test": cifar100_clients(rng, [str(i) for i in range(3)], size=2)}


@pytest.fixture(scope="module")
def cifar_sqlite(cifar_data, tmp_path_factory):
    return write_tff_sqlite(tmp_path_factory.mktemp("up") / "cifar100.sqlite.lzma", cifar_data)


def _run(recipe, tmp_path, *overrides, name="out"):
    """run_preprocess with a private cache dir, counts checked as warnings."""
    with pytest.warns(UserWarning, match="expected"):
        return run_preprocess(recipe, tmp_path / name, [f"cache_dir={tmp_path / 'cache'}", "check_counts=False",
                                                        *overrides], progress=None)


def _assert_emnist_output(out, data, train_split, test_split):
    ds = FederatedDataset(out)
    assert ds.schema["x"].dtype == "float32" and ds.schema["x"].shape == (28, 28, 1)
    assert ds.schema["y"].dtype == "int32" and ds.schema["y"].shape == ()
    for split, upstream in (("train", train_split), ("test", test_split)):
        clients = data[upstream]
        assert ds.client_ids(split).tolist() == sorted(clients)  # TFF's order: sorted client ids
        for i, client_id in enumerate(ds.client_ids(split)):
            got = ds.get_client(split, i)
            want = clients[client_id]
            np.testing.assert_array_equal(got["x"], want["pixels"][..., None])  # bit-exact, 1.0 = background
            np.testing.assert_array_equal(got["y"], want["label"])
    assert "Federated EMNIST" in ds.metadata["source"]
    return ds


def _no_temp_files(tmp_path):
    cache = tmp_path / "cache"
    return not cache.exists() or not any(cache.iterdir())


# ------------------------------------------------------------------------------- tf.train.Example


def test_example_wire_format_matches_tensorflow():
    # Bytes TensorFlow writes for Example(features={"label": int64_list [7]}) and for a bytes_list
    # (packed int64s; map entries key=1, value=2; Feature oneof bytes=1, float=2, int64=3).
    label = b"\n\x10\n\x0e\n\x05label\x12\x05\x1a\x03\n\x01\x07"
    assert tff.serialize_example({"label": np.int64(7)}) == label
    assert tff.serialize_example({"s": b"hi"}) == b"\n\x0d\n\x0b\n\x01s\x12\x06\n\x04\n\x02hi"
    assert tff.serialize_example({"f": np.float32(1.0)}) == b"\n\x0f\n\x0d\n\x01f\x12\x08\x12\x06\n\x04\x00\x00\x80\x3f"
    parsed = tff.parse_example(label)
    assert list(parsed) == ["label"] and parsed["label"].dtype == np.int64 and parsed["label"].tolist() == [7]


def test_example_parses_unpacked_repeated_values():
    # Writers may emit numeric lists unpacked (one tag per value); protobuf accepts both encodings.
    value = b"\x1a\x04\x08\x07\x08\x09"  # Feature.int64_list = Int64List(value=[7, 9]), unpacked
    entry = b"\n\x01a\x12" + bytes([len(value)]) + value
    features = b"\n" + bytes([len(entry)]) + entry
    assert tff.parse_example(b"\n" + bytes([len(features)]) + features)["a"].tolist() == [7, 9]


def test_example_round_trip_of_all_kinds():
    values = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([-1, 2**40]), "b": [b"x", b"yz"],
              "s": "text"}
    parsed = tff.parse_example(tff.serialize_example(values))
    np.testing.assert_array_equal(parsed["f"], values["f"].ravel())
    assert parsed["i"].tolist() == [-1, 2**40] and parsed["b"] == [b"x", b"yz"] and parsed["s"] == [b"text"]


# ------------------------------------------------------------------------------------- SQLite reader


def test_sqlite_reader_order_shapes_and_kinds(tmp_path):
    rng = np.random.default_rng(0)
    clients = {
        "b": {"snippets": [b"to be", b"or not"], "tokens": [np.array([1, 2, 3]), np.array([4])],
              "score": np.array([5, -6]), "w": rng.random((2, 2, 3)).astype(np.float32)},
        "a": {"snippets": [b"x"], "tokens": [np.array([], dtype=np.int64)], "score": np.array([1]),
              "w": rng.random((1, 2, 3)).astype(np.float32)},
        "c": {"snippets": [b"p", b"q", b"r"], "tokens": [np.array([7])] * 3, "score": np.array([0, 1, 2]),
              "w": rng.random((3, 2, 3)).astype(np.float32)},
    }
    path = write_tff_sqlite(tmp_path / "so.sqlite", {"train": clients, "test": {"a": clients["a"]}},
                            interleave_seed=3)
    features = {"snippets": (), "tokens": None, "score": (), "w": (2, 3)}
    got = list(tff.iter_sqlite_clients(path, "train", features))
    assert [c for c, _ in got] == ["a", "b", "c"]
    for client_id, data in got:
        want = clients[client_id]
        assert data["snippets"] == want["snippets"]
        assert [t.tolist() for t in data["tokens"]] == [t.tolist() for t in want["tokens"]]
        assert data["score"].dtype == np.int64 and data["score"].tolist() == want["score"].tolist()
        assert data["w"].dtype == np.float32 and data["w"].shape == want["w"].shape
        np.testing.assert_array_equal(data["w"], want["w"])
    with tff.open_sqlite(path) as db:
        assert db.split_counts() == {"test": (1, 1), "train": (3, 6)}
        inferred = dict(db.clients("test"))  # features=None: all features, shapes from the first example
        assert sorted(inferred["a"]) == ["score", "snippets", "tokens", "w"]
        assert inferred["a"]["w"].shape == (1, 6) and inferred["a"]["snippets"] == [b"x"]
        assert inferred["a"]["tokens"].shape == (1, 0) and inferred["a"]["score"].tolist() == [1]
        # Inferred shapes are fixed: a variable-length feature needs an explicit None.
        with pytest.raises(tff.TFFFormatError, match=r"client 'b', example 0: feature 'tokens' has 3 values, "
                                                     r"expected 0 \(shape \(0,\)\)"):
            list(db.clients("train"))


def test_sqlite_lzma_is_decompressed_into_tmp_dir_and_removed(emnist_sqlite, emnist_data, tmp_path):
    lines = []
    with tff.open_sqlite(emnist_sqlite, tmp_dir=tmp_path, progress=lines.append) as db:
        assert len(list(tmp_path.iterdir())) == 1 and db.path.parent == tmp_path and db.source == emnist_sqlite
        got = dict(db.clients("all_test", emnist.FEATURES))
    assert list(tmp_path.iterdir()) == []
    assert sorted(got) == sorted(emnist_data["all_test"])
    assert any("decompressed" in line for line in lines)


def test_sqlite_xz_format_and_stale_temp_cleanup(emnist_data, tmp_path):
    path = write_tff_sqlite(tmp_path / "e.sqlite.xz", {"all_test": emnist_data["all_test"]}, lzma_format=lzma.FORMAT_XZ)
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".e.sqlite.xz.tmp-999999999-abc.sqlite"  # left by a killed process
    stale.write_bytes(b"x")
    assert len(list(tff.iter_sqlite_clients(path, "all_test", tmp_dir=cache))) == len(EMNIST_IDS)
    assert list(cache.iterdir()) == []


def test_sqlite_unknown_split_names_the_splits(emnist_sqlite, tmp_path):
    with pytest.raises(tff.TFFFormatError, match=r"no examples in split 'validation' \(splits: all_test, all_train"):
        list(tff.iter_sqlite_clients(emnist_sqlite, "validation", tmp_dir=tmp_path))


# ---------------------------------------------------------------------------------------- recipes


def test_emnist_sqlite_round_trip(emnist_sqlite, emnist_data, tmp_path):
    out = _run("emnist", tmp_path, f"source={emnist_sqlite}")
    ds = _assert_emnist_output(out, emnist_data, "all_train", "all_test")
    assert ds.metadata["config"]["only_digits"] is False
    assert ds.metadata["input_fingerprint"] == "sha256:" + hashlib.sha256(emnist_sqlite.read_bytes()).hexdigest()
    assert _no_temp_files(tmp_path)


def test_emnist_only_digits_reads_the_digit_splits(emnist_sqlite, emnist_data, tmp_path):
    out = _run("emnist", tmp_path, f"source={emnist_sqlite}", "only_digits=True")
    _assert_emnist_output(out, emnist_data, "digits_only_train", "digits_only_test")


def test_emnist_counts_are_checked_by_default(emnist_sqlite, emnist_data, tmp_path, monkeypatch):
    """Checked before converting (client_metadata; the .h5 files' shapes), so no client is converted first."""
    converted = []
    real = emnist.common.check_labels
    monkeypatch.setattr(emnist.common, "check_labels", lambda *a: converted.append(a) or real(*a))
    train = emnist_data["all_train"]
    want = rf"split 'train' has {len(train)} clients / {sum(len(c['label']) for c in train.values())} examples, " \
        r"but the upstream dataset has 3,400 / 671,585 \(--config.check_counts=False"
    with pytest.raises(ValueError, match=want):
        run_preprocess("emnist", tmp_path / "out", [f"source={emnist_sqlite}", f"cache_dir={tmp_path / 'cache'}"],
                       progress=None)
    assert not converted and not (tmp_path / "out").exists() and _no_temp_files(tmp_path)
    if HAS_H5PY:
        archive = write_tff_h5_archive(tmp_path / "fed_emnist.tar.bz2", {
            "fed_emnist_train.h5": train, "fed_emnist_test.h5": emnist_data["all_test"]})
        with pytest.raises(ValueError, match=want):
            run_preprocess("emnist", tmp_path / "out", [f"source={archive}", f"cache_dir={tmp_path / 'cache'}"],
                           progress=None)
        assert not converted and not (tmp_path / "out").exists() and _no_temp_files(tmp_path)


def test_emnist_expected_counts_match_tff():
    config = emnist.get_config()
    assert emnist.expected_counts(config) == {"train": (3400, 671_585), "test": (3400, 77_483)}
    config.only_digits = True
    assert emnist.expected_counts(config) == {"train": (3383, 341_873), "test": (3383, 40_832)}
    assert cifar100.expected_counts(cifar100.get_config()) == {"train": (500, 50_000), "test": (100, 10_000)}


@needs_h5py
@pytest.mark.parametrize("only_digits", [False, True])
def test_emnist_legacy_h5_archive(emnist_data, tmp_path, only_digits):
    stem = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
    upstream = ("digits_only_train", "digits_only_test") if only_digits else ("all_train", "all_test")
    archive = write_tff_h5_archive(tmp_path / f"{stem}.tar.bz2", {
        f"{stem}_train.h5": emnist_data[upstream[0]], f"{stem}_test.h5": emnist_data[upstream[1]]}, prefix="datasets/")
    out = _run("emnist", tmp_path, f"source={archive}", f"only_digits={only_digits}")
    _assert_emnist_output(out, emnist_data, *upstream)
    assert _no_temp_files(tmp_path)


@needs_h5py
def test_emnist_h5_directory_and_wrong_archive(emnist_data, tmp_path):
    directory = tmp_path / "extracted"
    directory.mkdir()
    write_tff_h5(directory / "fed_emnist_train.h5", emnist_data["all_train"])
    write_tff_h5(directory / "fed_emnist_test.h5", emnist_data["all_test"])
    _assert_emnist_output(_run("emnist", tmp_path, f"source={directory}"), emnist_data, "all_train", "all_test")
    # The 62-class files cannot serve only_digits=True: say which file is missing and what is there.
    with pytest.raises(tff.TFFFormatError, match=r"no fed_emnist_digitsonly_train.h5 \(has: fed_emnist_test.h5, "
                                                 r"fed_emnist_train.h5\)"):
        run_preprocess("emnist", tmp_path / "bad", [f"source={directory}", "only_digits=True"], progress=None)
    assert not (tmp_path / "bad").exists()


@needs_h5py
def test_emnist_digits_only_archive_without_the_flag_names_it(emnist_data, tmp_path):
    stem = "fed_emnist_digitsonly"
    archive = write_tff_h5_archive(tmp_path / f"{stem}.tar.bz2", {
        f"{stem}_train.h5": emnist_data["digits_only_train"], f"{stem}_test.h5": emnist_data["digits_only_test"]})
    with pytest.raises(tff.TFFFormatError, match=r"no fed_emnist_train.h5 \(has: fed_emnist_digitsonly_test.h5, "
                                                 r"fed_emnist_digitsonly_train.h5\); this is the digits-only file: "
                                                 r"set only_digits=True \(--config.only_digits=True\)"):
        run_preprocess("emnist", tmp_path / "bad", [f"source={archive}", f"cache_dir={tmp_path / 'cache'}"],
                       progress=None)
    assert not (tmp_path / "bad").exists()


def test_emnist_counts_of_the_other_variant_name_the_flag():
    config = emnist.get_config()
    assert "set only_digits=True" in emnist.counts_hint(config, dict(emnist.COUNTS[True]))
    assert emnist.counts_hint(config, {"train": (4, 23), "test": (4, 7)}) == ""
    config.only_digits = True
    assert "62-class file: set only_digits=False" in emnist.counts_hint(config, dict(emnist.COUNTS[False]))


def _assert_cifar_output(out, data):
    ds = FederatedDataset(out)
    assert {k: (v.dtype, v.shape) for k, v in ds.schema.items()} == {
        "x": ("uint8", (32, 32, 3)), "y": ("int32", ()), "coarse_label": ("int32", ())}
    for split, clients in data.items():
        assert ds.client_ids(split).tolist() == sorted(clients)  # string order: "0", "1", "10", "11", "2", ...
        for i, client_id in enumerate(ds.client_ids(split)):
            got, want = ds.get_client(split, i), clients[client_id]
            np.testing.assert_array_equal(got["x"], want["image"])
            np.testing.assert_array_equal(got["y"], want["label"])
            np.testing.assert_array_equal(got["coarse_label"], want["coarse_label"])


def test_cifar100_sqlite_round_trip(cifar_sqlite, cifar_data, tmp_path):
    _assert_cifar_output(_run("cifar100", tmp_path, f"source={cifar_sqlite}"), cifar_data)


@needs_h5py
def test_cifar100_legacy_h5_archive(cifar_data, tmp_path):
    archive = write_tff_h5_archive(tmp_path / "fed_cifar100.tar.bz2", {
        "fed_cifar100_train.h5": cifar_data["train"], "fed_cifar100_test.h5": cifar_data["test"]})
    _assert_cifar_output(_run("cifar100", tmp_path, f"source={archive}"), cifar_data)


def test_cifar100_download_from_a_local_server(cifar_sqlite, cifar_data, tmp_path, monkeypatch):
    payload = cifar_sqlite.read_bytes()
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        remote = Remote(f"http://127.0.0.1:{httpd.server_address[1]}/tff/cifar100.sqlite.lzma",
                        sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
        monkeypatch.setitem(cifar100.REMOTES, "sqlite", remote)
        out = _run("cifar100", tmp_path)
        _assert_cifar_output(out, cifar_data)
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar100.sqlite.lzma"]
        assert FederatedDataset(out).metadata["input_fingerprint"] == f"sha256:{remote.sha256}"
        # Rerun: the dataset is up to date (fingerprint = the pin), nothing is fetched.
        run_preprocess("cifar100", out, [f"cache_dir={tmp_path / 'cache'}", "check_counts=False"], progress=None)
        assert served == ["/tff/cifar100.sqlite.lzma"]
        # A wrong user-supplied pin is refused before anything is downloaded.
        with pytest.raises(ValueError, match="differs from the sha256 pinned"):
            run_preprocess("cifar100", tmp_path / "other", ["sha256=" + "ab" * 32], progress=None)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_emnist_sqlite_download_needs_a_sha256(tmp_path):
    with pytest.raises(ValueError, match=r"no sha256 is pinned for https://\S+/emnist_all.sqlite.lzma: pass "
                                         r"--config.sha256"):
        run_preprocess("emnist", tmp_path / "out", ["download=sqlite", f"cache_dir={tmp_path}"], progress=None)
    assert list(tmp_path.iterdir()) == []


def test_missing_h5py_is_a_clear_error(emnist_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(tff.MissingDependencyError, match=r"pip install 'fedstream\[tff-h5\]'"):
        tff.require_h5py()
    (tmp_path / "fed_emnist.tar.bz2").write_bytes(b"")
    with pytest.raises(ImportError, match=r"fedstream\[tff-h5\]"):  # before reading (or downloading) anything
        run_preprocess("emnist", tmp_path / "out", [f"source={tmp_path / 'fed_emnist.tar.bz2'}"], progress=None)
    with pytest.raises(ValueError, match=r"fedstream\[tff-h5\]"):  # the default download is the legacy archive
        run_preprocess("emnist", tmp_path / "out", [f"cache_dir={tmp_path}"], progress=None)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- bad input


def _bad_client_sqlite(path, emnist_data, bad_rows=None, **kwargs):
    """The emnist fixture, with client f0001_41's train examples replaced by `bad_rows`."""
    data = {split: dict(clients) for split, clients in emnist_data.items()}
    if bad_rows is not None:
        data["all_train"]["f0001_41"] = bad_rows
    return write_tff_sqlite(path, data, **kwargs)


def _rows(client, **changes):
    """Per-example dicts of a columnar client, example 1 changed by `changes` (None deletes a feature)."""
    rows = [{k: v[i] for k, v in client.items()} for i in range(len(client["label"]))]
    for key, value in changes.items():
        if value is None:
            del rows[1][key]
        else:
            rows[1][key] = value
    return rows


BAD_SQLITE = {
    "truncated": (lambda p, d: truncate(_bad_client_sqlite(p, d), 0.6), r"truncated LZMA file"),
    "missing feature": (lambda p, d: _bad_client_sqlite(p, d, _rows(d["all_train"]["f0001_41"], label=None)),
                        r"split 'all_train', client 'f0001_41', example 1: no feature 'label' \(has: pixels\)"),
    "mismatched shapes": (lambda p, d: _bad_client_sqlite(
        p, d, _rows(d["all_train"]["f0001_41"], pixels=np.ones((27, 28), np.float32))),
        r"split 'all_train', client 'f0001_41', example 1: feature 'pixels' has 756 values, expected 784"),
    "wrong kind": (lambda p, d: _bad_client_sqlite(
        p, d, _rows(d["all_train"]["f0001_41"], label=np.float32(3.0))),
        r"client 'f0001_41', example 1: feature 'label' is a float_list, earlier examples have a int64_list"),
    "duplicate client id": (lambda p, d: _bad_client_sqlite(p, d, extra_metadata=[("f0001_41", "all_train", 3)]),
                            r"split 'all_train': client 'f0001_41' is listed twice in client_metadata"),
    "metadata count": (lambda p, d: _bad_client_sqlite(p, d, metadata_counts={("all_train", "f0001_41"): 2}),
                       r"split 'all_train', client 'f0001_41': 3 examples, but client_metadata says 2"),
    "label out of range": (lambda p, d: _bad_client_sqlite(
        p, d, _rows(d["all_train"]["f0001_41"], label=np.int64(62))),
        r"split 'train', client 'f0001_41': feature 'label' has values \d+..62, expected 0..61"),
    "not a tf.Example": (lambda p, d: _bad_client_sqlite(p, d, [b"\xff\xff\xff"]),
                         r"client 'f0001_41', example 0: not a serialized tf.train.Example"),
}


@pytest.mark.parametrize("case", sorted(BAD_SQLITE))
def test_bad_sqlite_input_is_one_line_naming_file_and_client(case, emnist_data, tmp_path):
    make, pattern = BAD_SQLITE[case]
    path = make(tmp_path / "emnist_all.sqlite.lzma", emnist_data)
    with pytest.raises(ValueError, match=pattern) as info:
        run_preprocess("emnist", tmp_path / "out", [f"source={path}", f"cache_dir={tmp_path / 'cache'}",
                                                    "check_counts=False"], progress=None)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert not (tmp_path / "out").exists()  # the writer's temporary directory is gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "emnist_all.sqlite.lzma"]
    assert _no_temp_files(tmp_path)


def test_not_a_database(tmp_path):
    path = tmp_path / "junk.sqlite.lzma"
    with lzma.open(path, "wb", format=lzma.FORMAT_ALONE) as f:
        f.write(b"this is not sqlite" * 100)
    with pytest.raises(tff.TFFFormatError, match=r"junk.sqlite.lzma: SQLite error \(file is not a database\)"):
        list(tff.iter_sqlite_clients(path, "train", tmp_dir=tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []
    plain = tmp_path / "other.sqlite"
    con = sqlite3.connect(plain)
    con.execute("CREATE TABLE t (a)")
    con.close()
    with pytest.raises(tff.TFFFormatError, match=r"no table 'examples' \(tables: t\)"):
        tff.open_sqlite(plain)


def test_cli_prints_one_line(emnist_data, tmp_path, capsys):
    from fedstream.cli import main

    path = _bad_client_sqlite(tmp_path / "emnist_all.sqlite.lzma", emnist_data,
                              _rows(emnist_data["all_train"]["f0001_41"], label=None))
    code = main(["preprocess", "emnist", "--output", str(tmp_path / "out"), "--source", str(path),
                 f"--config.cache_dir={tmp_path / 'cache'}", "--config.check_counts=False"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedstream: error: ") and str(path) in last and "'f0001_41'" in last
    assert not (tmp_path / "out").exists()


@needs_h5py
@pytest.mark.parametrize("case", ["missing feature", "mismatched shapes", "mismatched counts", "truncated"])
def test_bad_h5_input(case, emnist_data, tmp_path):
    train = {k: dict(v) for k, v in emnist_data["all_train"].items()}
    bad = train["f0001_41"]
    if case == "missing feature":
        del bad["label"]
        pattern = r"fed_emnist_train.h5: client 'f0001_41': no feature 'label' \(has: pixels\)"
    elif case == "mismatched shapes":
        bad["pixels"] = bad["pixels"][:, :27]
        pattern = r"client 'f0001_41': feature 'pixels' has shape \(3, 27, 28\), expected \[n, 28, 28\]"
    elif case == "mismatched counts":
        bad["label"] = bad["label"][:2]
        pattern = r"client 'f0001_41': features have different example counts \{'pixels': 3, 'label': 2\}"
    else:
        pattern = r"truncated or unreadable archive"
    archive = write_tff_h5_archive(tmp_path / "fed_emnist.tar.bz2", {
        "fed_emnist_train.h5": train, "fed_emnist_test.h5": emnist_data["all_test"]})
    if case == "truncated":
        truncate(archive, 0.5)
    with pytest.raises(ValueError, match=pattern) as info:
        run_preprocess("emnist", tmp_path / "out", [f"source={archive}", f"cache_dir={tmp_path / 'cache'}",
                                                    "check_counts=False"], progress=None)
    assert "\n" not in str(info.value) and str(archive) in str(info.value)
    assert not (tmp_path / "out").exists() and _no_temp_files(tmp_path)


def test_emnist_writer_domains_follow_fedjax():
    from fedstream.recipes.emnist import writer_domain

    assert [writer_domain(c) for c in ("f2100_00", "f2599_99", "f2099_01", "f2600_00", "f0000_14", "x")] == \
        [0, 0, 1, 1, 1, 1]
