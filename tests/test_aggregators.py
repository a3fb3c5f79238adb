"""Aggregators chained by hand in Python: equal to the registered dp_fedavg / compressed_fedavg with the same
options (bit-identical), composable around FedProx, refused in orders that would break the DP bound, and
accounted by the Simulation's privacy ledger."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
import run_transforms as rt
from support import InMemorySource, train_records

import fedstream as fs
from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.algorithms.privacy import DPMechanism, default_delta
from fedstream.config import ConfigError
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch

ROUNDS = 2


def assert_runs_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key


def base(spec: dict, **options):
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    return fs.FedAvg(model, make_optimizer("sgd", rt.CLIENT_LR), make_optimizer("sgd", spec["server_lr"]), **options)


def test_a_chain_built_by_hand_equals_the_registered_dp_fedavg(tmp_path):
    spec = rt.CASES["dp_poisson"]  # 12 clients, Poisson sampling with q = 5/12: D = q N = 5
    q = spec["cohort"] / len(rt.SIZES)
    mechanism = DPMechanism(0.6, "poisson", len(rt.SIZES), sampling_rate=q)
    chain = fs.Aggregated(base(spec), [fs.Clip(0.35), fs.GaussianNoise(0.6, denominator=q * len(rt.SIZES),
                                                                      mechanism=mechanism,
                                                                      target_delta=default_delta(len(rt.SIZES)))])
    registered = rt.build(spec)
    assert isinstance(chain, fs.Algorithm) and chain.stages == registered.stages  # optimizers: closures
    assert chain.privacy_accounting() == registered.privacy_accounting()
    assert dataclasses.replace(chain, stages=chain.stages[:1]).stages == (fs.Clip(0.35),)
    assert_runs_equal(rt.run(spec, 4, str(tmp_path / "a"), ROUNDS, algorithm=chain),
                      rt.run(spec, 4, str(tmp_path / "b"), ROUNDS))


def test_compress_then_adaptive_clip_then_noise_equals_dp_fedavg_with_those_options(tmp_path):
    spec = dict(rt.CASES["dp_adaptive_uniform"])
    spec["options"] = {**spec["options"], "compression": "topk", "topk_fraction": 0.25}
    options = spec["options"]
    chain = fs.Aggregated(base(spec), [
        fs.Compress(fs.make_codec("topk", topk_fraction=0.25)),
        fs.Clip(0.35, adaptive=True, target_quantile=options["target_unclipped_quantile"],
                learning_rate=options["clip_learning_rate"], count_stddev=options["clipped_count_stddev"]),
        fs.GaussianNoise(0.6, denominator=float(spec["cohort"]))])
    assert chain.has_client_state and chain.updates_on_empty_rounds  # the residuals of error feedback; DP
    a = rt.run(spec, 4, str(tmp_path / "a"), ROUNDS, algorithm=chain)
    assert_runs_equal(a, rt.run(spec, 4, str(tmp_path / "b"), ROUNDS))
    assert "clip_norm" in a and a["clip_norm"] != 0.35  # C_t moved


def test_compression_alone_equals_compressed_fedavg(tmp_path):
    spec = rt.CASES["quantize_rotate"]
    chain = fs.Aggregated(base(spec), [fs.Compress(fs.make_codec("quantize", bits=2, rotate=True))])
    assert_runs_equal(rt.run(spec, 4, str(tmp_path / "a"), ROUNDS, algorithm=chain),
                      rt.run(spec, 4, str(tmp_path / "b"), ROUNDS))


def one_round(algorithm, source, cohort):
    mesh = make_mesh(1)
    pipeline = CohortPipeline(source, "train", ("x", "y"), seed=0, cohort_size=cohort, batching=ClientBatching(5),
                              num_devices=1, data_threads=0, uniform_weights=True)
    state0 = algorithm.init(jax.random.PRNGKey(0))
    state, _ = build_train_round(algorithm, mesh, seed=0)(replicate(state0, mesh),
                                                          shard_batch(next(pipeline.iterator(1))["batch"], mesh))
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
    return flat(state.params) - flat(state0.params)


def test_clip_and_noise_compose_around_fedprox():
    source = InMemorySource([30, 12, 50, 7], input_shape=(3, 2, 1), num_classes=3, seed=1)
    model = get_model("logistic", (3, 2, 1), 3)
    prox = fs.FedProx(model, optax.sgd(0.5), optax.sgd(1.0), proximal_weight=0.1)
    # The same chain as the registered dp_fedavg over base fedprox.
    chain = fs.Aggregated(prox, [fs.Clip(0.01), fs.GaussianNoise(0.8, denominator=4.0)])
    registered = build_algorithm("dp_fedavg", model, optax.sgd(0.5), optax.sgd(1.0), clip_norm=0.01,
                                 noise_multiplier=0.8, denominator=4.0, base="fedprox",
                                 base_options={"proximal_weight": 0.1})
    noised = one_round(chain, source, 4)
    np.testing.assert_array_equal(noised, one_round(registered, source, 4))
    # Without noise: a huge C and D = the 4 clients give FedProx's uniform mean; a small C bounds the move.
    plain = one_round(prox, source, 4)
    unclipped = one_round(fs.Aggregated(prox, [fs.Clip(1e6), fs.GaussianNoise(0.0, denominator=4.0)]), source, 4)
    np.testing.assert_allclose(unclipped, plain, rtol=1e-5, atol=1e-7)
    clipped = one_round(fs.Aggregated(prox, [fs.Clip(0.01), fs.GaussianNoise(0.0, denominator=4.0)]), source, 4)
    assert np.linalg.norm(clipped) <= 0.01 + 1e-7 < np.linalg.norm(plain)
    assert not np.allclose(noised, clipped)  # z = 0.8 adds noise
    # Clip alone (no DP): the base's weights, no noise, no empty-round update.
    robust = fs.Aggregated(prox, [fs.Clip(0.01)])
    assert not robust.updates_on_empty_rounds and robust.privacy_accounting() is None
    assert np.linalg.norm(one_round(robust, source, 4)) <= 0.01 + 1e-7


def test_chains_that_break_the_bound_are_refused():
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    fedavg = fs.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0))
    noise = fs.GaussianNoise(1.0, denominator=3.0)
    with pytest.raises(ValueError, match="needs a Clip before it"):
        fs.Aggregated(fedavg, [noise])
    with pytest.raises(ValueError, match="needs a Clip before it"):
        fs.Aggregated(fedavg, [noise, fs.Clip(1.0)])
    with pytest.raises(ValueError, match="Compress must come before Clip"):
        fs.Aggregated(fedavg, [fs.Clip(1.0), fs.Compress(fs.make_codec("drive")), noise])
    with pytest.raises(ValueError, match="prepass"):
        fs.Aggregated(fs.Mime(model, optax.sgd(0.1), optax.sgd(1.0), server_learning_rate=1.0), [fs.Clip(1.0), noise])
    with pytest.raises(ValueError, match="adaptive clipping needs DP"):
        fs.Aggregated(fedavg, [fs.Clip(1.0, adaptive=True)])
    with pytest.raises(ValueError, match="at most one Clip"):
        fs.Aggregated(fedavg, [fs.Clip(1.0), fs.Clip(2.0), noise])
    with pytest.raises(ValueError, match="do not nest"):
        fs.Aggregated(fs.Aggregated(fedavg, [fs.Clip(1.0)]), [fs.Clip(2.0)])
    with pytest.raises(ValueError, match="clip norm > 0"):
        fs.Clip(0.0)
    # Clip before a codec is fine without noise (no DP bound to keep).
    fs.Aggregated(fedavg, [fs.Clip(1.0), fs.Compress(fs.make_codec("drive"))])


def test_the_simulation_owns_the_ledger_of_a_hand_built_chain(tmp_path):
    clients = {str(i): rt.source().get_client("train", i) for i in range(len(rt.SIZES)) if rt.SIZES[i]}
    data = fs.InMemoryDataset({"train": clients, "test": clients})
    model = get_model("logistic", rt.INPUT_SHAPE, rt.NUM_CLASSES)
    population = sum(1 for n in rt.SIZES if n)
    mechanism = DPMechanism(1.0, "uniform", population, cohort_size=4)

    lines = []

    def simulation(noise_multiplier):
        noise = fs.GaussianNoise(noise_multiplier, denominator=4.0, mechanism=mechanism.with_noise(noise_multiplier),
                                 target_delta=1e-3)
        chain = fs.Aggregated(fs.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0)), [fs.Clip(0.5), noise])
        return fs.Simulation(data, chain, clients_per_round=4, batch_size=5, workdir=tmp_path / "run",
                             log=lines.append)

    simulation(1.0).run(2)
    assert any(line.startswith("DP-FedAvg: clip C=0.5, noise multiplier z=1, denominator D=4, uniform sampling")
               for line in lines)
    rows = [r for r in train_records(tmp_path / "run") if r["kind"] == "train"]
    assert [r["dp_delta"] for r in rows] == [1e-3, 1e-3] and 0 < rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"]
    assert all("dp_clipped_fraction" in r and "bits_sent" in r for r in rows)
    resumed = simulation(1.0)
    assert resumed.rounds_done == 2 and resumed._ledger.rounds == 2  # restored from the checkpoint's meta
    resumed.close()
    with pytest.raises(ConfigError, match="noise_multiplier") as refused:  # another chain is refused on resume
        simulation(2.0).run(3)
    assert "algorithm.options.stages" in str(refused.value)
