"""Recipe tabular: CSV, Parquet and Hugging Face datasets, with a client column or a partitioner."""

import csv
import json
import math
import warnings

import numpy as np
import pytest

from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset

CLIENTS = ["007", "alice", "7", "bob/1"]  # "007" and "7" are different clients: ids stay text


def table(seed=0, n=60, clients=CLIENTS):
    rng = np.random.default_rng(seed)
    return {"user": rng.choice(clients, n).tolist(), "f1": rng.integers(-5, 5, n).tolist(),
            "f2": np.round(rng.normal(size=n), 4).tolist(), "f3": np.round(rng.random(n), 3).tolist(),
            "species": rng.choice(["setosa", "virginica", "versicolor"], n).tolist()}


def write_csv(path, cols, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(list(cols))
        w.writerows(zip(*cols.values()))
    return path


def assert_fails(tmp_path, overrides, *fragments):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_preprocess("tabular", out, overrides, progress=None)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return message


def check_grouped(ds, split, cols, label_names=None):
    """Every row is in its client, in file order; x = (f1, f2, f3); y = the label (id)."""
    order = list(dict.fromkeys(cols["user"]))
    assert ds.client_ids(split).tolist() == order
    for cid in order:
        rows = [i for i, u in enumerate(cols["user"]) if u == cid]
        got = ds.get_client(split, cid)
        want_x = np.array([[cols["f1"][i], cols["f2"][i], cols["f3"][i]] for i in rows], np.float32)
        np.testing.assert_array_equal(got["x"], want_x)
        labels = [cols["species"][i] for i in rows]
        np.testing.assert_array_equal(got["y"], [label_names.index(v) for v in labels] if label_names else labels)
    assert ds.client_sizes(split).sum() == len(cols["user"])


def test_csv_client_column_string_labels(tmp_path):
    train, test = table(0), table(1, 25)
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "test.tsv", test, delimiter="\t")
    out = run_preprocess("tabular", tmp_path / "ds", [
        f"train={tmp_path / 'train.csv'}", "client_key=user", "label_key=species", "input_key=f1,f2,f3"],
        progress=None)
    ds = FederatedDataset(out)
    names = json.loads(ds.asset("labels.json"))
    assert names == ["setosa", "versicolor", "virginica"]  # sorted: id = position
    assert ds.metadata["schema"]["features"] == [{"name": "x", "dtype": "float32", "shape": [3]},
                                                 {"name": "y", "dtype": "int32", "shape": []}]
    check_grouped(ds, "train", train, names)
    # tab-separated, with a test file; default inputs = every column but label and client
    write_csv(tmp_path / "train.tsv", train, delimiter="\t")
    write_csv(tmp_path / "test.tsv", test, delimiter="\t")
    out = run_preprocess("tabular", tmp_path / "ds2", [
        f"train={tmp_path / 'train.tsv'}", f"test={tmp_path / 'test.tsv'}", "csv_delimiter=\t", "client_key=user",
        "label_key=species"], progress=None)
    ds = FederatedDataset(out)
    assert json.loads(ds.asset("labels.json")) == names
    check_grouped(ds, "train", train, names)
    check_grouped(ds, "test", test, names)


def test_csv_partitioners_cover_every_row(tmp_path):
    n = 400
    rng = np.random.default_rng(2)
    cols = {"idx": list(range(n)), "a": rng.normal(size=n).round(5).tolist(), "label": rng.integers(0, 4, n).tolist()}
    write_csv(tmp_path / "d.csv", cols)
    for partitioner in ("iid", "dirichlet", "shards", "quantity"):
        out = run_preprocess("tabular", tmp_path / partitioner, [
            f"train={tmp_path / 'd.csv'}", f"partitioner={partitioner}", "num_clients=8", "seed=3",
            "quantity_sigma=1.5"], progress=None)
        ds = FederatedDataset(out)
        assert ds.client_ids("train").tolist() == [f"client_{i:05d}" for i in range(8)]
        seen = []
        for i in range(8):
            got = ds.get_client("train", i)
            rows = got["x"][:, 0].astype(np.int64)  # column idx survives float32 exactly
            np.testing.assert_array_equal(got["x"][:, 1], np.array(cols["a"], np.float32)[rows])
            np.testing.assert_array_equal(got["y"], np.array(cols["label"])[rows])
            seen.extend(rows.tolist())
        assert sorted(seen) == list(range(n))
        if partitioner == "quantity":
            sizes = ds.client_sizes("train")
            assert sizes.max() > 2 * sizes.min()  # skewed, from the seeded log-normal
    # per-client train/test split
    out = run_preprocess("tabular", tmp_path / "split", [f"train={tmp_path / 'd.csv'}", "test_fraction=0.25",
                                                          "num_clients=4"], progress=None)
    ds = FederatedDataset(out)
    for i in range(4):
        sizes = [len(ds.get_client(s, i)["y"]) for s in ("train", "test")]
        assert sizes[1] == math.ceil(0.25 * sum(sizes))


def test_csv_bad_input(tmp_path):
    cols = table(0, 12)
    path = write_csv(tmp_path / "t.csv", cols)
    base = [f"train={path}", "client_key=user", "label_key=species"]
    text = path.read_bytes()
    path.write_bytes(text[: text.rindex(b",")])  # truncated inside the last row
    assert_fails(tmp_path, base, str(path), "line 13", f"client {cols['user'][-1]!r}", "4 fields",
                 "truncated file")
    write_csv(path, cols)
    assert_fails(tmp_path, [*base, "input_key=f1,f9"], str(path), "no column 'f9'")
    assert_fails(tmp_path, [f"train={path}", "client_key=uzer", "label_key=species"], str(path), "no column 'uzer'")
    path.write_bytes(text.replace(b"bob/1", b"bob\xff1", 1))
    assert_fails(tmp_path, base, str(path), "client b'bob\\xff1'", "not valid UTF-8")
    path.write_bytes(text.replace(b"species", b"f4", 1))
    assert_fails(tmp_path, [f"train={path}", "client_key=user", "label_key=f3"], str(path), "line 2",
                 f"client {cols['user'][0]!r}", f"column 'f4': {cols['species'][0]!r} is not a number")
    assert_fails(tmp_path, [f"train={tmp_path / 'missing.csv'}"], "missing.csv", "no such file")
    assert_fails(tmp_path, [f"train={tmp_path / 'data.xlsx'}"], "cannot tell the format")


# ---------------------------------------------------------------------------------------------- parquet


def test_parquet_round_trip_and_bad_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(4)
    n = 40
    ids = rng.choice(["w1", "w2", "w3"], n)
    pixels = rng.random((n, 4, 4), dtype=np.float32)
    labels = rng.integers(0, 10, n)
    t = pa.table({"writer": pa.array([s.encode() for s in ids], pa.binary()),
                  "pixels": pa.array(pixels.reshape(n, 4, 4).tolist(), pa.list_(pa.list_(pa.float32()))),
                  "label": pa.array(labels, pa.int64())})
    pq.write_table(t, tmp_path / "d.parquet", row_group_size=16)
    out = run_preprocess("tabular", tmp_path / "ds", [
        f"train={tmp_path / 'd.parquet'}", "client_key=writer", "input_key=pixels", "input_shape=4,4,1"],
        progress=None)
    ds = FederatedDataset(out)
    assert ds.client_ids("train").tolist() == list(dict.fromkeys(ids.tolist()))
    for cid in ds.client_ids("train"):
        rows = np.flatnonzero(ids == cid)
        got = ds.get_client("train", cid)
        np.testing.assert_array_equal(got["x"], pixels[rows][..., None])
        np.testing.assert_array_equal(got["y"], labels[rows])

    def write(**changes):
        cols = {"writer": t.column("writer"), "pixels": t.column("pixels"), "label": t.column("label"), **changes}
        pq.write_table(pa.table(cols), tmp_path / "bad.parquet")
        return [f"train={tmp_path / 'bad.parquet'}", "client_key=writer", "input_key=pixels"]

    assert_fails(tmp_path, [*write(), "label_key=digit"], "bad.parquet", "no column 'digit'")
    bad_ids = [s.encode() for s in ids]
    bad_ids[5] = b"w\xff9"
    assert_fails(tmp_path, write(writer=pa.array(bad_ids, pa.binary())), "bad.parquet", "row 5",
                 "client b'w\\xff9'", "not valid UTF-8")
    ragged = pixels.tolist()
    ragged[7] = ragged[7][:3]
    assert_fails(tmp_path, write(pixels=pa.array(ragged, pa.list_(pa.list_(pa.float32())))), "bad.parquet",
                 "row 7", f"client {str(ids[7])!r}", "a list of 3 values where the others have 4")
    ragged = pixels.tolist()
    ragged[9][2] = ragged[9][2][:2]
    assert_fails(tmp_path, write(pixels=pa.array(ragged, pa.list_(pa.list_(pa.float32())))), "bad.parquet",
                 "row 9", f"client {str(ids[9])!r}", "a list of 2 values")
    nulls = labels.tolist()
    nulls[3] = None
    assert_fails(tmp_path, write(label=pa.array(nulls, pa.int64())), "bad.parquet", "row 3", f"client {str(ids[3])!r}",
                 "null")
    data = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "bad.parquet").write_bytes(data[: len(data) // 2])
    assert_fails(tmp_path, [f"train={tmp_path / 'bad.parquet'}", "client_key=writer"], "bad.parquet",
                 "not a readable Parquet file", "truncated")


# ---------------------------------------------------------------------------------------------- hugging face


def test_hf_save_to_disk_and_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("PIL")
    rng = np.random.default_rng(6)

    def split(n):
        return {"image": [rng.integers(0, 256, (5, 5), dtype=np.uint8) for _ in range(n)],
                "label": rng.integers(0, 3, n).tolist(), "client": rng.choice(["a", "b", "c"], n).tolist()}

    parts = {"train": split(30), "test": split(9)}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"]),
                                  "client": datasets.Value("string")})
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in parts.items()})
    dd.save_to_disk(str(tmp_path / "saved"))
    out = run_preprocess("tabular", tmp_path / "ds", [
        f"hf_dataset={tmp_path / 'saved'}", "test=test", "client_key=client", "input_key=image",
        "input_shape=5,5,1", "input_scale=0.00390625"], progress=None)
    ds = FederatedDataset(out)
    for name, cols in parts.items():
        order = list(dict.fromkeys(cols["client"]))
        assert ds.client_ids(name).tolist() == order
        for cid in order:
            rows = [i for i, c in enumerate(cols["client"]) if c == cid]
            got = ds.get_client(name, cid)
            np.testing.assert_array_equal(got["x"], np.stack([cols["image"][i] for i in rows])[..., None] / 256)
            np.testing.assert_array_equal(got["y"], [cols["label"][i] for i in rows])
    # a local Parquet file through datasets.load_dataset, partitioned
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    x = rng.normal(size=(50, 3)).astype(np.float32)
    pq.write_table(pa.table({"v": pa.array(x.tolist(), pa.list_(pa.float32())), "label": np.arange(50) % 5}),
                   tmp_path / "t.parquet")
    out = run_preprocess("tabular", tmp_path / "ds3", [
        "hf_dataset=parquet", f"hf_data_files=train={tmp_path / 't.parquet'}", f"hf_cache_dir={tmp_path / 'cache'}",
        "partitioner=dirichlet", "num_clients=5", "alpha=1.0"], progress=None)
    ds = FederatedDataset(out)
    got = [ds.get_client("train", i) for i in range(5)]
    xs = np.concatenate([g["x"] for g in got])
    assert len(xs) == 50
    order = np.lexsort(xs.T[::-1])
    np.testing.assert_array_equal(xs[order], x[np.lexsort(x.T[::-1])])  # every row once, unchanged
    assert_fails(tmp_path, [f"hf_dataset={tmp_path / 'saved'}", "test=validation", "client_key=client"],
                 "no split 'validation'")


def test_missing_optional_library_messages(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_extras(name, *args, **kwargs):
        if name.split(".")[0] in ("datasets", "pyarrow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_extras)
    assert_fails(tmp_path, ["hf_dataset=some/name"], "pip install datasets")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    assert_fails(tmp_path, [f"train={tmp_path / 'd.parquet'}"], "pip install pyarrow")
