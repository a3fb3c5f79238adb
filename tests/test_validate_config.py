"""validate_train_config: bad keys, types and values are refused before any work, naming the key."""

import pkgutil

import ml_collections
import pytest

import fedstream.pipelines
from fedstream.config import ConfigError, load_config, validate_train_config
from support import run_cli


def base():
    return load_config("digits_fedavg", "fedstream.pipelines")


def with_value(key, value):
    """The digits config with `key` set to `value`, as a pipeline file that builds its ConfigDict from scratch
    could hold it (ConfigDict's own type safety applies only to fields that already exist)."""
    d = base().to_dict()
    *parents, leaf = key.split(".")
    node = d
    for part in parents:
        node = node[part]
    node[leaf] = value
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.iter_modules(fedstream.pipelines.__path__)
                                        if not m.name.startswith("_")))
def test_every_shipped_pipeline_is_valid(name):
    validate_train_config(load_config(name, "fedstream.pipelines"))


BAD_VALUES = [
    ("client.learning_rate", -0.1), ("client.learning_rate", 0.0), ("client.learning_rate", float("nan")),
    ("server.learning_rate", -1.0), ("server.learning_rate", float("inf")), ("server.eps", 0.0),
    ("clients_per_round", 0), ("clients_per_round", -3), ("client.batch_size", 0), ("client.epochs", 0),
    ("eval.every", -1), ("eval.batch_size", 0), ("eval.chunk_clients", 0), ("checkpoint.keep", 0),
    ("checkpoint.every", 0), ("num_rounds", -1), ("seed", -1), ("data_threads", -2),
    ("client.max_examples", -1), ("client.max_steps", -1), ("model.num_classes", 0),
    ("client.momentum", 1.0), ("server.momentum", -0.5), ("server.b1", 1.5), ("server.b2", -0.1),
    ("client.optimizer", "adamw"), ("server.optimizer", "SGD"), ("aggregation", "weighted"),
    ("model.name", "resnet9000"), ("model.hidden", (200, 0)), ("model.conv_impl", "fast"),
    ("data.path", ""), ("data.train_split", ""), ("data.augment", "mixup"),
]
if "nonfinite" in base():  # keys added with the NaN policy and personalization
    BAD_VALUES += [("nonfinite", "ignore"), ("eval.finetune_steps", -1)]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_out_of_range_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_train_config(with_value(key, value))


def test_algorithm_name_is_checked_when_the_config_has_one():
    config = base()
    if "algorithm" not in config:
        pytest.skip("this tree's reference pipeline has no algorithm section")
    with pytest.raises(ConfigError, match="'algorithm.name'"):
        validate_train_config(with_value("algorithm.name", "fedmagic"))


WRONG_TYPES = [("client.learning_rate", "0.1"), ("clients_per_round", 2.5), ("clients_per_round", True),
               ("num_rounds", "10"), ("model.hidden", 200), ("eval.every", "often"),
               ("client", 3), ("data.path", 7)]


@pytest.mark.parametrize("key,value", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v in WRONG_TYPES])
def test_wrong_types_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_train_config(with_value(key, value))


def test_int_for_float_and_list_for_tuple_are_accepted():
    validate_train_config(with_value("client.learning_rate", 1))
    validate_train_config(with_value("model.hidden", [64, 32]))


def test_unknown_keys_in_a_pipeline_file_are_refused_with_a_suggestion():
    config = base()
    config.clients_per_rnd = 5  # a typo in a pipeline file creates a new key silently
    with pytest.raises(ConfigError, match="'clients_per_rnd'.*did you mean 'clients_per_round'"):
        validate_train_config(config)
    config = base()
    config.client.learnin_rate = 0.5
    with pytest.raises(ConfigError, match="'client.learnin_rate'"):
        validate_train_config(config)


def test_free_form_model_options_are_not_checked():
    config = base()
    config.model.options.dropout = 0.1
    config.model.options.anything = {"nested": [1, 2]}
    validate_train_config(config)


def test_clients_per_round_against_the_population():
    validate_train_config(with_value("clients_per_round", 100), num_train_clients=100)
    with pytest.raises(ConfigError, match="'clients_per_round' is 101, more than the 100 clients"):
        validate_train_config(with_value("clients_per_round", 101), num_train_clients=100)


def test_accepts_a_plain_configdict_from_a_user_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from fedstream.pipelines import digits_fedavg\n\n"
                    "def get_config():\n    c = digits_fedavg.get_config()\n    c.num_rounds = 3\n"
                    "    c.client.learning_rate = -1.0\n    return c\n")
    with pytest.raises(ConfigError, match="'client.learning_rate' must be a finite number > 0"):
        validate_train_config(load_config(str(path), "fedstream.pipelines"))
    assert isinstance(load_config(str(path), "fedstream.pipelines"), ml_collections.ConfigDict)


def test_cli_train_refuses_before_any_work(tmp_path):
    workdir = tmp_path / "w"
    result = run_cli("train", "digits_fedavg", "--workdir", workdir, "--config.client.batch_size=0",
                     f"--config.data.path={tmp_path / 'data'}")
    assert result.returncode == 2
    assert result.stderr.strip() == "fedstream: error: config key 'client.batch_size' must be an integer >= 1, got 0"
    assert not workdir.exists() and not (tmp_path / "data").exists()  # no workdir, no preprocessing


def test_train_refuses_more_clients_per_round_than_the_population(tmp_path, digits):
    data = digits
    result = run_cli("train", "digits_fedavg", "--workdir", tmp_path / "w", "--config.clients_per_round=101",
                     f"--config.data.path={data}")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err == (f"fedstream: error: config key 'clients_per_round' is 101, more than the 100 clients of split "
                   f"'train' in {data}")
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
