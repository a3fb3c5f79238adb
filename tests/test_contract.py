"""The algorithm contract (`fedstream.algorithms.base`): the runner weights `Contribution.weighted`, sums
`summed` and `metrics`, logs the metrics by name, and reads capabilities from class attributes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedstream as fs
from fedstream.algorithms import Algorithm, Contribution, FedAvg, build_algorithm, make_optimizer
from fedstream.algorithms.base import RoundTotal, aggregate
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.models import get_model
from fedstream.training.rounds import build_debug_round, build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource

# Clients of very different sizes, so that example weights and uniform weights give different means.
SIZES = [3, 40, 7, 1, 25, 12]
INPUT_SHAPE, NUM_CLASSES = (3, 2, 1), 4


@dataclasses.dataclass(frozen=True)
class PlainMean(Algorithm):
    """Written against the interface alone: each client sends its unweighted delta and one count; the server
    steps by the weighted mean (which the runner's weights must make FedAvg's)."""

    def client_contribution(self, client, broadcast, weight, stored=None, prepass=None, rng=None):
        delta = jax.tree.map(jnp.subtract, client.params, broadcast["params"])
        return Contribution(weighted=delta, summed={"clients": jnp.float32(1)}), stored

    def server_update(self, state, total, rng=None):
        assert isinstance(total, RoundTotal)
        return self.apply_server_optimizer(state, jax.tree.map(lambda d: d / total.weight, total.weighted))


def one_round(algorithm, uniform: bool, num_devices: int = 1, debug: bool = False):
    """(initial params, params after one round, stats) over SIZES' clients, all sampled."""
    mesh = make_mesh(num_devices)
    pipeline = CohortPipeline(InMemorySource(SIZES, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=2),
                              "train", ("x", "y"), seed=1, cohort_size=len(SIZES), batching=ClientBatching(5),
                              num_devices=num_devices, data_threads=0, uniform_weights=uniform)
    state = algorithm.init(jax.random.PRNGKey(0))
    batch = next(pipeline.iterator(1))["batch"]
    if debug:
        new, stats = build_debug_round(algorithm, seed=1)(state, batch)
    else:
        new, stats = build_train_round(algorithm, mesh, seed=1)(replicate(state, mesh), shard_batch(batch, mesh))
    return state.params, jax.device_get(new.params), stats


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def build(cls, **options):
    model = get_model("logistic", INPUT_SHAPE, NUM_CLASSES)
    return cls(model, make_optimizer("sgd", 0.3), make_optimizer("sgd", 1.0), **options)


@pytest.mark.parametrize("num_devices", [1, 4])
def test_an_unweighted_delta_is_weighted_by_the_runner_and_equals_fedavg(num_devices):
    _, fedavg, _ = one_round(build(FedAvg), uniform=False, num_devices=num_devices)
    start, mine, stats = one_round(build(PlainMean), uniform=False, num_devices=num_devices)
    np.testing.assert_array_equal(flat(mine), flat(fedavg))  # the same sums, in the same order
    # The weights are the clients' example counts and they matter: uniform weights move the model elsewhere.
    assert float(stats["weight"]) == sum(SIZES)
    _, uniform, _ = one_round(build(PlainMean), uniform=True, num_devices=num_devices)
    moved = np.linalg.norm(flat(mine) - flat(start))
    assert np.linalg.norm(flat(uniform) - flat(mine)) > 0.05 * moved > 0


def test_the_debug_round_weights_the_same_way():
    _, compiled, _ = one_round(build(PlainMean), uniform=False)
    _, eager, stats = one_round(build(PlainMean), uniform=False, debug=True)
    np.testing.assert_allclose(flat(eager), flat(compiled), rtol=1e-5, atol=1e-6)
    assert float(stats["weight"]) == sum(SIZES)


def test_summed_and_weight_override_and_aggregate():
    """`summed` is added as is, `Contribution.weight` replaces the runner's weight; `aggregate` sums like the
    runner."""
    a = Contribution(weighted={"d": jnp.array([1.0, 2.0])}, summed={"n": jnp.float32(1)},
                     metrics={"m": jnp.float32(3)})
    b = Contribution(weighted={"d": jnp.array([3.0, -1.0])}, summed={"n": jnp.float32(1)},
                     metrics={"m": jnp.float32(4)}, weight=jnp.float32(0.5))
    total = aggregate([a, b], [jnp.float32(2), jnp.float32(10)])
    np.testing.assert_allclose(total.weighted["d"], [2 * 1 + 0.5 * 3, 2 * 2 - 0.5 * 1])
    assert float(total.weight) == 2.5 and float(total.summed["n"]) == 2 and float(total.metrics["m"]) == 7


def test_an_old_style_dict_contribution_is_refused():
    @dataclasses.dataclass(frozen=True)
    class OldStyle(FedAvg):
        def client_contribution(self, client, broadcast, weight, stored=None, prepass=None, rng=None):
            delta = self.client_delta(client, broadcast["params"])
            return {"delta": jax.tree.map(lambda d: weight * d, delta), "weight": weight}, stored

    with pytest.raises(TypeError, match="Contribution"):
        one_round(build(OldStyle), uniform=False)


@dataclasses.dataclass(frozen=True)
class CountingFedAvg(FedAvg):
    """FedAvg that reports, through `Contribution.metrics`, how many clients and examples trained."""

    def client_contribution(self, client, broadcast, weight, stored=None, prepass=None, rng=None):
        contribution, stored = super().client_contribution(client, broadcast, weight, stored, prepass, rng)
        return contribution.replace(metrics={"my_clients": jnp.float32(1), "my_weight": weight}), stored


def small_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, 90).astype(np.int32)
    owner = rng.integers(0, 6, 90)
    return fs.InMemoryDataset.from_arrays({"train": {"x": x, "y": y, "client": owner},
                                           "test": {"x": x[:20], "y": y[:20], "client": owner[:20]}})


def test_a_custom_metric_reaches_metrics_jsonl(tmp_path):
    algorithm = CountingFedAvg(get_model("logistic", INPUT_SHAPE, NUM_CLASSES), optax.sgd(0.1), optax.sgd(1.0))
    with fs.Simulation(small_data(), algorithm, clients_per_round=4, batch_size=8, workdir=tmp_path / "run",
                       log=lambda _: None) as sim:
        sim.run(2)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    assert [line["round"] for line in train] == [1, 2]
    for line in train:  # the sum over the round's clients, under the metric's own name
        assert line["my_clients"] == line["clients"] > 0
        assert line["my_weight"] == line["examples"]
        assert not any(key.startswith("log_") for key in line)


def test_capabilities_are_class_attributes():
    model = get_model("logistic", INPUT_SHAPE, NUM_CLASSES)
    sgd = make_optimizer("sgd", 0.1)
    context = {"population": 6, "client_learning_rate": 0.1}
    expected = {  # name: (uses_prepass, has_client_state, has_personal_models, is_clustered, updates_on_empty_rounds)
        "fedavg": (False, False, False, False, False),
        "fedprox": (False, False, False, False, False),
        "fednova": (False, False, False, False, False),
        "scaffold": (False, True, False, False, False),
        "mime": (True, False, False, False, False),
        "mimelite": (True, False, False, False, False),
        "hyp_cluster": (True, False, False, True, False),
        "ditto": (False, True, True, False, False),
        "apfl": (False, True, True, False, False),
    }
    for name, flags in expected.items():
        algorithm = build_algorithm(name, model, sgd, sgd, context=context)
        assert isinstance(algorithm, Algorithm)
        assert (algorithm.uses_prepass, algorithm.has_client_state, algorithm.has_personal_models,
                algorithm.is_clustered, algorithm.updates_on_empty_rounds) == flags, name
        assert (algorithm.client_state_template(algorithm.init(jax.random.PRNGKey(0)).params) is not None) == flags[1]
    assert not issubclass(Algorithm, FedAvg) and issubclass(FedAvg, Algorithm)
    # The DP / compression wrapper declares its base's capabilities and its own.
    dp = build_algorithm("dp_fedavg", model, sgd, sgd, clip_norm=1.0, denominator=3.0)
    assert dp.updates_on_empty_rounds and not dp.has_client_state
    topk = build_algorithm("compressed_fedavg", model, sgd, sgd, context=context, compression="topk", base="ditto")
    assert topk.has_client_state and topk.has_personal_models and not topk.updates_on_empty_rounds
    stored = jax.tree.map(lambda a: np.zeros((2, *a.shape), a.dtype),
                          topk.client_state_template(topk.init(jax.random.PRNGKey(0)).params))
    v, has = topk.personal_model(stored)
    assert jax.tree.structure(v) == jax.tree.structure(model.init(jax.random.PRNGKey(0))) and not np.any(has)
