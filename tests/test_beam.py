"""The Beam route of `fedstream preprocess` (fedstream/data/beam.py) against the single-process route.

The Beam tests skip when apache_beam is not installed (it is the optional `beam` extra); the
DatasetWriter.add_shard and CLI checks run everywhere.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from fedstream.data.format import FeatureSpec, encode_examples
from fedstream.data.reader import FederatedDataset
from fedstream.data.writer import DatasetWriter

HAVE_BEAM = importlib.util.find_spec("apache_beam") is not None
HAVE_DATASETS = importlib.util.find_spec("datasets") is not None
MULTI_PROCESS = ["direct_num_workers=2", "direct_running_mode=multi_processing"]


def _csv(path: pathlib.Path, rows: int, seed: int) -> None:
    """Rows of 23 interleaved clients: an integer and a float input, an integer label (quoted cells too)."""
    rng = np.random.default_rng(seed)
    lines = ["user,a,b,label"]
    for _ in range(rows):
        user = f"u{rng.integers(0, 23)}"
        lines.append(f'"{user}",{rng.integers(0, 100)},{rng.random():.6f},{rng.integers(0, 5)}')
    path.write_text("\r\n".join(lines) + "\r\n")


def _parquet(path: pathlib.Path, rows: int, seed: int) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(seed)
    table = pa.table({"user": [f"c{i}" for i in rng.integers(0, 17, rows)],
                      "pixels": [list(map(int, rng.integers(0, 255, 6))) for _ in range(rows)],
                      "label": rng.integers(0, 10, rows).astype(np.int16)})
    pq.write_table(table, path, row_group_size=97)


def _hf_dataset_dict(directory: pathlib.Path) -> dict[str, dict[str, list]]:
    """A DatasetDict saved with save_to_disk: train and test splits, 11 interleaved clients, a sequence column,
    a float column, a class label and an unused text column. Returns the columns per split."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(7)
    features = datasets.Features({"note": datasets.Value("string"), "pixels": datasets.Sequence(datasets.Value("int16")),
                                  "user": datasets.Value("string"), "v": datasets.Value("float32"),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"])})
    parts = {}
    for split, n in (("train", 700), ("test", 150)):
        parts[split] = {"note": ["x" * int(k) for k in rng.integers(0, 9, n)],
                        "pixels": rng.integers(-300, 300, (n, 4)).tolist(),
                        "user": [f"u{k}" for k in rng.integers(0, 11, n)],
                        "v": rng.random(n).astype(np.float32).tolist(), "label": rng.integers(0, 3, n).tolist()}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in parts.items()}
                         ).save_to_disk(str(directory))
    return parts


def test_add_shard_gives_the_same_content_as_add_client(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    schema = {"x": FeatureSpec("float32", (3,)), "y": FeatureSpec("int32", ())}
    rng = np.random.default_rng(0)
    clients = {f"c{i}": {"x": rng.random((n, 3), np.float32), "y": np.arange(n, dtype=np.int32)}
               for i, n in enumerate([4, 0, 7, 2])}
    with DatasetWriter(tmp_path / "direct", schema) as w:
        for cid, data in clients.items():
            w.add_client("train", cid, data)
    with DatasetWriter(tmp_path / "adopted", schema) as w:
        for names in (["c2", "c0"], ["c3", "c1"]):
            part = tmp_path / f"part-{names[0]}.array_record"
            writer = ArrayRecordWriter(str(part), w.options)
            for cid in names:
                for record in encode_examples(schema, clients[cid], len(clients[cid]["y"])):
                    writer.write(record)
            writer.close()
            w.add_shard("train", part, [(cid, len(clients[cid]["y"])) for cid in names])
        with pytest.raises(ValueError, match="already added"):
            w.add_client("train", "c0", clients["c0"])
    a, b = FederatedDataset(tmp_path / "direct"), FederatedDataset(tmp_path / "adopted")
    assert a.content_digest("train") == b.content_digest("train")
    assert len(b.metadata["splits"]["train"]["shards"]) == 2
    np.testing.assert_array_equal(b.get_client("train", "c3")["x"], clients["c3"]["x"])
    b.verify()  # sizes and sha256 of the adopted shards


def test_beam_option_without_runner_is_refused(tmp_path):
    from fedstream import cli

    code = cli.main(["preprocess", "tabular", "--output", str(tmp_path / "o"), "--beam-option", "x=1"])
    assert code == 2


@pytest.mark.skipif(HAVE_BEAM, reason="checks the message shown when apache_beam is missing")
def test_runner_without_beam_says_how_to_install(tmp_path):
    from fedstream.config import ConfigError
    from fedstream.data.beam import run_preprocess_beam

    with pytest.raises(ConfigError, match=r"fedstream\[beam\]"):
        run_preprocess_beam("tabular", tmp_path / "o", ["train=x.csv", "client_key=user"])


@pytest.mark.skipif(not HAVE_BEAM, reason="apache_beam is not installed (pip install 'fedstream[beam]')")
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_beam_multi_process_digest_equals_single_process(tmp_path, fmt):
    from fedstream.data.beam import run_preprocess_beam
    from fedstream.data.preprocessing import run_preprocess

    if fmt == "csv":
        _csv(tmp_path / "train.csv", 2500, 1)
        _csv(tmp_path / "test.csv", 400, 2)
        overrides = [f"train={tmp_path / 'train.csv'}", f"test={tmp_path / 'test.csv'}", "client_key=user"]
    else:
        _parquet(tmp_path / "train.parquet", 1500, 1)
        _parquet(tmp_path / "test.parquet", 300, 2)
        overrides = [f"train={tmp_path / 'train.parquet'}", f"test={tmp_path / 'test.parquet'}", "client_key=user",
                     "input_scale=0.5"]
    single = run_preprocess("tabular", tmp_path / "single", overrides, progress=None)
    # Small read ranges and shards: many read tasks, several parts per worker, clients split over tasks.
    beam = run_preprocess_beam("tabular", tmp_path / "beam", overrides, beam_options=MULTI_PROCESS,
                               range_bytes=2048, records_per_shard=300, progress=None)
    a, b = FederatedDataset(single), FederatedDataset(beam)
    for split in ("train", "test"):
        assert a.content_digest(split) == b.content_digest(split)
        assert len(b.metadata["splits"][split]["shards"]) >= 1
    assert len(b.metadata["splits"]["train"]["shards"]) > 1
    assert b.metadata["input_fingerprint"] == a.metadata["input_fingerprint"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left
    # Rerunning with the same inputs is a no-op, as on the single-process route.
    before = (beam / "_SUCCESS").stat().st_mtime_ns
    run_preprocess_beam("tabular", beam, overrides, progress=None)
    assert (beam / "_SUCCESS").stat().st_mtime_ns == before


@pytest.mark.skipif(not HAVE_BEAM, reason="apache_beam is not installed (pip install 'fedstream[beam]')")
def test_beam_route_refuses_what_it_does_not_support(tmp_path):
    from fedstream.config import ConfigError
    from fedstream.data.beam import run_preprocess_beam

    _csv(tmp_path / "train.csv", 50, 0)
    with pytest.raises(ConfigError, match="client_key"):
        run_preprocess_beam("tabular", tmp_path / "o", [f"train={tmp_path / 'train.csv'}"], progress=None)
    with pytest.raises(ConfigError, match=r"supports the recipes .*tabular.*not 'digits'"):
        run_preprocess_beam("digits", tmp_path / "o", [], progress=None)
    with pytest.raises(ConfigError, match=r"--output=gs://b/o: object-store paths are not supported"):
        run_preprocess_beam("tabular", "gs://b/o", [f"train={tmp_path / 'train.csv'}", "client_key=user"],
                            progress=None)
    with pytest.raises(ConfigError, match=r"--config.inputs=s3://b/\*.jsonl: object-store paths"):
        run_preprocess_beam("grouped", tmp_path / "o", ["inputs=s3://b/*.jsonl", "group_key=k"], progress=None)
    with pytest.raises(ConfigError, match="DataflowRunner is not supported yet"):
        run_preprocess_beam("tabular", tmp_path / "o", [f"train={tmp_path / 'train.csv'}", "client_key=user"],
                            runner="DataflowRunner", progress=None)


@pytest.mark.skipif(not HAVE_BEAM, reason="apache_beam is not installed (pip install 'fedstream[beam]')")
@pytest.mark.parametrize("case", [
    ("savez", ["partitioner=dirichlet", "alpha=0.3", "test_fraction=0.2"]),
    ("savez_compressed", ["partitioner=shards", "shards_per_client=3"]),
    ("savez", ["client_key=g", "test_fraction=0.25", "features=x,y"]),
    ("savez", ["partitioner=iid", "float_dtype="]),
])
def test_beam_arrays_digest_equals_single_process(tmp_path, case):
    """The partitioner's assignment (and the test split's shuffle) computed once on the driver, rows read
    by workers (memory-mapped from a stored .npz, decompressed from a compressed one): the same dataset."""
    from fedstream.data.beam import run_preprocess_beam
    from fedstream.data.preprocessing import run_preprocess

    save, overrides = case
    rng = np.random.default_rng(3)
    n = 2000
    getattr(np, save)(tmp_path / "data.npz", x=rng.random((n, 2, 3)), y=rng.integers(0, 10, n).astype(np.int16),
                      g=np.array([f"c{i}" for i in rng.integers(0, 29, n)]))
    overrides = [f"path={tmp_path / 'data.npz'}", "num_clients=17", "seed=5"] + overrides
    if "client_key=g" not in overrides:
        overrides.append("features=x,y")
    single = run_preprocess("arrays", tmp_path / "single", overrides, progress=None)
    beam = run_preprocess_beam("arrays", tmp_path / "beam", overrides, beam_options=MULTI_PROCESS,
                               task_examples=300, records_per_shard=250, progress=None)
    a, b = FederatedDataset(single), FederatedDataset(beam)
    assert set(a.metadata["splits"]) == set(b.metadata["splits"])
    for split in a.metadata["splits"]:
        assert a.content_digest(split) == b.content_digest(split)
    assert len(b.metadata["splits"]["train"]["shards"]) > 1
    np.testing.assert_array_equal(a.get_client("train", a.client_ids("train")[3])["x"],
                                  b.get_client("train", a.client_ids("train")[3])["x"])


def _flat_corpus(directory: pathlib.Path, fmt: str, seed: int) -> str:
    """Two files of records over 31 domains of skewed sizes (interleaved), as JSON Lines, CSV or Parquet."""
    import json

    rng = np.random.default_rng(seed)
    paths = []
    for k in range(2):
        rows = [{"domain": f"d{int(rng.zipf(1.5)) % 31}", "text": "xyz é " * int(rng.integers(0, 6)),
                 "v": float(rng.normal()), "label": int(rng.integers(0, 4))} for _ in range(700)]
        path = directory / f"part-{k}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "csv":
            path.write_text("domain,text,v,label\n" + "".join(
                f'{r["domain"]},"{r["text"]}",{r["v"]!r},{r["label"]}\n' for r in rows))
        else:
            pa = pytest.importorskip("pyarrow")
            pq = pytest.importorskip("pyarrow.parquet")
            pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=111)
        paths.append(str(path))
    return f"{directory}/part-*.{fmt}"


@pytest.mark.skipif(not HAVE_BEAM, reason="apache_beam is not installed (pip install 'fedstream[beam]')")
@pytest.mark.parametrize("fmt, extra", [
    ("jsonl", ["feature_keys=v", "label_key=label", "max_examples=40"]),
    ("csv", ["text_encoding=chars", "sequence_length=16", "min_examples=3"]),
    ("parquet", ["min_examples=2", "max_examples=100"]),
])
def test_beam_grouped_digest_equals_single_process(tmp_path, fmt, extra):
    """A flat corpus grouped by key: byte ranges / row groups read by 2 worker processes and grouped with
    GroupByKey give the dataset of the single-process route (several spill buckets)."""
    from fedstream.data.beam import run_preprocess_beam
    from fedstream.data.preprocessing import run_preprocess

    overrides = [f"inputs={_flat_corpus(tmp_path, fmt, 4)}", "group_key=domain", "bucket_bytes=3000"] + extra
    single = run_preprocess("grouped", tmp_path / "single", overrides, progress=None)
    beam = run_preprocess_beam("grouped", tmp_path / "beam", overrides, beam_options=MULTI_PROCESS, range_bytes=4096,
                               records_per_shard=200, progress=None)
    a, b = FederatedDataset(single), FederatedDataset(beam)
    assert a.content_digest("train") == b.content_digest("train")
    assert sorted(a.client_ids("train")) == sorted(b.client_ids("train"))
    assert len(b.metadata["splits"]["train"]["shards"]) > 1
    assert b.metadata.get("assets") == a.metadata.get("assets")


@pytest.mark.skipif(not HAVE_BEAM, reason="apache_beam is not installed (pip install 'fedstream[beam]')")
def test_beam_grouped_bad_record_names_file_and_offset(tmp_path):
    from fedstream.data.beam import run_preprocess_beam

    good = '{"domain": "a", "text": "fine"}\n'
    (tmp_path / "c.jsonl").write_text(good * 300 + '{"text": "no domain"}\n' + good)
    with pytest.raises(ValueError, match=r"^\S+c\.jsonl byte 9600: no field 'domain' \(fields: text\)$"):
        run_preprocess_beam("grouped", tmp_path / "o", [f"inputs={tmp_path}/c.jsonl", "group_key=domain"],
                            range_bytes=4096, beam_options=MULTI_PROCESS, progress=None)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.skipif(not (HAVE_BEAM and HAVE_DATASETS), reason="needs apache_beam and datasets")
def test_beam_hf_digest_equals_single_process(tmp_path, monkeypatch):
    """A save_to_disk DatasetDict grouped by its client column: the driver writes the splits' used columns to
    Parquet, 2 worker processes read its row groups: the single-process route's dataset, temporary files gone."""
    from fedstream.data.beam import run_preprocess_beam
    from fedstream.data.preprocessing import run_preprocess

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    parts = _hf_dataset_dict(tmp_path / "hf")
    saved = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "hf").rglob("*"))
    overrides = [f"hf_dataset={tmp_path / 'hf'}", "test=test", "client_key=user", "input_key=v,pixels",
                 "input_scale=0.5"]
    single = run_preprocess("tabular", tmp_path / "single", overrides, progress=None)
    beam = run_preprocess_beam("tabular", tmp_path / "beam", overrides, beam_options=MULTI_PROCESS,
                               range_bytes=2048, records_per_shard=150, progress=None)
    a, b = FederatedDataset(single), FederatedDataset(beam)
    for split in ("train", "test"):
        assert a.content_digest(split) == b.content_digest(split)
    assert len(b.metadata["splits"]["train"]["shards"]) > 1
    assert b.metadata["input_fingerprint"] == a.metadata["input_fingerprint"]
    # One client against the columns it was built from (x = [v, pixels] * 0.5, rows in dataset order).
    cols = parts["test"]
    rows = [i for i, u in enumerate(cols["user"]) if u == "u3"]
    got = b.get_client("test", "u3")
    np.testing.assert_array_equal(got["x"], np.array([[cols["v"][i], *cols["pixels"][i]] for i in rows],
                                                     np.float64).astype(np.float32) * np.float32(0.5))
    np.testing.assert_array_equal(got["y"], [cols["label"][i] for i in rows])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no Parquet or temporary directory left
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "hf").rglob("*")) == saved
    before = (beam / "_SUCCESS").stat().st_mtime_ns
    run_preprocess_beam("tabular", beam, overrides, progress=None)  # same input: a no-op
    assert (beam / "_SUCCESS").stat().st_mtime_ns == before


@pytest.mark.skipif(not (HAVE_BEAM and HAVE_DATASETS), reason="needs apache_beam and datasets")
def test_beam_hf_bad_input_is_one_line(tmp_path, monkeypatch):
    from fedstream.config import ConfigError
    from fedstream.data.beam import run_preprocess_beam

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _hf_dataset_dict(tmp_path / "hf")
    hf = f"hf_dataset={tmp_path / 'hf'}"
    with pytest.raises(ValueError, match=r"^hf dataset '\S+' split 'test': no column 'client' "
                                         r"\(columns: note, pixels, user, v, label\)$"):
        run_preprocess_beam("tabular", tmp_path / "o", [hf, "train=test", "client_key=client"], progress=None)
    with pytest.raises(ValueError, match=r"^hf dataset '\S+': no split 'validation' \(splits: train, test\)$"):
        run_preprocess_beam("tabular", tmp_path / "o", [hf, "test=validation", "client_key=user"], progress=None)
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("PIL")
    images = datasets.Dataset.from_dict(
        {"image": [np.zeros((2, 2), np.uint8)] * 3, "user": ["a", "b", "a"], "label": [0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "user": datasets.Value("string"),
                                    "label": datasets.Value("int64")}))
    images.save_to_disk(str(tmp_path / "images"))
    with pytest.raises(ConfigError, match=r"^hf dataset '\S+' split 'train': column 'image' holds images; the Beam "
                                          r"route does not decode images \(use the single-process route\)$"):
        run_preprocess_beam("tabular", tmp_path / "o", [f"hf_dataset={tmp_path / 'images'}", "client_key=user"],
                            progress=None)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the Parquet directory is removed
