"""FedBuff (Nguyen et al., AISTATS 2022) on the simulated clock, against independent NumPy references.

* The schedule (who starts when, from which model version, who arrives,
  who is dropped as too stale or lost offline, when the server steps) is
  checked step by step against an event-driven reference written here with
  plain lists: it shares with the library only the clock's functions (the
  device profile and availability, `fedstream.data.clock`) and the random
  stream a start draws its client from.
* The server steps are checked against plain-NumPy FedBuff on softmax
  regression: each arriving client trains from the version it started
  from, its delta is scaled by 1/sqrt(1 + staleness), the scaled deltas are
  averaged with the clients' weights and server SGD with momentum steps.
* On 1 and 4 devices the same run gives the same model; killed and resumed
  it gives bit for bit the same model and metrics.
"""

import dataclasses
import math

import jax
import numpy as np
import optax
import pytest

import fedstream as fs
from fedstream.config import ConfigError
from fedstream.data import async_schedule
from fedstream.data.async_schedule import AsyncSchedule
from fedstream.data.clock import Availability, ClockSettings, DeviceProfile
from fedstream.data.cohort import CohortPipeline
from fedstream.data.sampling import ClientBatching, client_example_order
from fedstream.training.rounds import build_train_round, make_mesh, shard_batch
from support import flatten_tree, softmax
from test_chunked_rounds import dataset
from test_fedavg_reference import NumpyServerOpt

SIZES = [0, 3, 17, 40, 2, 25, 9, 1, 60, 12, 33, 5, 21, 8, 14, 47, 6, 11, 29, 4]
QUIET = dict(log=lambda _: None)
PROFILE = DeviceProfile(seconds_per_example=0.2, speed_sigma=1.0, network_seconds=3.0, network_sigma=0.5)
# Clients are online 60% of a 300 s "day" (3 time zones): some go offline mid-job, and a few starts wait for a free
# client to come online (2 in the reference test's 60 steps).
DIURNAL = Availability("diurnal", day_seconds=300.0, available_fraction=0.6, time_zones=3)


DATA = dataset(SIZES)  # test_chunked_rounds' small image-shaped clients, with these sizes


# --- the schedule: an event-driven reference ---------------------------------------------------------------------

def reference_schedule(seed, work, concurrency, k, max_staleness, profile, availability, steps):
    """FedBuff's clock, event by event, with plain lists (see the module docstring of async_schedule)."""
    n = len(work)
    jobs = []  # [time, start index, kind, client, version]
    busy, buffer, out = set(), [], []
    counters = {"starts": 0, "stale": 0, "offline": 0}

    def start(now, version):
        index = counters["starts"]
        counters["starts"] += 1
        draw = np.random.default_rng([seed, index, async_schedule._START_STREAM])
        client = None
        for c in draw.integers(n, size=async_schedule._TRIES).tolist():  # rejection: uniform over qualifying ones
            if c not in busy and availability.available(seed, now, np.array([c]))[0]:
                client = c
                break
        free = [c for c in range(n) if c not in busy]
        online = [c for c in free if availability.available(seed, now, np.array([c]))[0]]
        if client is None and online:
            client = online[int(draw.integers(len(online)))]
        if client is None:
            wake = min((availability.next_available(seed, now, np.array([c]))[0] for c in free), default=math.inf)
            if math.isfinite(wake):
                jobs.append([max(wake, now), index, "wake", None, None])
            return
        seconds = profile.durations(seed, index, np.array([client]), np.array([work[client]]))[0]
        offline = availability.available_until(seed, now, np.array([client]))[0]
        busy.add(client)
        if now + seconds <= offline:
            jobs.append([now + seconds, index, "arrive", client, version])
        else:
            jobs.append([offline, index, "lost", client, version])

    for _ in range(concurrency):
        start(0.0, 0)
    version = 0
    while len(out) < steps:
        job = min(jobs, key=lambda j: (j[0], j[1]))
        jobs.remove(job)
        now, _, kind, client, started = job
        if kind == "wake":
            start(now, version)
        elif kind == "lost" or version - started > max_staleness:
            busy.discard(client)
            counters["offline" if kind == "lost" else "stale"] += 1
            start(now, version)
        else:
            buffer.append((client, started))
            if len(buffer) == k:
                out.append({"clients": [c for c, _ in buffer], "versions": [v for _, v in buffer], "time": now,
                            "stale": counters["stale"], "offline": counters["offline"]})
                for c, _ in buffer:
                    busy.discard(c)
                buffer = []
                counters["stale"] = counters["offline"] = 0
                version += 1
            start(now, version)
    return out


def test_schedule_matches_event_driven_reference():
    work = np.array(SIZES, np.float64)  # examples per job
    schedule = AsyncSchedule(7, work, concurrency=8, buffer_size=3, max_staleness=2, profile=PROFILE,
                             availability=DIURNAL)
    reference = reference_schedule(7, work, 8, 3, 2, PROFILE, DIURNAL, steps=60)
    for t, want in enumerate(reference):
        got = schedule.step(t)
        assert got.clients.tolist() == want["clients"], t
        assert got.versions.tolist() == want["versions"], t
        assert got.time == want["time"], t
        assert (got.dropped_stale, got.dropped_offline) == (want["stale"], want["offline"]), t
        assert len(set(want["clients"])) == 3  # a client's update waits in the buffer: never twice in a step
    # the horizon exercises every rule: staleness > 0, stale drops, clients lost offline
    assert max(t - min(r["versions"]) for t, r in enumerate(reference)) > 0
    assert sum(r["stale"] for r in reference) > 0 and sum(r["offline"] for r in reference) > 0
    metrics = schedule.metrics(10)
    assert metrics["simulated_time"] == reference[10]["time"]
    assert metrics["staleness_max"] == 10 - min(reference[10]["versions"]) <= 2


def test_schedule_is_a_function_of_its_inputs_and_refuses_bad_options():
    work = np.array(SIZES, np.float64)  # examples per job
    a = AsyncSchedule(1, work, 6, 2, 3, PROFILE, DIURNAL)
    later = [a.step(t) for t in range(30)]
    b = AsyncSchedule(1, work, 6, 2, 3, PROFILE, DIURNAL)
    assert b.step(29).time == later[29].time  # replayed from the start on demand (resume)
    assert [b.step(t).clients.tolist() for t in range(30)] == [s.clients.tolist() for s in later]
    with pytest.raises(ValueError, match="concurrency"):
        AsyncSchedule(1, work, len(SIZES) + 1, 2, 3, PROFILE, DIURNAL)
    with pytest.raises(ValueError, match="clients_per_round"):
        AsyncSchedule(1, work, 6, 0, 3, PROFILE, DIURNAL)
    with pytest.raises(ValueError, match="no free client"):  # 15 in flight + 6 waiting > 20 clients
        AsyncSchedule(1, work, 15, 7, 3, PROFILE, DIURNAL)


# --- the server steps: a NumPy reference on softmax regression -------------------------------------------------

def reference_fedbuff(schedule, *, seed, steps, batching, client_lr, server, exponent, w0, b0):
    """Plain-NumPy FedBuff: each update trains from its start version, scaled by (1 + staleness)^-exponent."""
    sizes = DATA.client_sizes("train")
    versions = [np.concatenate([w0.ravel(), b0]).astype(np.float64)]
    shape = w0.shape
    for t in range(steps):
        step = schedule.step(t)
        deltas, weights = [], []
        for client, started in zip(step.clients.tolist(), step.versions.tolist()):
            n = int(sizes[client])
            if n == 0:
                continue
            theta = versions[started]
            W, b = theta[: w0.size].reshape(shape).copy(), theta[w0.size:].copy()
            data = DATA.get_client("train", client)
            x, y = data["x"].reshape(n, -1).astype(np.float64), data["y"]
            for batch in client_example_order(seed, t, client, n, batching).reshape(-1, batching.batch_size):
                idx = batch[batch >= 0]
                p = softmax(x[idx] @ W + b)
                p[np.arange(len(idx)), y[idx]] -= 1.0
                p /= len(idx)
                W -= client_lr * x[idx].T @ p
                b -= client_lr * p.sum(0)
            scale = (1.0 + t - started) ** -exponent
            deltas.append(scale * (np.concatenate([W.ravel(), b]) - theta))
            weights.append(batching.examples_used(n))
        weights = np.array(weights, np.float64)
        mean = (weights[:, None] * np.array(deltas)).sum(0) / weights.sum()
        versions.append(server.step(versions[-1], -mean))
    return versions


def fedbuff(**options):
    return fs.FedBuff(fs.get_model("logistic", (3, 2, 1), 4), optax.sgd(0.3), optax.sgd(0.8, momentum=0.9),
                   **{"concurrency": 8, "max_staleness": 2, **options})


def simulate(algorithm, *, devices=1, rounds=6, **kw):
    sim = fs.Simulation(DATA, algorithm, clients_per_round=3, batch_size=4, seed=5, num_devices=devices,
                        clock=kw.pop("clock", None), **kw, **QUIET)
    rows = [m["train"] for m in sim.rounds(rounds)]
    sim.close()
    return sim, rows


CLOCK = ClockSettings(PROFILE, DIURNAL)


def test_server_steps_match_numpy_reference_on_one_device():
    """The packed round of each server step (the cohort pipeline fed by the schedule) against NumPy FedBuff."""
    algorithm = fedbuff()
    batching = ClientBatching(16)  # 1 to 4 local steps per client; 3 compiled shapes over the 6 steps
    pipeline = CohortPipeline(DATA, "train", ("x", "y"), seed=5, cohort_size=3, batching=batching, num_devices=1,
                              data_threads=0, chunk_bytes=0)
    schedule = AsyncSchedule(5, pipeline.client_work, 8, 3, 2, PROFILE, DIURNAL)
    pipeline = dataclasses.replace(pipeline, schedule=schedule)
    mesh = make_mesh(1)
    round_fn = build_train_round(algorithm, mesh, seed=5)
    state = algorithm.init(jax.random.PRNGKey(5))
    init = state.params["Dense_0"]
    steps = 6
    iterator = pipeline.iterator(steps)
    for _ in range(steps):
        element = next(iterator)
        assert element["batch"]["slot_version"].max() >= 0
        state, _ = round_fn(state, shard_batch(element["batch"], mesh))
    versions = reference_fedbuff(schedule, seed=5, steps=steps, batching=batching, client_lr=0.3,
                                 server=NumpyServerOpt("sgd", 0.8, momentum=0.9), exponent=0.5,
                                 w0=np.asarray(init["kernel"]), b0=np.asarray(init["bias"]))
    got = state.params["Dense_0"]
    kernel_size = np.asarray(init["kernel"]).size
    np.testing.assert_allclose(np.asarray(got["kernel"]).ravel(), versions[-1][:kernel_size], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got["bias"]), versions[-1][kernel_size:], rtol=2e-4, atol=2e-5)
    # the ring holds the last max_staleness + 1 versions at their slots (version mod 3)
    ring = np.asarray(state.extra["versions"]["Dense_0"]["bias"])
    for v in (4, 5, 6):
        np.testing.assert_allclose(ring[v % 3], versions[v][kernel_size:], rtol=2e-4, atol=2e-5)
    assert max(schedule.metrics(t)["staleness_max"] for t in range(steps)) > 0  # stale updates were scaled
    assert np.abs(versions[-1] - versions[0]).max() > 1e-2  # the model moved


@pytest.mark.slow
def test_same_model_on_four_devices():
    one, rows_one = simulate(fedbuff(), clock=CLOCK)
    four, rows_four = simulate(fedbuff(), devices=4, clock=CLOCK)
    a, b = dict(flatten_tree(jax.device_get(one.state.params))), dict(flatten_tree(jax.device_get(four.state.params)))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
    assert [r["simulated_time"] for r in rows_one] == [r["simulated_time"] for r in rows_four] == \
        [one.schedule.step(t).time for t in range(6)]
    assert [r["staleness_max"] for r in rows_one] == [int((t - one.schedule.step(t).versions).max()) for t in range(6)]
    assert [r["clients"] for r in rows_one] == [r["clients"] for r in rows_four]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical_and_a_changed_clock_is_refused(tmp_path):
    whole, rows = simulate(fedbuff(), rounds=6, workdir=tmp_path / "whole", clock=CLOCK)
    simulate(fedbuff(), rounds=3, workdir=tmp_path / "cut", clock=CLOCK)
    resumed, later = simulate(fedbuff(), rounds=6, workdir=tmp_path / "cut", clock=CLOCK)
    a, b = jax.tree.leaves(jax.device_get(whole.state)), jax.tree.leaves(jax.device_get(resumed.state))
    assert len(a) == len(b) > 3  # params, the server momentum, the ring of versions, the round
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    timing = ("seconds", "per_second")
    assert [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows[3:]] == \
        [{k: v for k, v in r.items() if not k.endswith(timing)} for r in later]
    faster = ClockSettings(DeviceProfile(seconds_per_example=0.1, network_seconds=3.0), DIURNAL)
    with pytest.raises(ConfigError, match="clock"):
        simulate(fedbuff(), rounds=7, workdir=tmp_path / "cut", clock=faster)


def test_bad_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="clock.over_selection"):
        fs.Simulation(DATA, fedbuff(), clients_per_round=3, clock=ClockSettings(over_selection=1.3), **QUIET)
    with pytest.raises(ConfigError, match="algorithm.options.concurrency"):
        fs.Simulation(DATA, fedbuff(concurrency=len(SIZES) + 1), clients_per_round=3, **QUIET)
    with pytest.raises(ValueError, match="algorithm.options.max_staleness"):
        fedbuff(max_staleness=-1)


@pytest.mark.slow
def test_debug_round_gives_each_client_its_start_version():
    """The eager debug round (client by client) agrees with the compiled one to float rounding."""
    compiled, _ = simulate(fedbuff(), rounds=3, clock=CLOCK)
    eager, _ = simulate(fedbuff(), rounds=3, clock=CLOCK, debug=True)
    for x, y in zip(jax.tree.leaves(jax.device_get(compiled.state)), jax.tree.leaves(jax.device_get(eager.state))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6)
