"""fedstream as a library from the config and the command line (issue 14): own models and algorithms named in a
config, typed algorithm options, `fedstream config`, `fedstream list --algorithm`, and the stored run as the default
config of `eval` and of a resume."""

import ast
import json
import pathlib
import textwrap

import ml_collections
import numpy as np
import pytest

import fedstream.config
from fedstream.algorithms import algorithm_names, algorithm_options, build_algorithm, register_algorithm
from fedstream.algorithms.fedavg import make_optimizer
from fedstream.config import ConfigError, default_train_config, load_config, validate_train_config
from fedstream.models import get_model
from support import run_cli, train_records

ROOT = pathlib.Path(__file__).resolve().parent.parent

PARTS = '''
import dataclasses

import jax
from flax import linen as nn

from fedstream.algorithms import FedAvg


class Tiny(nn.Module):
    num_classes: int
    width: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1))))


def tiny(num_classes: int, width: int = 8):
    """A one-hidden-layer MLP of our own (no **kwargs: it is passed only what it declares)."""
    return Tiny(num_classes, width)


@dataclasses.dataclass(frozen=True)
class ScaledFedAvg(FedAvg):
    """FedAvg whose server step is scaled.

    Options:
      scale: multiplies the mean client delta before the server optimizer.
    """

    scale: float = 1.0

    def server_update(self, state, total, rng=None):
        mean = jax.tree.map(lambda d: self.scale * d / total.weight, total.weighted)
        return self.apply_server_optimizer(state, mean)
'''


def write_project(root: pathlib.Path, digits, model: str, algorithm: str) -> pathlib.Path:
    """A pipeline file next to parts.py (a model factory and an algorithm of our own); returns the pipeline."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "parts.py").write_text(PARTS)
    pipeline = root / "my_pipeline.py"
    pipeline.write_text(textwrap.dedent(f'''
        from fedstream.pipelines import digits_fedavg

        def get_config():
            c = digits_fedavg.get_config()
            c.data.path = {str(digits)!r}
            c.num_rounds = 1
            c.eval.every = 1
            c.model.name = {model!r}
            c.model.options.width = 16
            c.algorithm.name = {algorithm!r}
            c.algorithm.options.scale = 0.5
            return c
    '''))
    return pipeline


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("fedstream: error: "), result.stderr
    return lines[0]


# --- A. own parts from the config and the command line ----------------------------------------------------------


@pytest.mark.parametrize("names", [("parts.py:tiny", "parts.py:ScaledFedAvg"), ("parts:tiny", "parts:ScaledFedAvg")],
                         ids=["file", "module"])
def test_model_and_algorithm_from_a_file_next_to_the_pipeline(tmp_path, digits, monkeypatch, names):
    """`path.py:attribute` and `module:attribute` resolve next to the pipeline file, from another cwd, without
    PYTHONPATH; the factory gets only the options it declares (no hidden / conv_impl)."""
    pipeline = write_project(tmp_path / "project", digits, *names)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli("train", pipeline, "--workdir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert [r["round"] for r in train_records(tmp_path / "run") if r["kind"] == "train"] == [1]
    config = load_config(str(pipeline), "fedstream.pipelines")
    assert fedstream.config.config_origin(config) == pipeline.parent.resolve()


def test_own_names_that_do_not_resolve_are_one_line_errors(tmp_path, digits, monkeypatch):
    pipeline = write_project(tmp_path, digits, "parts.py:tiny", "parts.py:ScaledFedAvg")
    monkeypatch.chdir(tmp_path)
    cases = [
        ("--config.model.name=nowhere.py:tiny", "config key 'model.name': no file 'nowhere.py' (looked in"),
        ("--config.model.name=parts.py:huge", "config key 'model.name': file"),
        ("--config.model.name=no_such_module_xyz:tiny", "config key 'model.name': no module 'no_such_module_xyz'"),
        ("--config.algorithm.name=parts.py:Missing", "config key 'algorithm.name': file"),
        ("--config.algorithm.name=fedmagic", "config key 'algorithm.name' must be one of"),
    ]
    for override, message in cases:
        error = one_line_error(run_cli("config", pipeline, override))
        assert message in error, (override, error)
    assert "has no attribute 'huge'" in one_line_error(run_cli("config", pipeline, cases[1][0]))


def test_a_model_registered_with_the_public_function_is_accepted():
    import fedstream.models
    from fedstream.models import model_factories, register_model

    def tiny_mlp(num_classes: int, width: int = 4):
        """A registered model of our own."""
        from flax import linen as nn

        return nn.Dense(num_classes)

    register_model("tiny_mlp", tiny_mlp)
    config = load_config("digits_fedavg", "fedstream.pipelines", ["model.name=tiny_mlp"])
    validate_train_config(config)
    assert "tiny_mlp" in model_factories() and "tiny_mlp" in fedstream.models.MODEL_NAMES  # the live registry
    with pytest.raises(ConfigError, match="'model.name'"):
        validate_train_config(load_config("digits_fedavg", "fedstream.pipelines", ["model.name=tiny_mpl"]))


def in_memory(features=("x", "y")):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, 40).astype(np.int32)
    owner = np.arange(40) % 4
    from fedstream.data.memory import InMemoryDataset

    split = {features[0]: x, features[1]: y, "client": owner}
    return InMemoryDataset.from_arrays({"train": split, "test": split})


def test_feature_names_come_from_the_config():
    from fedstream.training.train import build_algorithm as from_config

    config = load_config("digits_fedavg", "fedstream.pipelines", ["model.input_key=image", "model.label_key=label"])
    validate_train_config(config)
    algorithm = from_config(config, in_memory(("image", "label")))
    assert (algorithm.model.input_key, algorithm.model.label_key) == ("image", "label")
    with pytest.raises(ConfigError, match=r"'model.input_key': dataset .* has no feature 'image' \(features: x, y"):
        from_config(config, in_memory())


def test_model_factories_get_only_what_they_declare():
    from fedstream.training.train import build_algorithm as from_config

    seen = {}

    def strict(num_classes: int, hidden=(1,)):
        """Takes hidden, not conv_impl, and no **kwargs."""
        from flax import linen as nn

        seen["hidden"] = tuple(hidden)
        return nn.Dense(num_classes)

    from fedstream.models import register_model

    register_model("strict_test_model", strict)
    config = load_config("digits_fedavg", "fedstream.pipelines", ["model.name=strict_test_model",
                                                                 "model.hidden=(7,)"])
    from_config(config, in_memory())
    assert seen["hidden"] == (7,)
    config = load_config("digits_fedavg", "fedstream.pipelines", ["model.name=strict_test_model",
                                                                 "model.options.depth=3"])
    with pytest.raises(ConfigError, match="'model.options.depth': model 'strict_test_model' takes no option"):
        from_config(config, in_memory())


# --- B. typed options -------------------------------------------------------------------------------------------


def test_every_option_of_every_registered_algorithm_is_declared_and_documented():
    for name in algorithm_names():
        for option, spec in algorithm_options(name).items():
            assert spec.doc and spec.type_name, (name, option)
            assert spec.required or spec.accepts(spec.default), (name, option, spec.default)


def test_options_come_from_fields_and_factory_parameters():
    mimelite = algorithm_options("mimelite")
    assert list(mimelite) == ["server_learning_rate", "client_delta_clip_norm"]  # a base class's field, documented
    assert mimelite["server_learning_rate"].doc.startswith("eta_s")
    assert list(algorithm_options("scaffold")) == []  # client_learning_rate and population: set by the train loop
    dp = algorithm_options("dp_fedavg")
    assert {"clip_norm", "noise_multiplier", "base", "base_options"} <= set(dp)
    assert not {"population", "num_rounds", "require_dp", "model"} & set(dp)
    assert dp["clip_norm"].type_name == "float" and dp["clip_norm"].default == 0.0
    assert dp["clip_norm"].accepts(1) and not dp["clip_norm"].accepts("1") and not dp["clip_norm"].accepts(True)
    assert dp["clipped_count_stddev"].accepts(None) and dp["base_options"].accepts({"proximal_weight": 0.1})


def test_algorithm_options_from_the_command_line(tmp_path):
    result = run_cli("config", "digits_fedavg", "--config.algorithm.name=fedprox",
                     "--config.algorithm.options.proximal_weight=0.1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["algorithm"] == {"name": "fedprox", "options": {"proximal_weight": 0.1}}
    cases = [
        (["--config.algorithm.name=fedprox", "--config.algorithm.options.proximal_wieght=0.1"],
         ("config key 'algorithm.options.proximal_wieght': algorithm 'fedprox' has no option 'proximal_wieght' "
          "(its options: proximal_weight)")),
        (["--config.algorithm.name=fedprox", "--config.algorithm.options.proximal_weight=strong"],
         "config key 'algorithm.options.proximal_weight' expects float, got 'strong'"),
        (["--config.algorithm.options.proximal_weight=0.1"],
         "algorithm 'fedavg' has no option 'proximal_weight' (it has no options)"),
        (["--config.algorithm.name=scaffold", "--config.algorithm.options.population=5"],
         "set by the train loop"),
    ]
    workdir = tmp_path / "w"
    for overrides, message in cases:  # refused before any work: no workdir, no preprocessing
        result = run_cli("train", "digits_fedavg", "--workdir", workdir, f"--config.data.path={tmp_path / 'd'}",
                         *overrides)
        assert message in one_line_error(result), (overrides, result.stderr)
    assert not workdir.exists() and not (tmp_path / "d").exists()


def test_dp_fedavg_runs_from_digits_fedavg_with_options_on_the_command_line(tmp_path, digits):
    result = run_cli("train", "digits_fedavg", "--workdir", tmp_path, f"--config.data.path={digits}",
                     "--config.num_rounds=2", "--config.eval.every=2", "--config.algorithm.name=dp_fedavg",
                     "--config.algorithm.options.clip_norm=1.0", "--config.algorithm.options.noise_multiplier=0.5")
    assert result.returncode == 0, result.stderr
    train = [r for r in train_records(tmp_path) if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2] and train[-1]["dp_epsilon"] > 0


def test_a_factorys_own_type_error_propagates():
    def broken(model, client_optimizer, server_optimizer, *, strength: float = 1.0):
        """Raises TypeError from inside.

        Options:
          strength: unused.
        """
        return None + strength  # TypeError inside the factory, not a bad option

    register_algorithm("broken_test_algorithm", broken, "raises TypeError internally")
    model, sgd = get_model("logistic", (2,), 2), make_optimizer("sgd", 0.1)
    with pytest.raises(TypeError, match="unsupported operand"):
        build_algorithm("broken_test_algorithm", model, sgd, sgd, strength=2.0)
    with pytest.raises(ValueError, match="has no option 'strenght'"):
        build_algorithm("broken_test_algorithm", model, sgd, sgd, strenght=2.0)


def test_list_algorithm_prints_its_options(tmp_path, monkeypatch):
    result = run_cli("list", "--algorithm", "fedprox")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("proximal_weight"))
    assert row.split()[:3] == ["proximal_weight", "float", "0.0"] and "mu" in row
    (tmp_path / "parts.py").write_text(PARTS)
    monkeypatch.chdir(tmp_path)
    own = run_cli("list", "--algorithm", "parts.py:ScaledFedAvg")
    assert own.returncode == 0 and "scale" in own.stdout and "multiplies the mean client delta" in own.stdout


def test_config_command_prints_the_resolved_config():
    result = run_cli("config", "digits_fedavg", "--config.num_rounds=7", "--json")
    assert result.returncode == 0, result.stderr
    expected = load_config("digits_fedavg", "fedstream.pipelines", ["num_rounds=7"]).to_dict()
    assert json.loads(result.stdout) == json.loads(json.dumps(expected, default=list))
    text = run_cli("config", "digits_fedavg")
    assert text.returncode == 0 and "num_rounds: 200" in text.stdout and "input_key: x" in text.stdout
    assert "must be an integer >= 1" in one_line_error(run_cli("config", "digits_fedavg", "--config.client.epochs=0"))


# --- C. the stored run is the default ---------------------------------------------------------------------------


def test_schema_lives_in_config_py_and_digits_fedavg_starts_from_it():
    from fedstream.pipelines import digits_fedavg

    tree = ast.parse(pathlib.Path(fedstream.config.__file__).read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("fedstream")]
    assert not hasattr(fedstream.config, "REFERENCE_PIPELINE")
    assert fedstream.config.flatten(default_train_config().to_dict()).keys() == \
        fedstream.config.flatten(digits_fedavg.get_config().to_dict()).keys()
    source = (ROOT / "fedstream" / "config.py").read_text()
    body = source[source.index("def default_train_config"):source.index("def _type_ok")]
    for line in body.splitlines():
        if line.strip().startswith("c.") and "=" in line and "ConfigDict()" not in line:
            assert "#" in line or line.split("=")[0].strip() in _SELF_EXPLANATORY, line


_SELF_EXPLANATORY = {"c.clients_per_round", "c.data.train_split", "c.data.test_split", "c.model.num_classes",
                     "c.client.learning_rate", "c.client.momentum", "c.client.batch_size", "c.client.epochs",
                     "c.server.learning_rate", "c.server.momentum", "c.server.b1", "c.server.b2", "c.server.eps",
                     "c.eval.batch_size", "c.eval.chunk_clients", "c.checkpoint.keep"}


def test_validation_runs_once_per_cli_call(monkeypatch, tmp_path):
    import fedstream.training.train as train_module

    calls = []
    real = fedstream.config.validate_train_config
    monkeypatch.setattr(fedstream.config, "validate_train_config", lambda *a, **k: (calls.append(1), real(*a, **k)))
    monkeypatch.setattr(train_module, "train", lambda config, workdir, **kw: calls.append("train"))
    result = run_cli("train", "digits_fedavg", "--workdir", tmp_path / "w", "--config.num_rounds=1")
    assert result.returncode == 0, result.stderr
    assert calls == [1, "train"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits):
    """A finished 2-round digits run with overrides: (workdir, data)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("train", "digits_fedavg", "--workdir", workdir, f"--config.data.path={digits}",
                     "--config.num_rounds=2", "--config.eval.every=1", "--config.client.learning_rate=0.05")
    assert result.returncode == 0, result.stderr
    return workdir, digits


def test_eval_without_a_pipeline_uses_the_stored_config(finished, tmp_path):
    workdir, data = finished
    stored = run_cli("eval", "--workdir", workdir, "--json")
    assert stored.returncode == 0, stored.stderr
    logged = next(r for r in train_records(workdir) if r["kind"] == "eval" and r["round"] == 2)
    result = json.loads(stored.stdout.strip().splitlines()[-1])
    assert result["round"] == 2 and result["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-5)
    moved = tmp_path / "moved"  # a moved dataset: data.path may differ
    import shutil

    shutil.copytree(data, moved)
    again = run_cli("eval", "--workdir", workdir, "--json", "--step", "1", "--config.eval.batch_size=16",
                    f"--config.data.path={moved}")
    assert again.returncode == 0, again.stderr
    assert "config key 'client.learning_rate' is 0.1 but the run" in one_line_error(
        run_cli("eval", "--workdir", workdir, "--config.client.learning_rate=0.1"))
    assert "no checkpoints/ directory" in one_line_error(run_cli("eval", "--workdir", tmp_path / "nothing"))


def test_resuming_a_finished_run_says_so_and_the_stored_config_resumes(finished, tmp_path):
    import shutil

    workdir, data = finished
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    before = (run / "metrics.jsonl").read_text()
    again = run_cli("train", "digits_fedavg", "--workdir", run, f"--config.data.path={data}",
                    "--config.client.learning_rate=0.05")  # no --config.num_rounds: not the pipeline's 200
    assert again.returncode == 0, again.stderr
    lines = again.stdout.strip().splitlines()
    assert len(lines) == 1 and "is finished: 2 rounds done" in lines[0] and "--config.num_rounds=N" in lines[0]
    assert (run / "metrics.jsonl").read_text() == before
    assert run_cli("train", "--workdir", run).stdout.count("is finished") == 1  # no pipeline: the stored config
    extended = run_cli("train", "--workdir", run, "--config.num_rounds=3")
    assert extended.returncode == 0, extended.stderr
    assert "after round 2" in extended.stdout
    assert [r["round"] for r in train_records(run) if r["kind"] == "train"] == [1, 2, 3]
    printed = json.loads(run_cli("config", "--workdir", run, "--json").stdout)
    assert printed["num_rounds"] == 3 and printed["client"]["learning_rate"] == 0.05
    refused = run_cli("train", "digits_fedavg", "--workdir", run, f"--config.data.path={data}")
    assert "config key 'client.learning_rate' is 0.1 but the run" in one_line_error(refused)


def test_train_without_a_pipeline_needs_a_run(tmp_path):
    assert "holds no run to resume" in one_line_error(run_cli("train", "--workdir", tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()


def test_free_form_sections_take_new_keys_but_others_do_not():
    config = fedstream.config.apply_overrides(default_train_config(), ["algorithm.options.base_options.mu=0.5",
                                                                       "model.options.width=3"])
    assert config.algorithm.options.base_options.mu == 0.5 and config.model.options.width == 3
    with pytest.raises(ConfigError, match="unknown config key 'client.lr'"):
        fedstream.config.apply_overrides(default_train_config(), ["client.lr=0.1"])
    assert isinstance(config, ml_collections.ConfigDict)
