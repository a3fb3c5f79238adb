"""Recipes end to end: digits (embedded), synthetic (FedProx), arrays (npz), driver behaviour."""

import gzip
import importlib.resources

import numpy as np
import pytest

from fedstream.config import ConfigError, load_config
from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset
from fedstream.recipes import synthetic


def raw_digits():
    resource = importlib.resources.files("fedstream.recipes").joinpath("assets/digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def test_digits_end_to_end(tmp_path):
    out = run_preprocess("digits", tmp_path / "digits", progress=None)
    ds = FederatedDataset(out)
    table = raw_digits()
    assert table.shape == (1797, 65)
    assert ds.client_ids("train").tolist() == ds.client_ids("test").tolist()
    assert len(ds.client_ids("train")) == 100
    rows = {row.tobytes(): 0 for row in table}
    seen = 0
    for split in ("train", "test"):
        for i in range(ds.num_clients(split)):
            c = ds.get_client(split, i)
            assert c["x"].shape[1:] == (8, 8, 1) and c["x"].dtype == np.float32
            assert 0.0 <= c["x"].min() and c["x"].max() <= 1.0
            back = np.concatenate([np.rint(c["x"].reshape(-1, 64) * 16).astype(np.int64), c["y"][:, None]], 1)
            for row in back:  # every stored example is a row of the CSV
                assert row.tobytes() in rows
                rows[row.tobytes()] += 1
            seen += len(c["y"])
    assert seen == 1797
    assert sum(rows.values()) == 1797
    assert min(ds.client_sizes("train")) >= 1


def test_rerun_is_noop_force_rewrites_changed_config_refused(tmp_path):
    out = run_preprocess("digits", tmp_path / "d", progress=None)
    stamp = (out / "metadata.json").stat().st_mtime_ns
    messages = []
    run_preprocess("digits", out, progress=messages.append)
    assert "up to date" in messages[0]
    assert (out / "metadata.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="--force"):
        run_preprocess("digits", out, ["alpha=1.0"], progress=None)
    run_preprocess("digits", out, ["alpha=1.0"], force=True, progress=None)
    assert FederatedDataset(out).metadata["config"]["alpha"] == 1.0
    with pytest.raises(ConfigError, match="unknown config key 'alpah'"):
        run_preprocess("digits", tmp_path / "e", ["alpah=0.1"], progress=None)
    assert not (tmp_path / "e").exists()


def test_synthetic_follows_fedprox_generator(tmp_path):
    out = run_preprocess("synthetic", tmp_path / "s", progress=None)
    ds = FederatedDataset(out)
    config = load_config("synthetic", "fedstream.recipes")
    sizes = ds.client_sizes("train") + ds.client_sizes("test")
    assert len(sizes) == 30 and sizes.min() >= 50
    expected = np.random.default_rng(0).lognormal(4, 2, 30).astype(np.int64) + 50
    np.testing.assert_array_equal(sizes, expected)  # sizes are the generator's first draw
    np.testing.assert_array_equal(ds.client_sizes("train"), (0.9 * expected).astype(np.int64))
    means = np.stack([ds.get_client("train", i)["x"].mean(0) for i in range(30)])
    # Non-IID: per-device feature means v_k ~ N(B_k, 1) differ across devices.
    assert means[:, 0].std() > 0.5
    labels = np.concatenate([ds.get_client("train", i)["y"] for i in range(30)])
    assert labels.min() >= 0 and labels.max() <= 9


def test_synthetic_iid_devices_share_one_labelling(tmp_path):
    out = run_preprocess("synthetic", tmp_path / "iid", ["iid=True"], progress=None)
    ds = FederatedDataset(out)
    config = load_config("synthetic", "fedstream.recipes", ["iid=True"])
    rng = np.random.default_rng(config.seed)
    _, means, model_of = synthetic.device_models(config, rng)
    w, b = model_of(0)
    assert (means == 0).all()
    for i in range(30):
        for split in ("train", "test"):
            c = ds.get_client(split, i)
            np.testing.assert_array_equal(synthetic.label(c["x"].astype(np.float64), w, b), c["y"])


def test_arrays_with_client_key_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 3)), rng.integers(0, 4, 60)
    cid = rng.choice(np.array(["u7", "u2", "u9"]), 60)
    np.savez(tmp_path / "a.npz", x=x, y=y, cid=cid)
    out = run_preprocess("arrays", tmp_path / "out", [f"path={tmp_path / 'a.npz'}", "client_key=cid"], progress=None)
    ds = FederatedDataset(out)
    assert ds.client_ids("train").tolist() == list(dict.fromkeys(cid.tolist()))  # first-appearance order
    for c in ds.client_ids("train"):
        got = ds.get_client("train", str(c))
        np.testing.assert_array_equal(got["x"], x[cid == c].astype(np.float32))
        np.testing.assert_array_equal(got["y"], y[cid == c])


def test_arrays_with_partitioner_covers_all(tmp_path):
    rng = np.random.default_rng(1)
    x = np.arange(300, dtype=np.float32)[:, None]
    np.savez(tmp_path / "b.npz", x=x, y=rng.integers(0, 5, 300))
    out = run_preprocess("arrays", tmp_path / "out", [f"path={tmp_path / 'b.npz'}", "partitioner=dirichlet",
                                                      "num_clients=6", "test_fraction=0.2"], progress=None)
    ds = FederatedDataset(out)
    values = np.concatenate([ds.get_client(s, i)["x"][:, 0] for s in ds.splits for i in range(6)])
    np.testing.assert_array_equal(np.sort(values), x[:, 0])


def test_arrays_errors_name_file_and_key(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 2)), y=np.zeros(5))
    with pytest.raises(ValueError, match=r"c\.npz.*different leading"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'c.npz'}"], progress=None)
    with pytest.raises(ValueError, match=r"c\.npz: no array 'z'"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'c.npz'}", "features=x,z"], progress=None)
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(ValueError, match=r"d\.npz: cannot load without pickle"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'd.npz'}"], progress=None)
    assert not (tmp_path / "o").exists()


def test_recipe_by_path(tmp_path):
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(
        "import ml_collections, numpy as np\n"
        "from fedstream.data.format import FeatureSpec\n"
        "SOURCE = 'test'\n"
        "def get_config():\n    c = ml_collections.ConfigDict(); c.n = 3; c.seed = 0; return c\n"
        "def schema(config):\n    return {'v': FeatureSpec('int32', ())}\n"
        "def generate(config):\n"
        "    for i in range(config.n):\n        yield 'train', f'k{i}', {'v': np.arange(i, dtype=np.int32)}\n"
        "def expected_counts(config):\n    return {'train': (config.n, config.n * (config.n - 1) // 2)}\n")
    out = run_preprocess(str(recipe), tmp_path / "o", ["n=4"], progress=None)
    ds = FederatedDataset(out)
    assert ds.client_sizes("train").tolist() == [0, 1, 2, 3]
    assert ds.metadata["recipe"] == "my_recipe"
