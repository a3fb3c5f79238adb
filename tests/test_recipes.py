"""Recipes end to end: digits (embedded), synthetic (FedProx), arrays (npz), and the driver's behaviour."""

import gzip
import importlib.resources
import math

import numpy as np
import pytest

from fedstream.config import ConfigError, load_config
from fedstream.data.preprocessing import run_preprocess
from fedstream.data.reader import FederatedDataset
from fedstream.recipes import digits as digits_recipe
from fedstream.recipes import synthetic


def raw_digits():
    resource = importlib.resources.files("fedstream.recipes").joinpath("assets/digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_end_to_end(digits):
    ds = FederatedDataset(digits)
    table = raw_digits()
    assert table.shape == (1797, 65)
    assert sorted(ds.splits) == ["test", "train"]
    assert ds.client_ids("train").tolist() == ds.client_ids("test").tolist()
    assert ds.client_ids("train").tolist() == sorted(ds.client_ids("train").tolist())
    assert len(ds.client_ids("train")) == 100
    assert ds.metadata["recipe"] == "digits" and ds.metadata["seed"] == 0
    assert "UCI" in ds.metadata["source"]

    config = load_config("digits", "fedstream.recipes")
    splits = digits_recipe.client_splits(config, table[:, 64])
    seen = []
    for i, (train_rows, test_rows) in enumerate(splits):
        sizes = len(train_rows) + len(test_rows)
        assert sizes >= config.min_examples
        assert len(test_rows) == math.ceil(0.2 * sizes)  # per-client LEAF split
        for split, rows in (("train", train_rows), ("test", test_rows)):
            c = ds.get_client(split, i)
            assert c["x"].shape == (len(rows), 8, 8, 1) and c["x"].dtype == np.float32
            assert c["y"].dtype == np.int32
            assert 0.0 <= c["x"].min() and c["x"].max() <= 1.0
            # No corruption: the client's examples are exactly those CSV rows, pixels / 16.
            np.testing.assert_array_equal(c["x"].reshape(-1, 64), table[rows, :64] / np.float32(16))
            np.testing.assert_array_equal(c["y"], table[rows, 64])
            seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(1797))  # every row once
    total = ds.client_sizes("train").sum() + ds.client_sizes("test").sum()
    assert total == 1797
    labels = np.concatenate([ds.get_client("train", i)["y"] for i in range(100)])
    assert set(labels.tolist()) == set(range(10))


def test_digits_clients_are_label_skewed(digits):
    ds = FederatedDataset(digits)
    shares = []
    for i in range(ds.num_clients("train")):
        y = np.concatenate([ds.get_client(s, i)["y"] for s in ("train", "test")])
        shares.append(np.bincount(y, minlength=10).max() / len(y))
    assert np.mean(shares) > 0.3  # Dirichlet(0.5): far from the IID ~0.1-0.2


def test_rerun_is_noop_force_rewrites_changed_config_refused(tmp_path):
    out = run_preprocess("digits", tmp_path / "d", progress=None)
    stamp = (out.stat().st_ino, (out / "metadata.json").stat().st_mtime_ns)
    messages = []
    assert run_preprocess("digits", out, progress=messages.append) == out
    assert "up to date" in messages[0] and len(messages) == 1
    assert (out.stat().st_ino, (out / "metadata.json").stat().st_mtime_ns) == stamp
    with pytest.raises(ConfigError, match="--force"):
        run_preprocess("digits", out, ["alpha=1.0"], progress=None)
    assert (out / "metadata.json").stat().st_mtime_ns == stamp[1]  # refused: untouched
    messages = []
    run_preprocess("digits", out, ["alpha=1.0"], force=True, progress=messages.append)
    assert FederatedDataset(out).metadata["config"]["alpha"] == 1.0
    assert messages[-1].startswith("wrote train: 100 clients")
    run_preprocess("digits", out, ["--config.alpha=1.0"], progress=None)  # the new config is now up to date
    with pytest.raises(ConfigError, match="unknown config key 'alpah'"):
        run_preprocess("digits", tmp_path / "e", ["alpah=0.1"], progress=None)
    assert not (tmp_path / "e").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary directories left


def test_output_that_is_not_a_dataset_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(ConfigError, match="not a complete fedstream dataset"):
            run_preprocess("synthetic", tmp_path / "mine", force=force, progress=None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    run_preprocess("synthetic", tmp_path / "empty", ["num_devices=2"], progress=None)
    assert FederatedDataset(tmp_path / "empty").num_clients("train") == 2


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_follows_fedprox_generator(tmp_path):
    out = run_preprocess("synthetic", tmp_path / "s", progress=None)
    ds = FederatedDataset(out)
    assert ds.client_ids("train").tolist() == [f"device_{i:02d}" for i in range(30)]
    assert ds.client_ids("test").tolist() == ds.client_ids("train").tolist()
    sizes = ds.client_sizes("train") + ds.client_sizes("test")
    assert len(sizes) == 30 and sizes.min() >= 50
    # n_k = floor(lognormal(4, 2)) + 50 is the generator's first draw, so it can be recomputed.
    expected = np.random.default_rng(0).lognormal(4, 2, 30).astype(np.int64) + 50
    np.testing.assert_array_equal(sizes, expected)
    np.testing.assert_array_equal(ds.client_sizes("train"), (0.9 * expected).astype(np.int64))  # FedProx 90/10
    xs = [np.concatenate([ds.get_client(s, i)["x"] for s in ("train", "test")]) for i in range(30)]
    ys = [np.concatenate([ds.get_client(s, i)["y"] for s in ("train", "test")]) for i in range(30)]
    assert all(x.shape[1:] == (60,) and x.dtype == np.float32 for x in xs)
    labels = np.concatenate(ys)
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() <= 9
    # Non-IID: per-device feature means v_k ~ N(B_k, 1) differ across devices (std ~ sqrt(1 + beta^2)).
    means = np.stack([x.mean(0) for x in xs])
    assert means[:, 0].std() > 0.7
    # Within a device, Cov(x) = diag(j^-1.2): pooled within-device variances match.
    within = np.concatenate([x - x.mean(0) for x in xs])
    np.testing.assert_allclose(within.var(0), synthetic.feature_covariance_diagonal(), rtol=0.1)
    # Each device's labels come from its own model, which does not label other devices' data.
    devices = list(synthetic.sample_devices(load_config("synthetic", "fedstream.recipes")))
    for i in (0, 7):
        np.testing.assert_array_equal(synthetic.label(xs[i], devices[i].w, devices[i].b), ys[i])
    cross = np.mean([(synthetic.label(xs[i], devices[0].w, devices[0].b) == ys[i]).mean() for i in range(1, 30)])
    assert cross < 0.6


def test_synthetic_device_models_follow_the_priors():
    # u_k ~ N(0, alpha^2) is shared by W_k and b_k; W_k ~ N(u_k, 1); v_k ~ N(B_k, 1), B_k ~ N(0, beta^2).
    config = load_config("synthetic", "fedstream.recipes", ["num_devices=400", "alpha=2.0", "beta=0.5"])
    devices = list(synthetic.sample_devices(config))
    w_means = np.array([d.w.mean() for d in devices])
    b_means = np.array([d.b.mean() for d in devices])
    assert abs(w_means.std() - 2.0) < 0.25  # std of u_k (W_k's own noise averages out over 600 entries)
    assert np.corrcoef(w_means, b_means)[0, 1] > 0.9  # b_k has the same mean u_k
    assert abs(np.mean([d.w.std() for d in devices]) - 1.0) < 0.05
    v_means = np.array([d.mean.mean() for d in devices])
    assert abs(v_means.std() - 0.5) < 0.1  # std of B_k (plus 1/sqrt(60) noise)
    assert abs(np.mean([d.mean.std() for d in devices]) - 1.0) < 0.05
    assert all(len(d.y) >= 50 for d in devices)


def test_synthetic_iid_devices_share_one_labelling(tmp_path):
    out = run_preprocess("synthetic", tmp_path / "iid", ["iid=True"], progress=None)
    ds = FederatedDataset(out)
    devices = list(synthetic.sample_devices(load_config("synthetic", "fedstream.recipes", ["iid=True"])))
    w, b = devices[0].w, devices[0].b
    assert all(np.array_equal(d.w, w) and np.array_equal(d.b, b) and not d.mean.any() for d in devices)
    # The stored labels of every device are exactly argmax(x W + b) of that one model.
    for i in range(30):
        for split in ("train", "test"):
            c = ds.get_client(split, i)
            np.testing.assert_array_equal(synthetic.label(c["x"], w, b), c["y"])
    means = np.stack([ds.get_client("train", i)["x"].mean(0) for i in range(30)])
    assert np.abs(means[:, 0]).max() < 0.5  # v_k = 0 for every device
    assert means[:, 0].std() < 0.2


def test_synthetic_is_deterministic_in_seed():
    def first(seed):
        return next(synthetic.generate(load_config("synthetic", "fedstream.recipes", [f"seed={seed}"])))[2]["x"]

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3)[:5], first(4)[:5])


# ---------------------------------------------------------------------------------------------- arrays


def test_arrays_with_client_key_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 3, 2)), rng.integers(0, 4, 60)
    cid = rng.choice(np.array(["u7", "u2", "u9"]), 60)
    np.savez(tmp_path / "a.npz", x=x, y=y, cid=cid)
    out = run_preprocess("arrays", tmp_path / "out", [f"path={tmp_path / 'a.npz'}", "client_key=cid"], progress=None)
    ds = FederatedDataset(out)
    assert ds.splits == ["train"]
    assert ds.schema["x"].shape == (3, 2) and ds.schema["x"].dtype == "float32"
    assert ds.schema["y"].dtype == "int64"
    assert ds.client_ids("train").tolist() == list(dict.fromkeys(cid.tolist()))  # first-appearance order
    for c in ds.client_ids("train"):
        got = ds.get_client("train", str(c))
        np.testing.assert_array_equal(got["x"], x[cid == c].astype(np.float32))  # file order within a client
        np.testing.assert_array_equal(got["y"], y[cid == c])


def test_arrays_keep_float64_and_integer_client_ids(tmp_path):
    x = np.linspace(0, 1, 12)[:, None]
    np.savez(tmp_path / "a.npz", x=x, user=np.array([3, 1, 3, 2, 1, 3, 2, 2, 1, 3, 3, 1]))
    out = run_preprocess("arrays", tmp_path / "out", [f"path={tmp_path / 'a.npz'}", "client_key=user",
                                                      "float_dtype=''"], progress=None)
    ds = FederatedDataset(out)
    assert ds.client_ids("train").tolist() == ["3", "1", "2"]
    np.testing.assert_array_equal(ds.get_client("train", "2")["x"], x[[3, 6, 7]])  # float64 kept bit for bit


def test_arrays_with_partitioner_covers_all(tmp_path):
    rng = np.random.default_rng(1)
    x = np.arange(300, dtype=np.float32)[:, None]
    y = rng.integers(0, 5, 300)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    for partitioner in ("iid", "dirichlet", "shards"):
        out = run_preprocess("arrays", tmp_path / partitioner, [f"path={tmp_path / 'b.npz'}",
                                                                f"partitioner={partitioner}", "num_clients=6",
                                                                "test_fraction=0.2"], progress=None)
        ds = FederatedDataset(out)
        assert ds.client_ids("train").tolist() == [f"client_{i:05d}" for i in range(6)]
        assert ds.client_ids("test").tolist() == ds.client_ids("train").tolist()
        got_x = np.concatenate([ds.get_client(s, i)["x"][:, 0] for s in ("train", "test") for i in range(6)])
        got_y = np.concatenate([ds.get_client(s, i)["y"] for s in ("train", "test") for i in range(6)])
        order = np.argsort(got_x)
        np.testing.assert_array_equal(got_x[order], x[:, 0])  # every example exactly once
        np.testing.assert_array_equal(got_y[order], y)  # still paired with its label
        for i in range(6):
            n = ds.client_sizes("train")[i] + ds.client_sizes("test")[i]
            assert ds.client_sizes("test")[i] == math.ceil(0.2 * n)


def test_arrays_errors_name_file_and_key(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 2)), y=np.zeros(5))
    with pytest.raises(ValueError, match=r"c\.npz: arrays have different leading"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'c.npz'}"], progress=None)
    with pytest.raises(ValueError, match=r"c\.npz: no array 'z'"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'c.npz'}", "features=x,z"], progress=None)
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1)), obj=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(ValueError, match=r"d\.npz: array 'obj' is an object array"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'd.npz'}"], progress=None)
    with pytest.raises(ValueError, match=r"d\.npz: no array 'y'"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'd.npz'}", "features=x",
                                                  "partitioner=dirichlet"], progress=None)
    with pytest.raises(ValueError, match=r"nope\.npz: no such file"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'nope.npz'}"], progress=None)
    with pytest.raises(ValueError, match="needs --config.path"):
        run_preprocess("arrays", tmp_path / "o", progress=None)
    with pytest.raises(ValueError, match="partitioner must be one of"):
        run_preprocess("arrays", tmp_path / "o", [f"path={tmp_path / 'c.npz'}", "features=x",
                                                  "partitioner=random"], progress=None)
    assert not (tmp_path / "o").exists()


def test_arrays_changed_input_is_not_up_to_date(tmp_path):
    path = tmp_path / "e.npz"
    np.savez(path, x=np.zeros((10, 1)))
    out = run_preprocess("arrays", tmp_path / "o", [f"path={path}", "num_clients=2"], progress=None)
    run_preprocess("arrays", out, [f"path={path}", "num_clients=2"], progress=None)  # same file: no-op
    np.savez(path, x=np.ones((10, 1)))
    with pytest.raises(ConfigError, match="--force"):
        run_preprocess("arrays", out, [f"path={path}", "num_clients=2"], progress=None)
    run_preprocess("arrays", out, [f"path={path}", "num_clients=2"], force=True, progress=None)
    assert FederatedDataset(out).get_client("train", 0)["x"].min() == 1.0


# ---------------------------------------------------------------------------------------------- driver


RECIPE = """\
import ml_collections, numpy as np
from fedstream.data.format import FeatureSpec
SOURCE = 'test'
def get_config():
    c = ml_collections.ConfigDict(); c.n = 3; c.claimed = -1; c.seed = 0; return c
def schema(config):
    return {'v': FeatureSpec('int32', ())}
def generate(config):
    for i in range(config.n):
        yield 'train', f'k{i}', {'v': np.arange(i, dtype=np.int32)}
def expected_counts(config):
    n = config.n * (config.n - 1) // 2 if config.claimed < 0 else config.claimed
    return {'train': (config.n, n)}
"""


def test_recipe_by_path_and_expected_counts(tmp_path):
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(RECIPE)
    out = run_preprocess(str(recipe), tmp_path / "o", ["n=4"], progress=None)
    ds = FederatedDataset(out)
    assert ds.client_sizes("train").tolist() == [0, 1, 2, 3]
    assert ds.metadata["recipe"] == "my_recipe" and ds.metadata["source"] == "test"
    with pytest.raises(ValueError, match="split 'train' has 4 clients / 6 examples, expected 4 / 7"):
        run_preprocess(str(recipe), tmp_path / "bad", ["n=4", "claimed=7"], progress=None)
    assert not (tmp_path / "bad").exists()
    # A failed forced rebuild keeps the previous dataset.
    with pytest.raises(ValueError, match="expected"):
        run_preprocess(str(recipe), out, ["n=4", "claimed=7"], force=True, progress=None)
    assert FederatedDataset(out).client_sizes("train").tolist() == [0, 1, 2, 3]


def test_unknown_recipe_and_incomplete_recipe(tmp_path):
    with pytest.raises(ConfigError, match="unknown name 'no-such-recipe'"):
        run_preprocess("no-such-recipe", tmp_path / "o", progress=None)
    bad = tmp_path / "bad.py"
    bad.write_text(RECIPE.replace("SOURCE = 'test'", ""))
    with pytest.raises(ConfigError, match="SOURCE"):
        run_preprocess(str(bad), tmp_path / "o", progress=None)
    assert not (tmp_path / "o").exists()


def test_progress_lines(tmp_path, monkeypatch):
    import fedstream.data.preprocessing as preprocessing

    monkeypatch.setattr(preprocessing, "PROGRESS_EVERY_S", 0.0)
    messages = []
    run_preprocess("synthetic", tmp_path / "s", ["num_devices=3"], progress=messages.append)
    assert messages[0].startswith("preprocessing synthetic into")
    assert any("clients written" in m and "ex/s" in m for m in messages[1:-1])
    assert messages[-1].startswith("wrote train: 3 clients") and "test: 3 clients" in messages[-1]


def test_missing_test_split_is_one_line_before_any_model_is_built(tmp_path, monkeypatch):
    """The arrays recipe writes only 'train' by default; training says so at once, naming the config keys."""
    from fedstream.training import train as train_module
    from tests.support import run_cli

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.normal(size=(60, 8, 8, 1)).astype(np.float32),
             y=rng.integers(0, 10, 60).astype(np.int32))
    data = run_preprocess("arrays", tmp_path / "arr", [f"path={tmp_path / 'mine.npz'}"], progress=None)
    assert FederatedDataset(data).splits == ["train"]

    def no_model(*args, **kwargs):
        raise AssertionError("the split check must come before the model is built")

    monkeypatch.setattr(train_module, "build_algorithm", no_model)
    result = run_cli("train", "digits_fedavg", "--workdir", tmp_path / "run", f"--config.data.path={data}",
                     "--config.clients_per_round=5")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (f"fedstream: error: {data} has no split 'test' to evaluate on (splits: train); the run evaluates "
            "data.test_split every eval.every rounds") in result.stderr
    assert "--config.test_fraction=0.2" in result.stderr
    config = load_config("digits_fedavg", "fedstream.pipelines", [f"data.path={data}", "data.train_split=training"])
    with pytest.raises(ConfigError, match=r"no split 'training' to train on \(splits: train\); set data.train_split"):
        train_module.open_dataset(config, log=lambda _: None)
    config.data.train_split, config.data.test_split = "train", "train"  # evaluating on the train split is allowed
    assert train_module.open_dataset(config, log=lambda _: None).splits == ["train"]
