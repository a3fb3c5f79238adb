"""The simulated clock: an independent event-driven reference, trace files, and runs on the clock.

The reference below re-derives every random draw from the documented seed
sequences (docs/simulated_clock.md) and replays each round as a queue of
events (finish, go offline, deadline) in time order, client by client in
plain Python; the implementation computes the same rounds vectorized.
"""

import heapq
import json
import math

import jax
import numpy as np
import optax
import pytest
from support import final_state, flatten_tree, train_records

import fedstream as fs
from fedstream.config import ConfigError, default_train_config, validate_train_config
from fedstream.data.clock import (
    Availability,
    ClockSettings,
    DeviceProfile,
    RoundClock,
    TraceError,
    client_normals,
    client_uniforms,
    load_trace,
    over_selected,
)

QUIET = {"log": lambda _: None}


# --- the reference ----------------------------------------------------------------------------------------------

class DiurnalReference:
    """Client c is online while (t + phase_c) mod day < fraction * day; phase_c from default_rng([seed, 13])."""

    def __init__(self, seed, n, day, fraction):
        self.phase = np.random.default_rng([seed, 13]).random(n) * day
        self.day, self.on = day, fraction * day

    def spell(self, c, t, arrived=False):
        """(online, when the spell ends, when the next one starts) at t; `arrived`: its spell starts at t."""
        if arrived:
            return True, t + self.on, t
        position = (t + self.phase[c]) % self.day
        if position < self.on:
            return True, t + self.on - position, t
        return False, t, t + self.day - position


class TraceReference:
    """Online intervals [start, end) per client id, repeating every `period`; unlisted clients never online."""

    def __init__(self, intervals, period):
        self.intervals, self.period = intervals, period

    def spell(self, c, t, arrived=False):
        spans = self.intervals.get(c, [])
        if not spans:
            return False, t, math.inf
        base = math.floor(t / self.period) * self.period
        # Walk the spans of this period and the next two: the first one holding t, else the first after t.
        unrolled = [(base + k * self.period + s, base + k * self.period + e) for k in range(3) for s, e in spans]
        for s, e in unrolled:
            if s <= t < e or (arrived and s == t):
                end = e
                for s2, e2 in unrolled:  # a spell running into the next period's first span continues
                    if s2 == end:
                        end = e2
                return True, (math.inf if end >= base + 2 * self.period else end), t
            if s > t:
                return False, t, s
        raise AssertionError("unreachable for a non-empty periodic trace")


def reference_rounds(seed, rounds, n, k, over, deadline, work, profile, availability):
    """[(start, sample_time, end, sampled, kept, offline, late, num_available)] per round, by events in time order."""
    if profile["distribution"] == "pareto":
        u = np.random.default_rng([seed, 11]).random(n)
        a = profile["shape"]
        slowness = (1.0 - u) ** (-1.0 / a) / 2.0 ** (1.0 / a)
    else:
        slowness = np.exp(profile["sigma"] * np.random.default_rng([seed, 11]).standard_normal(n))
    out, start = [], 0.0
    for r in range(rounds):
        t, arrived = start, set()
        online = [c for c in range(n) if availability.spell(c, t)[0]]
        if not online:  # wait for the first client to come online; those arriving then are online
            t = min(availability.spell(c, start)[2] for c in range(n))
            arrived = {c for c in range(n) if availability.spell(c, start)[2] == t}
            online = sorted(arrived)
        m = math.ceil(k * over - 1e-9)
        picks = np.random.default_rng([seed, r, 10]).choice(len(online), size=min(m, len(online)), replace=False)
        sampled = [online[i] for i in picks]
        network = profile["network"] * np.exp(profile["network_sigma"]
                                              * np.random.default_rng([seed, r, 12]).standard_normal(n))
        events = []  # (time, priority, client): at equal times a finish, then the deadline, then going offline
        for c in sampled:
            compute = work[c] * profile["seconds_per_example"] * slowness[c]
            heapq.heappush(events, (t + (compute + network[c]), 0, c))
            until = availability.spell(c, t, c in arrived)[1]
            if until < math.inf:
                heapq.heappush(events, (until, 2, c))
        if deadline:
            heapq.heappush(events, (t + deadline, 1, -1))
        pending, kept, offline, end = set(sampled), [], 0, t
        while events and pending:
            when, kind, c = heapq.heappop(events)
            if kind == 1:  # the deadline: whoever is still working is late
                end = when
                break
            if c not in pending:
                continue
            pending.discard(c)
            end = when
            if kind == 2:
                offline += 1
            else:
                kept.append(c)
                if len(kept) == k:
                    break
        out.append((start, t, end, sampled, kept, offline, len(sampled) - len(kept) - offline, len(online)))
        start = end
    return out


def assert_matches_reference(clock, reference):
    for r, (start, sample_time, end, sampled, kept, offline, late, available) in enumerate(reference):
        o = clock.outcome(r)
        where = f"round {r}"
        assert o.sampled.tolist() == sampled, where
        assert o.kept.tolist() == kept, where
        assert (o.dropped_offline, o.dropped_late, o.num_available) == (offline, late, available), where
        np.testing.assert_allclose([o.start_time, o.sample_time, o.end_time], [start, sample_time, end],
                                   rtol=1e-12, err_msg=where)
        assert o.duration == pytest.approx(end - start, rel=1e-9)


def random_trace(rng, clients, period):
    """A few random online intervals per client, nobody online in [0.7, 1) of the period (rounds wait there)."""
    intervals = {}
    for c in clients:
        cuts = np.sort(rng.choice(np.arange(1, 70), size=2 * int(rng.integers(1, 4)), replace=False)) * period / 100
        intervals[int(c)] = [(float(s), float(e)) for s, e in zip(cuts[::2], cuts[1::2])]
    intervals[int(clients[0])].append((0.0, 0.05 * period))  # one client online across the period's start
    intervals[int(clients[0])].append((0.95 * period, period))
    return {c: sorted(v) for c, v in intervals.items()}


@pytest.mark.parametrize("distribution", ["lognormal", "pareto"])
def test_diurnal_rounds_match_the_event_driven_reference(distribution):
    seed, n, k, over, deadline, rounds = 3, 40, 4, 1.5, 40.0, 60
    work = np.random.default_rng(7).integers(5, 60, n).astype(float)
    profile = DeviceProfile(seconds_per_example=0.5, speed_distribution=distribution, speed_sigma=0.8,
                            pareto_shape=1.5, network_seconds=5.0, network_sigma=0.5)
    availability = Availability("diurnal", day_seconds=600.0, available_fraction=0.4)
    clock = RoundClock(seed, work, k, over, deadline, profile, availability)
    reference = reference_rounds(seed, rounds, n, k, over, deadline, work,
                                 {"distribution": distribution, "sigma": 0.8, "shape": 1.5, "network": 5.0,
                                  "network_sigma": 0.5, "seconds_per_example": 0.5},
                                 DiurnalReference(seed, n, 600.0, 0.4))
    assert_matches_reference(clock, reference)
    # The set-up exercises every branch: clients going offline mid-round, late ones, short rounds.
    assert sum(r[5] for r in reference) > 0 and sum(r[6] for r in reference) > 0
    assert any(len(r[4]) < k for r in reference) and any(len(r[4]) == k for r in reference)


def test_trace_rounds_match_the_event_driven_reference(tmp_path):
    seed, n, k, over, deadline, rounds, period = 5, 30, 3, 2.0, 0.0, 60, 1000.0
    rng = np.random.default_rng(11)
    intervals = random_trace(rng, np.arange(0, n, 2)[:12], period)  # odd clients and a few more: never online
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"period": period, "clients": {str(c): v for c, v in intervals.items()}}))
    work = rng.integers(5, 40, n).astype(float)
    profile = DeviceProfile(seconds_per_example=2.0, network_seconds=10.0)
    clock = RoundClock(seed, work, k, over, deadline, profile, Availability("trace", trace=str(path)), 123.0)
    shifted = reference_rounds_from(seed, rounds, n, k, over, deadline, work, profile,
                                    TraceReference(intervals, period), 123.0)
    assert_matches_reference(clock, shifted)
    assert any(r[1] > r[0] for r in shifted), "no round waited for a client to come online"
    assert sum(r[5] for r in shifted) > 0, "no client went offline mid-round"
    assert all(set(r[3]) <= set(intervals) for r in shifted)


def reference_rounds_from(seed, rounds, n, k, over, deadline, work, profile, availability, start_time):
    """`reference_rounds` with round 0 starting at `start_time` (the clock's start, config key clock.start_time)."""
    shifted = ShiftedTime(availability, start_time)
    settings = {"distribution": profile.speed_distribution, "sigma": profile.speed_sigma,
                "shape": profile.pareto_shape, "network": profile.network_seconds,
                "network_sigma": profile.network_sigma, "seconds_per_example": profile.seconds_per_example}
    return [(start + start_time, t + start_time, end + start_time, *rest)
            for start, t, end, *rest in reference_rounds(seed, rounds, n, k, over, deadline, work, settings, shifted)]


class ShiftedTime:
    """An availability seen from a clock that started at `offset`."""

    def __init__(self, inner, offset):
        self.inner, self.offset = inner, offset

    def spell(self, c, t, arrived=False):
        online, until, following = self.inner.spell(c, t + self.offset, arrived)
        return online, until - self.offset, following - self.offset


# --- the clock's pieces -------------------------------------------------------------------------------------------

def test_draws_are_pure_in_seed_task_and_client():
    a = client_normals(0, 11, np.array([3, 5000]))
    assert a[0] == client_normals(0, 11, np.array([3]))[0]  # asked alone: the same (prefix of one draw)
    assert a[1] == np.random.default_rng([0, 11]).standard_normal(5001)[5000]
    assert client_uniforms(1, 13, np.array([7]))[0] != client_uniforms(2, 13, np.array([7]))[0]
    profile = DeviceProfile()
    both = profile.durations(0, 4, np.array([2, 9]), np.array([10.0, 20.0]))
    assert both[1] == profile.durations(0, 4, np.array([9]), np.array([20.0]))[0]
    assert both[1] != profile.durations(0, 5, np.array([9]), np.array([20.0]))[0]  # fresh network time per task
    assert over_selected(10, 1.3) == 13 and over_selected(10, 1.0) == 10 and over_selected(3, 1.01) == 4


def test_availability_spells_diurnal_and_periodic_trace(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("client,start,end\n0,0,10\n0,50,100\n1,20,30\n# a comment\n3,0,100\n")
    trace = Availability("trace", trace=str(path), trace_period=100.0)
    clients = np.arange(5)
    assert trace.available(0, 260.0, clients).tolist() == [True, False, False, True, False]
    assert trace.available_until(0, 260.0, clients).tolist() == [310.0, 260.0, 260.0, math.inf, 260.0]
    assert trace.next_available(0, 235.0, clients).tolist() == [250.0, 320.0, math.inf, 235.0, math.inf]
    cycle = Availability("trace", trace=str(path), trace_period=100.0, trace_assign="cycle")  # ids 0, 1, 3
    assert cycle.available(0, 25.0, np.array([4, 5])).tolist() == [True, True]  # rows 1 (id 1) and 2 (id 3)
    day = Availability("diurnal", day_seconds=100.0, available_fraction=0.25, time_zones=4)
    phases = day.phases(0, clients)
    assert set(phases.tolist()) <= {0.0, 25.0, 50.0, 75.0}
    online = day.available(0, 10.0, clients)
    assert online.tolist() == ((10.0 + phases) % 100.0 < 25.0).tolist()
    nxt = day.next_available(0, 10.0, clients)
    assert day.available(0, float(nxt.max()), clients[nxt == nxt.max()]).all()  # on time, despite round-off


BAD_TRACES = [
    ("t.json", '{"clients": {\n "0": [[0, 1]],\n "1": [[0, 2]\n}}', r"t\.json: line 4: not valid JSON"),
    ("t.json", '{"clients": {"0": [[0, 5], [3, 9]]}}', r"t\.json: client '0' interval 1: .*overlaps"),
    ("t.json", '{"clients": {"0": [[5, 5]]}}', r"client '0' interval 0: client 0: interval \(5, 5\) needs"),
    ("t.json", '{"period": 10, "clients": {"0": [[0, 11]]}}', r"ends at 11, after the trace's period 10"),
    ("t.json", '{"clients": {"x": [[0, 1]]}}', r"client 'x': client id 'x' is not an integer"),
    ("t.json", '{"clients": {"0": {"active": [1, 2], "inactive": [3]}}}', r'"active" and "inactive"'),
    ("t.json", '[1, 2]', r'expected an object with a "clients" object'),
    ("t.csv", "client,start,end\n0,0,1\n1,2\n", r"t\.csv: line 3: expected 3 fields"),
    ("t.csv", "0,0,1\n1,two,3\n", r"t\.csv: line 2: client 1: interval \('two', '3'\) is not two numbers"),
    ("t.csv", "0,0,1\n-4,2,3\n", r"t\.csv: line 2: client id -4 is negative"),
    ("t.csv", "client,start,end\n", r"t\.csv: no intervals"),
    ("t.txt", "0,0,1\n", r"must be a \.json or \.csv file"),
]


@pytest.mark.parametrize("name,text,message", BAD_TRACES)
def test_bad_trace_files_are_refused_naming_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=message) as e:
        load_trace(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_trace_formats_agree_and_config_errors_name_the_key(tmp_path):
    csv_path, json_path = tmp_path / "a.csv", tmp_path / "a.json"
    csv_path.write_text("7,10,20\n7,30,40\n2,0,5\n")
    json_path.write_text(json.dumps({"clients": {"7": {"active": [10, 30], "inactive": [20, 40]}, "2": [[0, 5]]}}))
    a, b = load_trace(csv_path), load_trace(json_path)
    for field in ("ids", "offsets", "starts", "ends"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    config = default_train_config()
    config.data.path = "unused"
    config.clock.enabled = True
    config.clock.availability = "trace"
    config.clock.trace = str(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match=r"missing\.csv: cannot read the availability trace"):
        validate_train_config(config)
    config.clock.trace = str(csv_path)
    validate_train_config(config)
    for key, value, message in (("clock.over_selection", 0.5, "clock.over_selection must be >= 1"),
                                ("clock.availability", "sometimes", "clock.availability"),
                                ("clock.deadline", -1.0, "clock.deadline"), ("sampling", "poisson", "'sampling'")):
        bad = config.copy_and_resolve_references()
        section, _, leaf = key.rpartition(".")
        (bad[section] if section else bad)[leaf] = value
        with pytest.raises(ConfigError, match=message):
            validate_train_config(bad)
    assert {k: v for k, v in ClockSettings().to_config().items() if k != "enabled"} == {
        k: v for k, v in default_train_config().clock.to_dict().items() if k != "enabled"}


# --- runs on the clock ----------------------------------------------------------------------------------------------

CLOCK = ClockSettings(DeviceProfile(seconds_per_example=0.05), Availability("diurnal", day_seconds=3600.0),
                      over_selection=1.5, deadline=12.0)


def clock_run(digits, clock=CLOCK, **kw):
    model = fs.get_model("mlp", (8, 8, 1), 10, hidden=(16,))
    algorithm = fs.FedAvg(model, optax.sgd(0.1), optax.sgd(1.0))
    return fs.Simulation(fs.FederatedDataset(digits), algorithm, clients_per_round=5, batch_size=16, clock=clock,
                         **QUIET, **kw)


def test_run_on_the_clock_trains_the_kept_clients_and_logs_the_clock(digits):
    sim = clock_run(digits, num_devices=1)
    work = sim.pipeline.client_work
    assert work.tolist() == sim.pipeline.sizes.tolist()  # one epoch, no caps: a client processes its examples
    clock = CLOCK.round_clock(0, work, 5)  # the clock alone, from the settings
    rows = [m["train"] for m in sim.rounds(3)]
    for r, row in enumerate(rows):
        o = clock.outcome(r)
        assert row["cohort_size"] == row["clients"] == len(o.kept)
        assert row["examples"] == int(work[o.kept].sum())
        assert (row["simulated_time"], row["simulated_round_seconds"]) == (o.end_time, o.duration)
        assert (row["clients_dropped"], row["clients_sampled"]) == (o.dropped, 8)
        assert (row["clients_dropped_offline"], row["clients_dropped_late"]) == (o.dropped_offline, o.dropped_late)
    assert any(row["clients_dropped"] for row in rows) and rows[-1]["simulated_time"] > rows[0]["simulated_time"]


@pytest.mark.slow
def test_run_on_the_clock_resumes_bit_identically_and_refuses_a_changed_trace(tmp_path, digits):
    trace = tmp_path / "trace.csv"
    trace.write_text(daily_trace(shift=0))
    settings = ClockSettings(DeviceProfile(seconds_per_example=0.05), Availability("trace", trace=str(trace),
                                                                                   trace_period=1000.0),
                             over_selection=1.5, deadline=12.0)
    clock_run(digits, workdir=tmp_path / "straight", num_devices=1, clock=settings).run(4)
    clock_run(digits, workdir=tmp_path / "resumed", num_devices=1, clock=settings).run(2)
    clock_run(digits, workdir=tmp_path / "resumed", num_devices=1, clock=settings).run(4)
    assert_bit_identical_train(tmp_path / "straight", tmp_path / "resumed", 4)
    trace.write_text(daily_trace(shift=3))  # edited since the run started
    with pytest.raises(ConfigError, match=r"simulated clock after round 4 is at .* recorded .*clock\.trace"):
        clock_run(digits, workdir=tmp_path / "resumed", num_devices=1, clock=settings).run(5)


def daily_trace(shift):
    """CSV: client c online for 600 of every 1000 s from (37 c + shift) mod 1000 on (split at the period's end)."""
    rows = []
    for c in range(100):
        start = (37 * c + shift) % 1000
        rows += [(c, start, min(start + 600, 1000))] + ([(c, 0, start - 400)] if start > 400 else [])
    return "".join(f"{c},{s},{e}\n" for c, s, e in rows)


def assert_bit_identical_train(a, b, rounds):
    """Both workdirs end at `rounds` with bit-identical states and the same train records (timings aside)."""
    step_a, state_a = final_state(a)
    step_b, state_b = final_state(b)
    assert step_a == step_b == rounds
    flat_a, flat_b = dict(flatten_tree(state_a)), dict(flatten_tree(state_b))
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        assert np.array_equal(np.asarray(value), np.asarray(flat_b[key])), key
    rows_a, rows_b = ([r for r in train_records(w) if r["kind"] == "train"] for w in (a, b))
    assert rows_a == rows_b and len(rows_a) == rounds and "simulated_time" in rows_a[-1]


@pytest.mark.slow
def test_run_on_the_clock_is_equal_on_1_and_4_devices(digits):
    """The same clock, cohorts and counts exactly; the model to float rounding (the cross-device sum's order)."""
    runs = []
    for devices in (1, 4):
        sim = clock_run(digits, num_devices=devices)
        rows = [m["train"] for m in sim.rounds(5)]
        runs.append((rows, jax.tree.leaves(jax.device_get(sim.params))))
    exact = ("simulated_time", "simulated_round_seconds", "clients_sampled", "clients_available", "clients_dropped",
             "clients_dropped_offline", "clients_dropped_late", "cohort_size", "clients", "examples", "steps")
    assert [{k: r[k] for k in exact} for r in runs[0][0]] == [{k: r[k] for k in exact} for r in runs[1][0]]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * max(float(np.abs(a).max()), 1e-6))


def test_plot_by_simulated_time(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fedstream.training import plot as plot_module

    figures, save = [], plot_module._save
    monkeypatch.setattr(plot_module, "_save", lambda figure, output, fmt: figures.append(figure) or save(
        figure, output, fmt))
    (tmp_path / "run").mkdir()
    times = [12.5, 30.0, 31.25]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r + 1, "kind": "train", "loss": 1.0 / (r + 1), "simulated_time": t}) + "\n"
        for r, t in enumerate(times)))
    plot_module.plot_runs([tmp_path / "run"], tmp_path / "p.png", metrics=["train/loss"], x="simulated_time")
    assert figures[0].axes[0].lines[0].get_xdata().tolist() == times
    assert figures[0].axes[0].get_xlabel().startswith("simulated time")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text('{"round": 1, "kind": "train", "loss": 1.0}\n')
    with pytest.raises(ConfigError, match="plain: its metrics have no simulated_time"):
        plot_module.plot_runs([tmp_path / "plain"], tmp_path / "q.png", x="simulated_time")
