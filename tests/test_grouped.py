"""The `grouped` recipe (preprocess/grouped.py) on the single-process route: a flat corpus grouped by a key.

Checked against a plain in-memory group-by of the same records (Python dicts, no spill); the Beam
route's equality with this one is in tests/test_beam.py.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

from fedstream import cli
from fedstream.data import text
from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset
from fedstream.recipes import grouped


def _corpus(directory: pathlib.Path, files: int = 3, rows: int = 400, seed: int = 0, skewed: bool = True) -> list[dict]:
    """JSON Lines files of records over 60 domains (of very different sizes if `skewed`), non-ASCII text included."""
    rng = np.random.default_rng(seed)
    records = []
    for k in range(files):
        with open(directory / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(rows):
                site = int(rng.zipf(1.6)) % 60 if skewed else int(rng.integers(0, 60))
                record = {"domain": f"site{site}.example", "text": "ab€ " * int(rng.integers(0, 9)),
                          "v": float(rng.normal()), "w": int(rng.integers(-5, 5)), "label": int(rng.integers(0, 4))}
                records.append(record)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


def _reference(records: list[dict]) -> dict[str, list[dict]]:
    """Group-by in memory, records in input order."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["domain"], []).append(record)
    return groups


def test_spilled_buckets_equal_an_in_memory_group_by(tmp_path, monkeypatch):
    records = _corpus(tmp_path, skewed=False)
    inputs = f"inputs={tmp_path}/part-*.jsonl"
    overrides = [inputs, "group_key=domain", "feature_keys=v,w", "label_key=label", "bucket_bytes=4000"]
    config = grouped.get_config()
    config.update_from_flattened_dict({"inputs": inputs[7:], "group_key": "domain", "bucket_bytes": 4000})
    assert grouped.num_buckets(config) >= 10
    spilled: list[int] = []
    spill = grouped._spill

    def recording_spill(*args):
        paths = spill(*args)
        spilled.extend(pathlib.Path(p).stat().st_size for p in paths)
        return paths

    monkeypatch.setattr(grouped, "_spill", recording_spill)
    ds = FederatedDataset(run_preprocess("grouped", tmp_path / "text", overrides + ["text_key=text"], progress=None))
    # Several buckets, none holding more than a fraction of the records (the memory bound).
    assert len(spilled) >= 10 and max(spilled) < sum(spilled) / 3
    reference = _reference(records)
    assert sorted(ds.client_ids("train")) == sorted(reference)
    for domain, rows in reference.items():
        client = ds.get_client("train", domain)
        assert [bytes(t) for t in client["text"]] == [r["text"].encode("utf-8") for r in rows]
        np.testing.assert_array_equal(client["x"], np.array([[r["v"], r["w"]] for r in rows], np.float32))
        np.testing.assert_array_equal(client["y"], [r["label"] for r in rows])
    # One bucket (everything in memory) gives the same content; only the client order in shards may differ.
    one = FederatedDataset(run_preprocess("grouped", tmp_path / "one", overrides[:-1] + ["text_key=text",
                                          "bucket_bytes=100000000"], progress=None))
    assert one.content_digest("train") == ds.content_digest("train")
    assert list(one.client_ids("train")) == sorted(reference)


def test_min_max_examples_chars_and_csv_input(tmp_path):
    records = _corpus(tmp_path, files=1, rows=600, seed=1)
    reference = {k: v[:7] for k, v in _reference(records).items() if len(v) >= 5}
    base = [f"inputs={tmp_path}/part-0.jsonl", "group_key=domain", "min_examples=5", "max_examples=7"]
    ds = FederatedDataset(run_preprocess("grouped", tmp_path / "chars", base + ["text_encoding=chars",
                                         "sequence_length=12"], progress=None))
    assert sorted(ds.client_ids("train")) == sorted(reference)
    vocab = text.char_vocabulary()
    for domain, rows in reference.items():
        x, y = text.char_sequences([r["text"].encode("utf-8") for r in rows], text.char_table(vocab), vocab, 12)
        client = ds.get_client("train", domain)
        np.testing.assert_array_equal(client["x"], x)
        np.testing.assert_array_equal(client["y"], y)
    assert text.Vocabulary.from_json(ds.asset("vocab.json")).size == 90
    # The same records as CSV give the same dataset as the JSON Lines file.
    with open(tmp_path / "data.csv", "w", encoding="utf-8") as f:
        f.write("domain,text,v,w,label\n")
        f.writelines(f'{r["domain"]},"{r["text"]}",{r["v"]!r},{r["w"]},{r["label"]}\n' for r in records)
    numeric = ["feature_keys=v,w", "label_key=label", "text_key="]
    a = FederatedDataset(run_preprocess("grouped", tmp_path / "a", base + numeric, progress=None))
    b = FederatedDataset(run_preprocess("grouped", tmp_path / "b", [f"inputs={tmp_path}/data.csv"] + base[1:] + numeric,
                                        progress=None))
    assert a.content_digest("train") == b.content_digest("train")
    assert a.metadata["splits"]["train"]["num_examples"] == sum(len(v) for v in reference.values())


@pytest.mark.parametrize("line, message", [
    ('{"text": "no key"}', r"part-0.jsonl line 3: no field 'domain' \(fields: text\)"),
    ('{"domain": "a", "text": "x"', r"part-0.jsonl line 3: not valid JSON"),
    ('{"domain": ["a"], "text": "x"}', r"part-0.jsonl line 3: group field 'domain' must be a string or an integer"),
    ('{"domain": "a", "text": 7}', r"part-0.jsonl line 3: text field 'text' must be a string"),
])
def test_bad_records_name_file_and_line(tmp_path, capsys, line, message):
    good = json.dumps({"domain": "a", "text": "fine"})
    (tmp_path / "part-0.jsonl").write_text(f"{good}\n\n{line}\n{good}\n")
    code = cli.main(["preprocess", "grouped", "--output", str(tmp_path / "o"), f"--config.inputs={tmp_path}/part-0.jsonl",
                     "--config.group_key=domain"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists() and not any(p.name.startswith(".o") for p in tmp_path.iterdir())


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "a.csv").write_text("site,text\nx,hello\n")
    with pytest.raises(ValueError, match="no column 'domain'"):
        run_preprocess("grouped", tmp_path / "o", [f"inputs={tmp_path}/a.csv", "group_key=domain"], progress=None)
    with pytest.raises(ValueError, match="config.inputs: .* matches no file"):
        run_preprocess("grouped", tmp_path / "o", [f"inputs={tmp_path}/*.jsonl", "group_key=site"], progress=None)
    with pytest.raises(ValueError, match="group_key"):
        run_preprocess("grouped", tmp_path / "o", [f"inputs={tmp_path}/a.csv"], progress=None)
