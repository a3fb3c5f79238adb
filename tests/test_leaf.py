"""Recipe leaf: LEAF JSON directories (FEMNIST, Synthetic, Shakespeare, CelebA) and bad input."""

import json
import warnings

import numpy as np
import pytest

from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset
from fedstream.recipes import leaf

# LEAF models/utils/language_utils.py, copied here so that a change to the recipe's copy is caught.
ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


def write_leaf(path, users, num_samples=None, hierarchies=None, raw=None):
    """One LEAF JSON file; users: {id: {"x": [...], "y": [...]}} in order."""
    doc = {"users": list(users), "num_samples": num_samples or [len(d.get("y", [])) for d in users.values()],
           "user_data": users}
    if hierarchies is not None:
        doc["hierarchies"] = hierarchies
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw if raw is not None else json.dumps(doc).encode())
    return path


def femnist_users(seed, sizes, start=0):
    rng = np.random.default_rng(seed)
    return {f"f{start + i:04d}_{i:02d}": {"x": np.round(rng.random((n, 784)), 3).tolist(),
                                         "y": rng.integers(0, 62, n).tolist()} for i, n in enumerate(sizes)}


def assert_fails(tmp_path, overrides, *fragments):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_preprocess("leaf", out, overrides, progress=None)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return message


def test_femnist_round_trip_and_wrong_num_samples(tmp_path):
    data = tmp_path / "femnist" / "data"
    files = {"train": [femnist_users(0, [3, 5], 0), femnist_users(1, [0, 4], 2)],
             "test": [femnist_users(2, [1, 2], 0)]}
    for split, docs in files.items():
        for i, users in enumerate(docs):
            listed = [len(d["y"]) for d in users.values()]
            if split == "train" and i == 1:
                listed[1] += 79  # LEAF's own counts can be wrong: the data wins
            write_leaf(data / split / f"all_data_{i}_niid_05_keep_0_{split}_9.json", users, listed,
                       hierarchies=["h"] * len(users))
    (data / "train" / "README.txt").write_text("not json")  # ignored
    with pytest.warns(UserWarning, match=r"num_samples differs from the data for 1 of 2 users.*'f0003_01': 83 listed"):
        out = run_preprocess("leaf", tmp_path / "ds", [f"data_dir={data}", "task=femnist"], progress=None)
    ds = FederatedDataset(out)
    assert ds.metadata["schema"]["features"] == [{"name": "x", "dtype": "float32", "shape": [28, 28, 1]},
                                                 {"name": "y", "dtype": "int32", "shape": []}]
    for split, docs in files.items():
        users = {k: v for doc in docs for k, v in doc.items()}
        assert ds.client_ids(split).tolist() == list(users)  # files in name order, users in 'users' order
        assert ds.client_sizes(split).tolist() == [len(u["y"]) for u in users.values()]
        for user, d in users.items():
            got = ds.get_client(split, user)
            np.testing.assert_array_equal(got["x"].reshape(-1, 784), np.array(d["x"], np.float32).reshape(-1, 784))
            np.testing.assert_array_equal(got["y"], d["y"])


def test_synthetic_float_labels(tmp_path):
    rng = np.random.default_rng(5)
    users = {f"f_{i:05d}": {"x": rng.normal(size=(n, 60)).tolist(), "y": [float(v) for v in rng.integers(0, 10, n)]}
             for i, n in enumerate([7, 2, 11])}
    write_leaf(tmp_path / "train" / "mytrain.json", users)
    out = run_preprocess("leaf", tmp_path / "ds", [f"train={tmp_path / 'train'}", "task=synthetic"], progress=None)
    ds = FederatedDataset(out)
    assert ds.splits == ["train"]
    assert ds.metadata["schema"]["features"][0]["shape"] == [60]
    for user, d in users.items():
        got = ds.get_client("train", user)
        np.testing.assert_array_equal(got["x"], np.array(d["x"], np.float32))
        np.testing.assert_array_equal(got["y"], np.array(d["y"]).astype(np.int32))
    users["f_00001"]["y"][0] = 2.5
    write_leaf(tmp_path / "train" / "mytrain.json", users)
    assert_fails(tmp_path, [f"train={tmp_path / 'train'}", "task=synthetic"], "mytrain.json", "user 'f_00001'",
                 "must be integers")


def shakespeare_users():
    text = {"THE_TEMPEST_PROSPERO": "Now does my project gather to a head: my charms crack not; my spirits obey; "
                                    "and time goes upright with his carriage. How's the day?",
            "HAMLET_HAMLET": "To be, or not to be- that is the question: Whether 'tis nobler in the mind to "
                             "suffer the slings | arrows of outrageous fortune..."}  # '|' is not in LEAF's letters
    users = {}
    for user, t in text.items():
        windows = [t[i:i + 80] for i in range(len(t) - 80)]
        users[user] = {"x": windows, "y": [t[i + 80] for i in range(len(t) - 80)]}
    return users


def test_shakespeare_vocabulary(tmp_path):
    users = shakespeare_users()
    write_leaf(tmp_path / "train" / "all_data_niid_0_keep_0_train_9.json", users, hierarchies=["t", "h"])
    write_leaf(tmp_path / "test" / "all_data_niid_0_keep_0_test_9.json", {"HAMLET_HAMLET": {"x": [], "y": []}},
               num_samples=[0])
    with pytest.warns(UserWarning, match="not in LEAF's 80-letter vocabulary; stored as id 80"):
        out = run_preprocess("leaf", tmp_path / "ds", [f"data_dir={tmp_path}", "task=shakespeare"], progress=None)
    ds = FederatedDataset(out)
    assert leaf.LEAF_LETTERS == ALL_LETTERS and leaf.OOV_ID == 80
    vocab = json.loads(ds.asset("vocab.json"))
    assert vocab["letters"] == ALL_LETTERS and vocab["vocab_size"] == 81

    def leaf_ids(s):  # LEAF word_to_indices, with -1 (unknown) -> 80
        return [ALL_LETTERS.find(c) if ALL_LETTERS.find(c) >= 0 else 80 for c in s]

    for user, d in users.items():
        got = ds.get_client("train", user)
        assert got["x"].shape == (len(d["x"]), 80) and got["x"].dtype == np.int32
        np.testing.assert_array_equal(got["x"], [leaf_ids(s) for s in d["x"]])
        np.testing.assert_array_equal(got["y"], [leaf_ids(c)[0] for c in d["y"]])
    assert (ds.get_client("train", "HAMLET_HAMLET")["x"] == 80).any()
    assert ds.client_sizes("test").tolist() == [0]


def test_celeba_images(tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = {}
    for i in range(5):
        name = f"{i + 1:06d}.png"
        pixels[name] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image.fromarray(pixels[name]).save(tmp_path / name)
    users = {"1001": {"x": ["000001.png", "000002.png", "000003.png"], "y": [1.0, 0.0, 1.0]},
             "2002": {"x": ["000004.png", "000005.png"], "y": [0.0, 0.0]}}
    write_leaf(tmp_path / "train" / "all_data_0_niid_0_keep_5_train_9.json", users)
    out = run_preprocess("leaf", tmp_path / "ds", [f"train={tmp_path / 'train'}", "task=celeba",
                                                   f"image_dir={tmp_path}", "image_size=8"], progress=None)
    ds = FederatedDataset(out)
    for user, d in users.items():
        got = ds.get_client("train", user)
        assert got["x"].dtype == np.uint8
        np.testing.assert_array_equal(got["x"], np.stack([pixels[n] for n in d["x"]]))  # same size: no resampling
        np.testing.assert_array_equal(got["y"], np.array(d["y"], np.int32))
    users["2002"]["x"][1] = "missing.png"
    write_leaf(tmp_path / "train" / "all_data_0_niid_0_keep_5_train_9.json", users)
    assert_fails(tmp_path, [f"train={tmp_path / 'train'}", "task=celeba", f"image_dir={tmp_path}"],
                 "user '2002'", "missing.png")


@pytest.mark.parametrize("case", ["truncated_file", "missing_feature", "mismatched_counts", "ragged_x",
                                  "duplicate_across_files", "duplicate_in_user_data", "non_utf8_id",
                                  "unlisted_user", "wrong_width"])
def test_bad_input(tmp_path, case):
    first, second = femnist_users(0, [2, 3], 0), femnist_users(1, [2, 2], 2)
    bad_file = tmp_path / "train" / "b.json"
    raw = None
    expect = [str(bad_file), "user 'f0003_01'"]
    if case == "truncated_file":
        raw = json.dumps({"users": list(second), "user_data": second}).encode()[:-500]
        expect = [str(bad_file), "not valid JSON", "truncated"]
    elif case == "missing_feature":
        del second["f0003_01"]["y"]
        expect.append("lacks ['y']")
    elif case == "mismatched_counts":
        second["f0003_01"]["y"].append(3)
        expect.append("x has 2 examples but y has 3")
    elif case == "ragged_x":
        second["f0003_01"]["x"][1] = second["f0003_01"]["x"][1][:700]
        expect.append("different lengths")
    elif case == "duplicate_across_files":
        second["f0000_00"] = second.pop("f0003_01")
        expect = [str(bad_file), "user 'f0000_00'", "also in", "a.json"]
    elif case == "duplicate_in_user_data":
        text = json.dumps({"users": list(second), "num_samples": [2, 2], "user_data": second})
        raw = text.replace('"f0002_00": {', '"f0003_01": {"x": [], "y": []}, "f0002_00": {', 1).encode()
        expect = [str(bad_file), "duplicate key 'f0003_01'"]
    elif case == "non_utf8_id":
        raw = json.dumps({"users": list(second), "user_data": second}).encode().replace(b"f0003_01", b"f\xff03_01")
        expect = [str(bad_file), "user b'f\\xff03_01'", "not valid UTF-8"]
    elif case == "unlisted_user":
        raw = json.dumps({"users": ["f0002_00"], "user_data": second}).encode()
        expect.append("not listed in 'users'")
    elif case == "wrong_width":
        second["f0003_01"]["x"] = [v[:783] for v in second["f0003_01"]["x"]]
        expect.append("783 values, expected 784")
    write_leaf(tmp_path / "train" / "a.json", first)
    write_leaf(bad_file, second, raw=raw)
    assert_fails(tmp_path, [f"train={tmp_path / 'train'}", "task=femnist"], *expect)


def test_config_errors(tmp_path):
    write_leaf(tmp_path / "train" / "a.json", femnist_users(0, [1]))
    assert_fails(tmp_path, [f"train={tmp_path / 'train'}", "task=sent140"], "not supported", "vocabulary")
    assert_fails(tmp_path, [f"train={tmp_path / 'train'}", "task=mnist"], "config.task must be one of")
    assert_fails(tmp_path, ["task=femnist"], "needs --config.data_dir")
    assert_fails(tmp_path, [f"train={tmp_path / 'nothing'}", "task=femnist"], "nothing", "no such file")
    (tmp_path / "empty").mkdir()
    assert_fails(tmp_path, [f"train={tmp_path / 'empty'}", "task=femnist"], "no .json files")
    assert_fails(tmp_path, [f"train={tmp_path / 'train'}", "task=celeba"], "image_dir")
