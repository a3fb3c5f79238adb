"""Recipes `shakespeare` and `stackoverflow` end to end on small files in TFF's and FedJAX's upstream layouts.

No network: the inputs are written by tests/tff_fixtures.py (SQLite with one
serialized tf.train.Example per row, LZMA-compressed like TFF's files) and
tests/fedjax_fixtures.py (FedJAX's `federated_data` table, zlib + msgpack rows,
text as bytes strings in ext type 4); the same data in both layouts must give
the same dataset.
"""

from __future__ import annotations

import bz2
import importlib.util
import io
import json
import re
import sqlite3
import tarfile
import warnings

import numpy as np
import pytest

from fedstream.cli import main as cli_main
from fedstream.data import text
from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset

from fedjax_fixtures import bytes_array, write_db, write_fedjax_text
from tff_fixtures import truncate, write_tff_h5_archive, write_tff_sqlite

CHAR_IDS = {c: i + 1 for i, c in enumerate(text.CHAR_VOCAB)}  # TFF: PAD 0, chars 1..86, OOV 87, BOS 88, EOS 89


def reference_char_rows(snippets: list[bytes], length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Plain-Python `joined` packing: BOS ids EOS per snippet, one stream, windows of length + 1."""
    ids: list[int] = []
    for s in snippets:
        ids += [88] + [CHAR_IDS.get(chr(b), 87) for b in s] + [89]
    rows = [ids[i: i + length + 1] for i in range(0, len(ids), length + 1)]
    rows = [r + [0] * (length + 1 - len(r)) for r in rows]
    return [r[:-1] for r in rows], [r[1:] for r in rows]


SHAKESPEARE = {
    "train": {
        "ALL_S_WELL_THAT_ENDS_WELL_CENTURION": [b"Ay, my lord.", b"dh"],
        "THE_TRAGEDY_OF_KING_LEAR_MACBETH": [b"What's done cannot be undone.\nTo bed, to bed!" * 3],
        "THE_TEMPEST_ARIEL": ["Full fathom five thy father lies; caf\u00e9 ~".encode(), b"x" * 79, b""],
    },
    "test": {
        "ALL_S_WELL_THAT_ENDS_WELL_CENTURION": [b"Good."],
        "THE_TRAGEDY_OF_KING_LEAR_MACBETH": [b"Out, out, brief candle!"],
        "THE_TEMPEST_ARIEL": [b"Where the bee sucks, there suck I."],
    },
}


def shakespeare_file(path, splits=None, **kwargs):
    splits = SHAKESPEARE if splits is None else splits
    return write_tff_sqlite(path, {split: {cid: {"snippets": list(s)} for cid, s in clients.items()}
                                   for split, clients in splits.items()}, **kwargs)


def last_line(stderr: str) -> str:
    """The error line: progress lines (decompressing ...) come before it; the error itself is one line."""
    lines = stderr.strip().splitlines()
    assert sum(line.startswith("fedstream: error:") for line in lines) == 1, stderr
    assert lines[-1].startswith("fedstream: error:"), stderr
    return lines[-1]


def preprocess(recipe, output, *overrides, cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_counts=False: the fixtures are not the published sizes
        return run_preprocess(recipe, output, [f"cache_dir={cache}", "check_counts=False", *overrides],
                              progress=None)


# ------------------------------------------------------------------------------------------ shakespeare


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shakespeare")
    source = shakespeare_file(tmp / "shakespeare.sqlite.lzma")
    return preprocess("shakespeare", tmp / "out", f"source={source}", cache=tmp / "cache")


def test_shakespeare_ids_windows_clients(shakespeare_dir):
    ds = FederatedDataset(shakespeare_dir)
    assert sorted(ds.splits) == ["test", "train"]
    for split, clients in SHAKESPEARE.items():
        assert ds.client_ids(split).tolist() == sorted(clients)  # TFF's ids, in TFF's (sorted) order
        for cid, snippets in clients.items():
            data = ds.get_client(split, ds.client_ids(split).tolist().index(cid))
            want_x, want_y = reference_char_rows(snippets, 80)
            assert data["x"].dtype == data["y"].dtype == np.int32 and data["x"].shape == (len(want_x), 80)
            assert data["x"].tolist() == want_x and data["y"].tolist() == want_y
    # The Tempest's train stream: BOS + 41 bytes ('é' = 2 OOV bytes) + EOS, BOS + 79 'x' + EOS, BOS EOS = 126 ids.
    ariel = ds.get_client("train", ds.client_ids("train").tolist().index("THE_TEMPEST_ARIEL"))
    assert len(ariel["x"]) == 2
    assert ariel["x"][0, :5].tolist() == [88, CHAR_IDS["F"], CHAR_IDS["u"], CHAR_IDS["l"], CHAR_IDS["l"]]
    assert ariel["x"][0, 35:40].tolist() == [CHAR_IDS["c"], CHAR_IDS["a"], CHAR_IDS["f"], 87, 87]  # 'é'
    assert ariel["x"][0, 40:42].tolist() == [CHAR_IDS[" "], 87]  # '~' is not in the vocabulary
    assert ariel["y"][0, 41] == 89 and ariel["x"][0, 42] == 89 and ariel["y"][0, 42] == 88
    # Windows of 81 over the joined stream: window 1 = stream[81:126] = 42 'x', EOS, BOS, EOS, then PAD.
    assert ariel["x"][1, :46].tolist() == [CHAR_IDS["x"]] * 42 + [89, 88, 89, 0]
    assert not ariel["x"][1, 45:].any() and ariel["y"][1, :45].tolist() == [CHAR_IDS["x"]] * 41 + [89, 88, 89, 0]
    assert ds.metadata["recipe"] == "shakespeare" and "Shakespeare" in ds.metadata["source"]
    assert ds.metadata["config"]["packing"] == "joined"
    assert ds.metadata["input_fingerprint"].startswith("sha256:")


def test_shakespeare_vocab_asset(shakespeare_dir):
    ds = FederatedDataset(shakespeare_dir)
    vocab = text.Vocabulary.from_json(ds.asset("vocab.json"))
    assert vocab == text.char_vocabulary()
    doc = json.loads(ds.asset("vocab.json"))
    assert (doc["pad"], doc["oov"], doc["bos"], doc["eos"], doc["size"]) == (0, 87, 88, 89, 90)
    assert doc["tokens"][:3] == ["d", "h", "l"] and doc["sequence_length"] == 80 and doc["packing"] == "joined"


def test_shakespeare_packings_and_length(tmp_path):
    source = shakespeare_file(tmp_path / "s.sqlite", {"train": {"A": [b"d", b"h"]}, "test": {"A": [b"l"]}})
    rows = {}
    for packing in text.PACKINGS:
        out = preprocess("shakespeare", tmp_path / packing, f"source={source}", "sequence_length=3",
                         f"packing={packing}", cache=tmp_path / "cache")
        c = FederatedDataset(out).get_client("train", 0)
        rows[packing] = (c["x"].tolist(), c["y"].tolist())
    d, h = CHAR_IDS["d"], CHAR_IDS["h"]
    assert rows["joined"] == ([[88, d, 89], [h, 89, 0]], [[d, 89, 88], [89, 0, 0]])
    assert rows["tff"] == ([[88, d, 89], [88, h, 89]], [[d, 89, 0], [h, 89, 0]])
    assert rows["fedjax"] == ([[88, d, 89], [88, h, 0]], [[d, 89, 88], [h, 89, 0]])


def test_shakespeare_legacy_h5_archive_matches_sqlite(tmp_path, shakespeare_dir):
    pytest.importorskip("h5py")
    files = {f"shakespeare_{split}.h5": {cid: {"snippets": np.array(s, dtype=object).astype(bytes)}
                                         for cid, s in clients.items()}
             for split, clients in SHAKESPEARE.items()}
    archive = write_tff_h5_archive(tmp_path / "shakespeare.tar.bz2", files, prefix="shakespeare/")
    out = preprocess("shakespeare", tmp_path / "out", f"source={archive}", cache=tmp_path / "cache")
    a, b = FederatedDataset(out), FederatedDataset(shakespeare_dir)
    for split in ("train", "test"):
        assert a.client_ids(split).tolist() == b.client_ids(split).tolist()
        for i in range(a.num_clients(split)):
            for k in ("x", "y"):
                np.testing.assert_array_equal(a.get_client(split, i)[k], b.get_client(split, i)[k])


def test_shakespeare_input_read_once(tmp_path, capsys):
    """The sequence counts are tallied while converting: the input is decompressed (or extracted) once, not twice."""
    from fedstream.data import tff

    source = shakespeare_file(tmp_path / "s.sqlite.lzma")
    opened = []
    real = tff.open_sqlite
    try:
        tff.open_sqlite = lambda *a, **k: opened.append(a[0]) or real(*a, **k)
        preprocess("shakespeare", tmp_path / "b", f"source={source}", cache=tmp_path / "cache")
    finally:
        tff.open_sqlite = real
    assert opened == [source]
    if importlib.util.find_spec("h5py"):
        files = {f"shakespeare_{split}.h5": {cid: {"snippets": np.array(s, dtype=object).astype(bytes)}
                                             for cid, s in clients.items()}
                 for split, clients in SHAKESPEARE.items()}
        archive = write_tff_h5_archive(tmp_path / "shakespeare.tar.bz2", files, prefix="shakespeare/")
        capsys.readouterr()
        preprocess("shakespeare", tmp_path / "c", f"source={archive}", cache=tmp_path / "cache")
        assert capsys.readouterr().err.count(f"extracting {archive}") == 1


def test_shakespeare_published_counts_checked_first(tmp_path):
    source = shakespeare_file(tmp_path / "s.sqlite.lzma")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"split 'train' has 3 clients / 6 snippets, but the upstream dataset "
                                         r"has 715 / 16,068 \(--config.check_counts=False"):
        run_preprocess("shakespeare", tmp_path / "out", [f"source={source}", f"cache_dir={cache}"], progress=None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in cache.iterdir()]  # the decompressed copy is gone


@pytest.mark.filterwarnings("ignore:.*but the upstream dataset has")  # check_counts=False on a small fixture
@pytest.mark.parametrize("case", ["not_utf8", "missing_feature", "truncated", "not_sqlite"])
def test_shakespeare_bad_input_one_line_error_no_output(tmp_path, capsys, case):
    source = tmp_path / "shakespeare.sqlite.lzma"
    if case == "not_utf8":
        shakespeare_file(source, {"train": {"A": [b"fine"], "B_ROLE": [b"ok", b"caf\xe9 \xff"]}, "test": {"A": [b"x"]}})
        message = r"split 'train', client 'B_ROLE': example 1 is not valid UTF-8"
    elif case == "missing_feature":
        write_tff_sqlite(source, {"train": {"A": [{"snippets": b"ok"}, {"text": b"no snippets"}]},
                                  "test": {"A": [{"snippets": b"ok"}]}})
        message = r"client 'A', example 1: no feature 'snippets' \(has: text\)"
    elif case == "truncated":
        truncate(shakespeare_file(source), 0.6)
        message = r"truncated LZMA file"
    else:
        source.write_bytes(b"")
        message = r"not a valid LZMA file|truncated LZMA file"
    cache = tmp_path / "cache"
    rc = cli_main(["preprocess", "shakespeare", "--output", str(tmp_path / "out"), "--source", str(source),
                   f"--config.cache_dir={cache}", "--config.check_counts=False"])
    err = last_line(capsys.readouterr().err)
    assert rc == 2
    assert err.startswith("fedstream: error: ") and str(source) in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no writer leftovers
    assert not cache.exists() or not list(cache.iterdir())  # no decompressed leftovers


# ---------------------------------------------------------------------------------------- stackoverflow

WORDS = ["the", ".", "to", "a", "i", "is"]  # ids 1..6 with vocab_size=6 (OOV 7, BOS 8, EOS 9)
WORD_COUNT_TEXT = "".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)) + "rare 3\nrarer 1\n"


def so_example(tokens: str, kind: str = "answer") -> dict:
    return {"tokens": tokens.encode(), "title": b"how to sort a list", "tags": b"python|sorting",
            "type": kind.encode(), "creation_date": b"2010-01-08 09:34:05 UTC", "score": np.int64(3)}


STACKOVERFLOW = {
    "train": {
        "00000001": [so_example("the . to", "question"), so_example("i is rare a"), so_example("")],
        "00000002": [so_example(" ".join(["the"] * 25))],
    },
    "heldout": {"00000010": [so_example("a a a a a a a a a a a a a a a a a a a is")]},  # exactly 20 words
    "test": {"00000001": [so_example("zebra the")], "00000003": [so_example("to  to")]},
}


def word_counts_archive(path):
    data = WORD_COUNT_TEXT.encode()
    with tarfile.open(path, "w:bz2") as tar:
        info = tarfile.TarInfo("stackoverflow.word_count")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def stackoverflow_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stackoverflow")
    source = write_tff_sqlite(tmp / "stackoverflow.sqlite.lzma", STACKOVERFLOW)
    words = word_counts_archive(tmp / "stackoverflow.word_count.tar.bz2")
    return preprocess("stackoverflow", tmp / "out", f"source={source}", f"word_counts={words}", "vocab_size=6",
                      cache=tmp / "cache")


def test_stackoverflow_ids_clients_splits(stackoverflow_dir):
    ds = FederatedDataset(stackoverflow_dir)
    assert sorted(ds.splits) == ["heldout", "test", "train"]
    assert ds.client_ids("train").tolist() == ["00000001", "00000002"]
    assert ds.client_ids("test").tolist() == ["00000001", "00000003"]
    assert ds.client_sizes("train").tolist() == [3, 1]
    pad, oov, bos, eos = 0, 7, 8, 9

    def rows(split, i):
        c = ds.get_client(split, i)
        assert c["x"].dtype == c["y"].dtype == np.int32 and c["x"].shape[1:] == (20,)
        np.testing.assert_array_equal(c["x"][:, 1:], c["y"][:, :-1])
        return np.concatenate([c["x"], c["y"][:, -1:]], axis=1).tolist()

    assert rows("train", 0) == [
        [bos, 1, 2, 3, eos] + [pad] * 16,            # the . to
        [bos, 5, 6, oov, 4, eos] + [pad] * 15,       # i is rare a ('rare' is word 7 of the file: not in the top 6)
        [bos, oov, eos] + [pad] * 18,                # '' is one empty (OOV) word, as tf.strings.split(sep=' ')
    ]
    assert rows("train", 1) == [[bos] + [1] * 20]    # 25 words: truncated to 20, no EOS
    assert rows("heldout", 0) == [[bos] + [4] * 19 + [6]]  # exactly 20 words: no EOS
    assert rows("test", 0) == [[bos, oov, 1, eos] + [pad] * 17]
    assert rows("test", 1) == [[bos, 3, oov, 3, eos] + [pad] * 16]  # double space: an empty OOV word


def test_stackoverflow_vocab_asset(stackoverflow_dir):
    ds = FederatedDataset(stackoverflow_dir)
    vocab = text.Vocabulary.from_json(ds.asset("vocab.json"))
    assert vocab.tokens == tuple(WORDS) and vocab.kind == "word"
    doc = json.loads(ds.asset("vocab.json"))
    assert (doc["pad"], doc["oov"], doc["bos"], doc["eos"], doc["size"]) == (0, 7, 8, 9, 10)
    assert doc["sequence_length"] == 20
    assert ds.metadata["input_fingerprint"].count("sha256:") == 2


def test_stackoverflow_plain_word_counts_split_subset_and_length(tmp_path):
    source = write_tff_sqlite(tmp_path / "so.sqlite", STACKOVERFLOW)
    words = tmp_path / "stackoverflow.word_count"
    words.write_text(WORD_COUNT_TEXT)
    out = preprocess("stackoverflow", tmp_path / "out", f"source={source}", f"word_counts={words}", "vocab_size=3",
                     "splits=test", "sequence_length=2", cache=tmp_path / "cache")
    ds = FederatedDataset(out)
    assert ds.splits == ["test"]
    c = ds.get_client("test", 0)  # 'zebra the' with vocab (the . to): OOV 4, BOS 5, EOS 6; 2 words: no EOS
    assert c["x"].tolist() == [[5, 4]] and c["y"].tolist() == [[4, 1]]


def test_stackoverflow_published_counts_checked_first(tmp_path):
    source = write_tff_sqlite(tmp_path / "so.sqlite", STACKOVERFLOW)
    words = word_counts_archive(tmp_path / "wc.tar.bz2")
    with pytest.raises(ValueError, match=r"split 'train' has 2 clients / 4 sentences, but the upstream dataset "
                                         r"has 342,477 / 135,818,730"):
        run_preprocess("stackoverflow", tmp_path / "out", [f"source={source}", f"word_counts={words}",
                                                           "vocab_size=6"], progress=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:.*but the upstream dataset has")
@pytest.mark.parametrize("case", ["not_utf8", "missing_feature", "truncated", "bad_word_counts", "short_vocab"])
def test_stackoverflow_bad_input_one_line_error_no_output(tmp_path, capsys, case):
    source = tmp_path / "stackoverflow.sqlite.lzma"
    words = word_counts_archive(tmp_path / "wc.tar.bz2")
    vocab_size = 6
    if case == "not_utf8":
        write_tff_sqlite(source, {"train": {"u1": [so_example("ok"), {**so_example(""), "tokens": b"bad \xff"}]},
                                  "heldout": STACKOVERFLOW["heldout"], "test": STACKOVERFLOW["test"]})
        message = r"split 'train', client 'u1': example 1 is not valid UTF-8"
    elif case == "missing_feature":
        write_tff_sqlite(source, {"train": {"u1": [{k: v for k, v in so_example("x").items() if k != "tokens"}]},
                                  "heldout": STACKOVERFLOW["heldout"], "test": STACKOVERFLOW["test"]})
        message = r"client 'u1', example 0: no feature 'tokens'"
    elif case == "truncated":
        truncate(write_tff_sqlite(source, STACKOVERFLOW), 0.5)
        message = r"truncated LZMA file"
    else:
        write_tff_sqlite(source, STACKOVERFLOW)
        if case == "bad_word_counts":
            words = tmp_path / "stackoverflow.word_count"
            words.write_text("the 10\n. 12\n")
            message = r"word_count: word counts line 2: counts are not sorted"
        else:
            vocab_size = 100
            message = r"hold 8 words, fewer than vocab_size=100"
    cache = tmp_path / "cache"
    rc = cli_main(["preprocess", "stackoverflow", "--output", str(tmp_path / "out"), "--source", str(source),
                   f"--config.word_counts={words}", f"--config.vocab_size={vocab_size}",
                   f"--config.cache_dir={cache}", "--config.check_counts=False"])
    err = last_line(capsys.readouterr().err)
    assert rc == 2
    assert err.startswith("fedstream: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert not cache.exists() or not list(cache.iterdir())


def test_word_counts_archive_truncated(tmp_path):
    from fedstream.recipes import stackoverflow

    archive = word_counts_archive(tmp_path / "wc.tar.bz2")
    data = archive.read_bytes()
    assert bz2.decompress(data)  # a valid archive first
    truncate(archive, 0.5)
    with pytest.raises(ValueError, match=r"wc.tar.bz2: truncated or unreadable archive"):
        stackoverflow.read_vocabulary(archive, 6)


def test_stackoverflow_rerun_is_noop_and_word_counts_change_needs_force(tmp_path):
    source = write_tff_sqlite(tmp_path / "so.sqlite", STACKOVERFLOW)
    words = word_counts_archive(tmp_path / "wc.tar.bz2")
    args = (f"source={source}", f"word_counts={words}", "vocab_size=6")
    out = preprocess("stackoverflow", tmp_path / "out", *args, cache=tmp_path / "cache")
    stamp = (out / "metadata.json").stat().st_mtime_ns
    assert preprocess("stackoverflow", out, *args, cache=tmp_path / "cache") == out
    assert (out / "metadata.json").stat().st_mtime_ns == stamp
    words.write_bytes(bz2.compress(b"not the same archive"))  # another word-count file: another fingerprint
    with pytest.raises(ValueError, match="--force"):
        preprocess("stackoverflow", out, *args, cache=tmp_path / "cache")


@pytest.mark.parametrize("recipe", ["shakespeare", "stackoverflow"])
def test_sqlite_download_needs_a_sha256(tmp_path, capsys, recipe):
    """TFF pins no sha256 for the current .sqlite.lzma files: downloading one needs --config.sha256."""
    rc = cli_main(["preprocess", recipe, "--output", str(tmp_path / "out"), "--config.download=sqlite",
                   f"--config.cache_dir={tmp_path}"])
    err = last_line(capsys.readouterr().err)
    assert rc == 2
    assert re.search(rf"no sha256 is pinned for \S+/{recipe}.sqlite.lzma: pass --config.sha256", err), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ FedJAX's copies of both


def same_dataset(a_dir, b_dir, splits):
    """Equal client ids (in order), example counts and x/y token ids per split, and equal vocab assets."""
    a, b = FederatedDataset(a_dir), FederatedDataset(b_dir)
    assert sorted(a.splits) == sorted(b.splits) == sorted(splits)
    for split in splits:
        assert a.client_ids(split).tolist() == b.client_ids(split).tolist()
        assert a.client_sizes(split).tolist() == b.client_sizes(split).tolist()
        for i in range(a.num_clients(split)):
            for k in ("x", "y"):
                np.testing.assert_array_equal(a.get_client(split, i)[k], b.get_client(split, i)[k])
    assert a.asset("vocab.json") == b.asset("vocab.json")


def fedjax_shakespeare(directory, splits=None):
    """FedJAX's shakespeare_{train,test}.sqlite of SHAKESPEARE: `snippets` as bytes strings (ext type 4)."""
    splits = SHAKESPEARE if splits is None else splits
    directory.mkdir(exist_ok=True)
    for seed, (split, clients) in enumerate(splits.items()):
        write_fedjax_text(directory / f"shakespeare_{split}.sqlite",
                          {cid: {"snippets": list(s)} for cid, s in clients.items()}, seed)
    return directory


def fedjax_stackoverflow(directory):
    """FedJAX's stackoverflow_{train,held_out,test}.sqlite of STACKOVERFLOW, with all six upstream features."""
    directory.mkdir(exist_ok=True)
    names = {"train": "stackoverflow_train.sqlite", "heldout": "stackoverflow_held_out.sqlite",
             "test": "stackoverflow_test.sqlite"}
    for seed, (split, clients) in enumerate(STACKOVERFLOW.items()):
        rows = {cid: {k: ([e[k] for e in examples] if k != "score" else np.array([e[k] for e in examples]))
                      for k in examples[0]} for cid, examples in clients.items()}
        write_fedjax_text(directory / names[split], rows, seed)
    return directory


def test_shakespeare_fedjax_files_match_tff(tmp_path, shakespeare_dir):
    files = fedjax_shakespeare(tmp_path / "fedjax")
    with sqlite3.connect(files / "shakespeare_train.sqlite") as conn:  # hosted-file ids, rowids not in id order
        stored = [row[0] for row in conn.execute("SELECT client_id FROM federated_data ORDER BY rowid")]
    assert all(re.fullmatch(rb"[0-9a-f]{16}:[A-Z_]+", cid) for cid in stored)
    assert [c.split(b":", 1)[1].decode() for c in stored] != sorted(SHAKESPEARE["train"])
    cache = tmp_path / "cache"
    by_file = preprocess("shakespeare", tmp_path / "a", f"source={files / 'shakespeare_train.sqlite'}", cache=cache)
    by_dir = preprocess("shakespeare", tmp_path / "b", f"source={files}", cache=cache)
    same_dataset(by_file, shakespeare_dir, ["train", "test"])
    same_dataset(by_dir, shakespeare_dir, ["train", "test"])
    # for packing=fedjax too (FedJAX's own packing, TFF's ids)
    tff_fedjax = preprocess("shakespeare", tmp_path / "c", f"source={shakespeare_file(tmp_path / 's.sqlite')}",
                            "packing=fedjax", cache=cache)
    same_dataset(preprocess("shakespeare", tmp_path / "d", f"source={files}", "packing=fedjax", cache=cache),
                 tff_fedjax, ["train", "test"])
    # the input fingerprint covers both split files
    before = FederatedDataset(by_dir).metadata["input_fingerprint"]
    assert before.count("sha256:") == 1 and "shakespeare_test.sqlite=" in before
    fedjax_shakespeare(tmp_path / "other", {"train": SHAKESPEARE["train"], "test": {"A": [b"changed"]}})
    from fedstream.recipes import shakespeare

    config = shakespeare.get_config()
    config.source = str(tmp_path / "other")
    assert shakespeare.fingerprint(config) != before
    assert not cache.exists() or not list(cache.iterdir())  # nothing decompressed or extracted


def test_shakespeare_fedjax_counts_checked_first(tmp_path):
    files = fedjax_shakespeare(tmp_path / "fedjax")
    with sqlite3.connect(files / "shakespeare_train.sqlite") as conn:  # a client that would not decode
        conn.execute("UPDATE federated_data SET data = x'00' WHERE rowid = 1")
    with pytest.raises(ValueError, match=r"fedjax: split 'train' has 3 clients / 6 snippets, but "
                                         r"the upstream dataset has 715 / 16,068 \(--config.check_counts=False"):
        run_preprocess("shakespeare", tmp_path / "out", [f"source={files}"], progress=None)
    assert not (tmp_path / "out").exists()


def test_stackoverflow_fedjax_files_match_tff(tmp_path, stackoverflow_dir):
    files = fedjax_stackoverflow(tmp_path / "fedjax")
    words = word_counts_archive(tmp_path / "wc.tar.bz2")
    cache = tmp_path / "cache"
    out = preprocess("stackoverflow", tmp_path / "a", f"source={files / 'stackoverflow_held_out.sqlite'}",
                     f"word_counts={words}", "vocab_size=6", cache=cache)
    same_dataset(out, stackoverflow_dir, ["train", "heldout", "test"])
    # a subset of the splits needs only their files
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    (files / "stackoverflow_test.sqlite").rename(only_test / "stackoverflow_test.sqlite")
    tff_file = write_tff_sqlite(tmp_path / "so.sqlite", STACKOVERFLOW)
    tff_test = preprocess("stackoverflow", tmp_path / "b", f"source={tff_file}", f"word_counts={words}",
                          "vocab_size=6", "splits=test", cache=cache)
    same_dataset(preprocess("stackoverflow", tmp_path / "c", f"source={only_test}", f"word_counts={words}",
                            "vocab_size=6", "splits=test", cache=cache), tff_test, ["test"])
    with pytest.raises(ValueError, match=r"no FedJAX SQLite file stackoverflow_test.sqlite; FedJAX stores this "
                                         r"dataset as one file per split"):
        preprocess("stackoverflow", tmp_path / "d", f"source={files}", f"word_counts={words}", "vocab_size=6",
                   cache=cache)
    assert not (tmp_path / "d").exists()


@pytest.mark.filterwarnings("ignore:.*but the upstream dataset has")
@pytest.mark.parametrize("case", ["renamed", "not_bytes", "prefix_collision", "not_utf8", "fedjax_sqlite_recipe",
                                  "tff_reader"])
def test_fedjax_text_bad_input_one_line(tmp_path, capsys, case):
    files = fedjax_shakespeare(tmp_path / "fedjax")
    source = files
    recipe = "shakespeare"
    extra = []
    if case == "renamed":
        source = (files / "shakespeare_train.sqlite").rename(files / "train.sqlite")
        message = r"train.sqlite: a FedJAX SQLite file, but FedJAX names this dataset's files shakespeare_train"
    elif case == "not_bytes":
        write_db(files / "shakespeare_test.sqlite", [(b"0123456789abcdef:A", {"snippets": np.arange(3)}, None)])
        message = (r"shakespeare_test.sqlite: client 'A': feature 'snippets' is not one bytes string per example "
                   r"\(FedJAX's ext type 4\); it has dtype int64")
    elif case == "prefix_collision":
        write_db(files / "shakespeare_test.sqlite", [(b"0123456789abcdef:A", {"snippets": bytes_array([b"a"])},
                                                      None),
                                                     (b"fedcba9876543210:A", {"snippets": bytes_array([b"b"])},
                                                      None)])
        message = r"client ids b'0123456789abcdef:A' and b'fedcba9876543210:A' are both 'A' without FedJAX's prefix"
    elif case == "not_utf8":
        write_db(files / "shakespeare_test.sqlite", [(b"0123456789abcdef:A", {"snippets": bytes_array([b"\xff"])},
                                                      None)])
        message = r"fedjax: split 'test', client 'A': example 0 is not valid UTF-8"
    elif case == "fedjax_sqlite_recipe":
        recipe = "fedjax-sqlite"
        source = None
        extra = [f"--config.train={files / 'shakespeare_train.sqlite'}"]
        message = (r"client '[0-9a-f]{16}:[A-Z_]+' \(row 1\): feature 'snippets' holds bytes strings .*"
                   r"fedstream preprocess shakespeare --source")
    else:  # the TFF reader of emnist, given a FedJAX file
        recipe = "emnist"
        source = files / "shakespeare_train.sqlite"
        message = r"no table 'examples' but FedJAX's 'federated_data': a FedJAX SQLite file, not TFF's"
    args = ["preprocess", recipe, "--output", str(tmp_path / "out")]
    args += ["--source", str(source), f"--config.cache_dir={tmp_path / 'cache'}", "--config.check_counts=False"] \
        if source else []
    rc = cli_main(args + extra)
    err = last_line(capsys.readouterr().err)
    assert rc == 2
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("recipe", ["stackoverflow", "shakespeare"])
def test_count_warnings_are_one_line_each_once(tmp_path, capsys, recipe):
    """check_counts=False on a small file: one `fedstream: warning:` line per split, no Python warning lines."""
    if recipe == "stackoverflow":
        source = write_tff_sqlite(tmp_path / "so.sqlite", STACKOVERFLOW)
        extra = [f"--config.word_counts={word_counts_archive(tmp_path / 'wc.tar.bz2')}", "--config.vocab_size=6"]
        splits = ("train", "heldout", "test")
    else:
        source = shakespeare_file(tmp_path / "shakespeare.sqlite")
        extra, splits = [], ("train", "test")
    rc = cli_main(["preprocess", recipe, "--output", str(tmp_path / "out"), "--source", str(source),
                   f"--config.cache_dir={tmp_path / 'cache'}", "--config.check_counts=False", *extra])
    assert rc == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(lines) == len(splits), lines
    assert all(line.startswith("fedstream: warning: ") and "UserWarning" not in line for line in lines), lines
    assert sorted(re.search(r"split '(\w+)'", line).group(1) for line in lines) == sorted(splits)
