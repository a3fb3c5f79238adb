"""The Python API: Simulation over on-disk and in-memory datasets, own models, resume, and the CLI route."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedstream as fs
from fedstream.config import ConfigError
from fedstream.data.format import DatasetFormatError
from support import final_state, flatten_tree, run_cli, train_records

QUIET = dict(log=lambda _: None)


def leaves(tree):
    return {k: np.asarray(v) for k, v in flatten_tree(jax.device_get(tree))}


def assert_same_params(a, b):
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys() and a
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def digits_fedavg(dataset, **kw):
    """The objects `fedstream train digits_fedavg` builds, made by hand (the pipeline's defaults)."""
    model = fs.get_model("mlp", (8, 8, 1), 10, hidden=(200, 200))
    algorithm = fs.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0))
    return fs.Simulation(dataset, algorithm, clients_per_round=10, batch_size=10, eval_every=25, **QUIET, **kw)


def in_memory_copy(path):
    disk = fs.FederatedDataset(path)
    return fs.InMemoryDataset({split: {str(c): disk.get_client(split, i) for i, c in enumerate(disk.client_ids(split))}
                               for split in disk.splits})


def test_python_route_and_cli_route_give_bit_identical_parameters(tmp_path, digits):
    cli = run_cli("train", "digits_fedavg", "--workdir", tmp_path / "cli", f"--config.data.path={digits}",
                  "--config.num_rounds=3")
    assert cli.returncode == 0, cli.stderr
    result = digits_fedavg(fs.FederatedDataset(digits), workdir=tmp_path / "py").run(3)
    assert result.rounds_done == 3 and result.final_eval["accuracy"] > 0.1
    step_a, a = final_state(tmp_path / "cli")
    step_b, b = final_state(tmp_path / "py")
    assert step_a == step_b == 3
    assert_same_params(a["params"], b["params"])
    assert_same_params(a["params"], result.state.params)
    cli_rows = [r for r in train_records(tmp_path / "cli") if r["kind"] == "train"]
    py_rows = [r for r in train_records(tmp_path / "py") if r["kind"] == "train"]
    assert cli_rows == py_rows


def test_in_memory_dataset_trains_exactly_as_the_same_data_on_disk(digits):
    on_disk = digits_fedavg(fs.FederatedDataset(digits)).run(2)
    in_memory = digits_fedavg(in_memory_copy(digits)).run(2)
    assert_same_params(on_disk.state.params, in_memory.state.params)
    assert on_disk.final_eval == in_memory.final_eval


def test_from_arrays_groups_rows_by_client_and_keeps_their_order():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([0, 1, 0, 1, 1, 0], np.int32)
    data = fs.InMemoryDataset.from_arrays({"train": {"x": x, "y": y, "client": np.array([7, 3, 7, 3, 10, 7])}})
    assert data.client_ids("train").tolist() == ["10", "3", "7"]  # string order, as preprocessing writes ids
    assert data.client_sizes("train").tolist() == [1, 2, 3]
    np.testing.assert_array_equal(data.get_client("train", "7")["x"], x[[0, 2, 5]])
    assert data.schema["x"].shape == (2,) and data.schema["y"].dtype == "int32"
    with pytest.raises(DatasetFormatError, match="'client' array"):
        fs.InMemoryDataset.from_arrays({"train": {"x": x, "y": y}})
    with pytest.raises(DatasetFormatError, match="client '1'.*features"):
        fs.InMemoryDataset({"train": {"0": {"x": x, "y": y}, "1": {"x": x[:, :1], "y": y}}})


def test_resume_in_python_is_bit_identical_and_refuses_other_options(tmp_path, digits):
    data = fs.FederatedDataset(digits)
    model = fs.get_model("logistic", (8, 8, 1), 10)

    def prox(mu, workdir):
        return fs.Simulation(data, fs.FedProx(model, optax.sgd(0.1), optax.adam(0.01), proximal_weight=mu),
                             clients_per_round=5, batch_size=10, workdir=workdir, **QUIET)

    full = prox(0.1, tmp_path / "full").run(4)
    prox(0.1, tmp_path / "resumed").run(2)
    again = prox(0.1, tmp_path / "resumed")
    assert again.rounds_done == 2
    resumed = again.run(4)
    assert_same_params(full.state.params, resumed.state.params)
    def train_rows(workdir):  # the 2-round run also evaluated at its end, round 2
        return [r for r in train_records(workdir) if r["kind"] == "train"]

    assert train_rows(tmp_path / "full") == train_rows(tmp_path / "resumed")
    with pytest.raises(ConfigError, match="'algorithm.options.proximal_weight' is 0.2 but the run"):
        prox(0.2, tmp_path / "resumed").run(6)


def test_rounds_iterator_yields_train_and_eval_metrics(digits):
    sim = fs.Simulation(fs.FederatedDataset(digits), fs.FedAvg(fs.get_model("logistic", (8, 8, 1), 10),
                                                                 optax.sgd(0.1), optax.sgd(1.0)),
                        clients_per_round=4, batch_size=10, eval_every=2, **QUIET)
    seen = list(sim.rounds(3))
    assert [m["round"] for m in seen] == [1, 2, 3]
    assert ["eval" in m for m in seen] == [False, True, True]  # every 2 rounds, and the last
    assert seen[0]["train"]["clients"] == 4 and seen[0]["train"]["examples"] > 0
    assert list(sim.rounds(3)) == []  # done: nothing more to run
    more = list(sim.rounds(5))  # asking for more continues where it stopped
    assert [m["round"] for m in more] == [4, 5]
    on_train = sim.evaluate(split="train")
    assert on_train["num_examples"] > sim.evaluate()["num_examples"]
    assert sim.run(6).rounds_done == 6  # run() closes the simulation; a later call continues in memory
    assert sim.run(7).rounds_done == 7 and int(sim.state.round) == 7


def test_stopping_the_rounds_iterator_rolls_back_the_round_already_dispatched(digits, tmp_path):
    """Round r + 1 is dispatched before round r is yielded; a consumer that stops after r must not lose it."""
    def sim(workdir=None):
        return fs.Simulation(fs.FederatedDataset(digits), fs.FedAvg(fs.get_model("logistic", (8, 8, 1), 10),
                                                                    optax.sgd(0.1), optax.sgd(1.0)),
                             clients_per_round=4, batch_size=10, workdir=workdir, **QUIET)

    reference = sim()
    reference.run(5)
    stopped = sim(tmp_path / "run")
    for metrics in stopped.rounds(5):
        if metrics["round"] == 2:
            break
    assert stopped.rounds_done == 2  # not 3, though round 3 had been dispatched
    stopped.close()
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [1, 2]
    resumed = sim(tmp_path / "run")
    assert resumed.run(5).rounds_done == 5
    assert_same_params(reference.params, resumed.params)
    assert [r["round"] for r in train_records(tmp_path / "run") if r["kind"] == "train"] == [1, 2, 3, 4, 5]

    in_memory = sim()
    for metrics in in_memory.rounds(5):
        if metrics["round"] == 3:
            break
    assert in_memory.rounds_done == 3 and in_memory.run(5).rounds_done == 5  # continues at round 4's data
    assert_same_params(reference.params, in_memory.params)


class Sequential(nn.Module):  # no `train` argument: the wrapper must not pass one
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.tanh(nn.Dense(16)(x.reshape(len(x), -1))))


def small_digits(labels_offset=0):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8, 8, 1)).astype(np.float32)
    y = (rng.integers(0, 10, 120) + labels_offset).astype(np.int32)
    owner = rng.integers(0, 6, 120)
    return fs.InMemoryDataset.from_arrays({"train": {"x": x, "y": y, "client": owner},
                                           "test": {"x": x[:30], "y": y[:30], "client": owner[:30]}})


@pytest.mark.parametrize("kind", ["linen", "functions", "nnx"])
def test_own_models_train(kind):
    from flax import nnx

    data = small_digits()
    if kind == "linen":
        model = fs.Model.from_flax(Sequential(), input_shape=(8, 8, 1), num_classes=10)
    elif kind == "functions":
        def init(rng):
            return {"w": jax.random.normal(rng, (64, 10)) * 0.01, "b": jnp.zeros(10)}

        def apply(params, x, rng):
            return x.reshape(len(x), -1) @ params["w"] + params["b"]

        model = fs.Model.from_functions(init, apply, input_shape=(8, 8, 1), num_classes=10)
    else:
        class Net(nnx.Module):
            def __init__(self, rngs):
                self.dense = nnx.Linear(64, 10, rngs=rngs)

            def __call__(self, x):
                return self.dense(x.reshape(len(x), -1))

        model = fs.Model.from_flax(Net(nnx.Rngs(0)), input_shape=(8, 8, 1), num_classes=10)
    sim = fs.Simulation(data, fs.FedAvg(model, optax.sgd(0.5), optax.sgd(1.0)), clients_per_round=6,
                        batch_size=8, epochs=3, **QUIET)
    losses = [m["train"]["loss"] for m in sim.rounds(6)]
    assert losses[-1] < losses[0] - 0.1, losses  # it learns (memorises the noise labels)


def test_own_loss_and_accuracy_functions_score_the_examples():
    def squared(logits, labels):  # squared error to the one-hot label, per example
        return jnp.sum((jax.nn.softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1])) ** 2, -1)

    def top2(logits, labels):
        return jnp.any(jnp.argsort(logits, -1)[:, -2:] == labels[:, None], -1).astype(jnp.float32)

    model = fs.Model.from_flax(Sequential(), (8, 8, 1), 10, loss_fn=squared, correct_fn=top2)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 10)), jnp.float32)
    labels = jnp.array([0, 3, 9, 2, 2])
    scores = model.example_scores(logits, labels)
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores["loss"], ((p - np.eye(10)[labels]) ** 2).sum(-1), rtol=1e-5)
    expected = [int(l) in np.argsort(row)[-2:] for row, l in zip(np.asarray(logits), np.asarray(labels))]
    np.testing.assert_array_equal(scores["correct"], np.array(expected, np.float32))
    mask = jnp.array([True, True, True, False, False])
    assert float(model.batch_loss(logits, labels, mask)) == pytest.approx(float(scores["loss"][:3].mean()), rel=1e-6)


def test_labels_outside_the_models_classes_are_refused_naming_client_and_range():
    data = small_digits(labels_offset=3)  # labels 3..12 for a 10-class model
    model = fs.Model.from_flax(Sequential(), (8, 8, 1), num_classes=10)
    sim = fs.Simulation(data, fs.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0)), clients_per_round=3,
                        batch_size=8, **QUIET)
    with pytest.raises(DatasetFormatError, match=r"split 'train', client '\d': labels \(feature 'y'\) range over "
                                                  r"\[\d+, 1[0-2]\], outside the model's 10 classes"):
        sim.run(1)


def test_callbacks_see_every_round_in_order(digits):
    events = []

    class Recorder(fs.Callback):
        def on_round_start(self, r):
            events.append(("start", r))

        def on_round_dispatched(self, r):
            events.append(("dispatched", r))

        def on_round_end(self, r, metrics, saved, checkpointer):
            events.append(("end", r, saved, "loss" in metrics["train"]))

    model = fs.get_model("logistic", (8, 8, 1), 10)
    fs.Simulation(fs.FederatedDataset(digits), fs.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0)), clients_per_round=3,
                  batch_size=10, callbacks=[Recorder()], **QUIET).run(2)
    # Pipelined: round 2 is dispatched before round 1's metrics are read (each round's own hooks stay in order).
    assert events == [("start", 1), ("dispatched", 1), ("start", 2), ("dispatched", 2),
                      ("end", 1, False, True), ("end", 2, False, True)]


def test_bad_arguments_are_named(digits):
    data = fs.FederatedDataset(digits)
    algorithm = fs.FedAvg(fs.get_model("logistic", (8, 8, 1), 10), optax.sgd(0.1), optax.sgd(1.0))
    with pytest.raises(ConfigError, match="'client.batch_size' must be an integer >= 1"):
        fs.Simulation(data, algorithm, batch_size=0)
    with pytest.raises(ConfigError, match="no split 'validation'"):
        fs.Simulation(data, algorithm, test_split="validation")
    with pytest.raises(ConfigError, match="'clients_per_round' is 500, more than the 100 clients"):
        fs.Simulation(data, algorithm, clients_per_round=500)
    with pytest.raises(ConfigError, match="no feature 'pixels'"):
        fs.Simulation(data, fs.FedAvg(fs.Model.from_flax(Sequential(), (8, 8, 1), 10, input_key="pixels"),
                                      optax.sgd(0.1), optax.sgd(1.0)))


# fedavg on 4 devices, scaffold (client state) on 4 and mime (a prepass) run on CI (slow): the default suite
# keeps one case under its time budget (test_contract checks the debug round's weighting on its own).
@pytest.mark.parametrize("name,num_devices", [("fedavg", 1), pytest.param("fedavg", 4, marks=pytest.mark.slow),
                                              pytest.param("scaffold", 4, marks=pytest.mark.slow),
                                              pytest.param("mime", 1, marks=pytest.mark.slow)])
def test_debug_mode_runs_clients_eagerly_and_matches_the_compiled_round(name, num_devices):
    """fedavg, a stateful algorithm (per-client control variates) and one with a prepass (Mime)."""
    data = small_digits()
    model = fs.get_model("logistic", (8, 8, 1), 10)

    def simulation(debug):
        algorithm = fs.build_algorithm(name, model, optax.sgd(0.1, momentum=0.9 if name == "mime" else None),
                                       optax.sgd(1.0), context={"client_learning_rate": 0.1, "population": 6})
        return fs.Simulation(data, algorithm, clients_per_round=4, batch_size=8, num_devices=num_devices,
                             debug=debug, **QUIET)

    compiled, eager = simulation(False), simulation(True)
    for a, b in zip(compiled.rounds(2), eager.rounds(2)):
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-5)
        assert a["train"]["clients"] == b["train"]["clients"]
    for key, value in leaves(compiled.state.params).items():
        np.testing.assert_allclose(leaves(eager.state.params)[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.abs(leaves(eager.state.params)["/Dense_0/kernel"]).max() > 0  # trained


def test_debug_mode_lets_a_client_step_use_python_on_values():
    seen = []

    class Printing(fs.FedAvg):
        def client_step(self, state, batch, rng, broadcast=None):
            state, metrics = super().client_step(state, batch, rng, broadcast)
            seen.append(float(metrics.compute()["loss"]))  # a concrete number: only possible when eager
            return state, metrics

    model = fs.get_model("logistic", (8, 8, 1), 10)
    sim = fs.Simulation(small_digits(), Printing(model, optax.sgd(0.1), optax.sgd(1.0)), clients_per_round=2,
                        batch_size=8, debug=True, **QUIET)
    first = next(iter(sim.rounds(1)))
    assert len(seen) == first["train"]["steps"] and all(np.isfinite(seen))


@pytest.mark.slow  # about 3 s; the debug round itself is checked in the default run above
def test_cli_debug_flag_trains_eagerly_to_the_same_model(tmp_path, digits):
    args = ["train", "digits_fedavg", f"--config.data.path={digits}", "--config.num_rounds=1",
            "--config.clients_per_round=3", "--config.model.name=logistic"]
    assert run_cli(*args, "--workdir", tmp_path / "compiled").returncode == 0
    debug = run_cli(*args, "--workdir", tmp_path / "debug", "--debug")
    assert debug.returncode == 0, debug.stderr
    _, a = final_state(tmp_path / "compiled")
    _, b = final_state(tmp_path / "debug")
    for key, value in leaves(a["params"]).items():
        np.testing.assert_allclose(leaves(b["params"])[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
