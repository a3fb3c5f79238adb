"""One federated round (and one evaluation pass) as a single jitted program.

The round is a `jax.shard_map` over a one-dimensional `('clients',)` mesh of
all devices. Each device scans over its client slots (see
`fedstream.data.cohort`): a client starts from the server model, runs a
`fori_loop` over exactly its own steps, read from the device's packed step
stream, and adds its contribution (its `weighted` part times its weight;
see `fedstream.algorithms.base`) to the device's running `RoundTotal`. Padding
steps are never executed and no per-step branch touches the model. The sums
are `psum`-ed over devices and the server update runs once, replicated.

Per-step dropout keys are `fold_in(fold_in(fold_in(key(seed), round),
client), step)`: a function of the client and its step only, never of the
device it happens to run on.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedstream.algorithms.base import Algorithm, ServerState, client_total
from fedstream.models import TrainMetrics

AXIS = "clients"
# Per-client sums of an evaluation: `Model.example_scores` plus the example count.
EVAL_SUMS = ("loss", "loss_count", "correct", "accuracy_count", "count")


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A `('clients',)` mesh over the first `num_devices` devices (default: all).

    Axis type Auto: see docs/notes.md, 'Mesh axis type Auto', for why Explicit does not work here.
    """
    devices = jax.devices()[: num_devices or jax.device_count()]
    return jax.sharding.Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def local_device_positions(mesh: jax.sharding.Mesh) -> tuple[int, ...]:
    """Positions on the mesh of this process's devices (all of them in a single-process run)."""
    me = jax.process_index()
    return tuple(i for i, d in enumerate(mesh.devices.flat) if d.process_index == me)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Puts this process's rows of a round batch onto its devices, as global `[devices, ...]` arrays.

    `batch` holds one row per local device, in mesh order (see
    `local_device_positions`); in a single-process run that is every device.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    if jax.process_count() == 1:
        return jax.tree.map(lambda v: jax.device_put(v, sharding), batch)
    devices = mesh.devices.flat
    positions = local_device_positions(mesh)
    out = {}
    for k, v in batch.items():
        if v.shape[0] != len(positions):
            raise ValueError(f"batch leaf {k!r} has {v.shape[0]} rows for {len(positions)} local devices")
        shards = [jax.device_put(v[i:i + 1], devices[p]) for i, p in enumerate(positions)]
        out[k] = jax.make_array_from_single_device_arrays((mesh.size, *v.shape[1:]), sharding, shards)
    return out


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places a pytree (e.g. the server state) replicated on every device of `mesh`.

    The round returns its state this way; giving it the same placement on
    the first call avoids one extra compilation. Every process must pass the
    same values.
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf: Any) -> jax.Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def step_key(seed: int, round_index: jax.Array, client: jax.Array, step: jax.Array) -> jax.Array:
    """The dropout key of one client step: a function of (seed, round, client, step)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), round_index)
    return jax.random.fold_in(jax.random.fold_in(key, client), step)


def varying(tree: Any) -> Any:
    """Marks the device-invariant leaves of `tree` as per-device values (inside `shard_map` over `AXIS`).

    Inside shard_map every value is typed as varying over devices or not, and
    both branches of a `lax.cond` must agree (constants such as clu's
    reduction counter are invariant); a replicated input that is
    differentiated must be varying too. See docs/notes.md, 'shard_map and
    varying types'.
    """

    def cast(leaf: jax.Array) -> jax.Array:
        return leaf if AXIS in jax.typeof(leaf).manual_axis_type.varying else jax.lax.pcast(leaf, AXIS, to="varying")

    return jax.tree.map(cast, tree)


def client_key(seed: int, round_index: jax.Array, client: jax.Array) -> jax.Array:
    """A client's key for its update (e.g. quantization noise), apart from its step keys."""
    return jax.random.fold_in(step_key(seed, round_index, client, 0), 1 << 30)


def server_key(seed: int, round_index: jax.Array) -> jax.Array:
    """The server's key of a round (e.g. DP noise): a stream apart from every client's."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), round_index), (1 << 31) + 7)


def stream_step(stream: Mapping[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
    """One step's batch from a device's packed stream (leaves `[1, L, ...]`, indexed in place)."""
    return {k: jax.lax.dynamic_index_in_dim(v, index, axis=1, keepdims=False)[0] for k, v in stream.items()}


def build_train_round(
    algorithm: Algorithm, mesh: jax.sharding.Mesh, seed: int
) -> Callable[..., tuple[ServerState, dict[str, jax.Array]] | tuple[ServerState, dict[str, jax.Array], Any]]:
    """Returns `round(state, batch[, client_states]) -> (new_state, stats[, new_client_states])`, jitted and sharded.

    `batch` comes from `CohortPipeline` (leaves `[devices, steps, ...]`);
    `client_states` (for algorithms with per-client state) has leaves
    `[devices, slots, ...]` in the batch's slot order. `stats` holds the
    psum-ed clu train metrics (`metrics`), the total client weight
    (`weight`) and the round's summed `Contribution.metrics` (`logs`, for
    `algorithm.log_values`); clients whose update was not finite are left
    out and counted in `nonfinite_clients` (`nonfinite_client`: one of them,
    by index, or -1). One compilation per stream length.
    """

    def device_round(state: ServerState, batch: Mapping[str, jax.Array], stored: Any):
        # This device's part. The stream keeps its leading axis of 1: taking
        # `a[0]` of it would copy the whole packed stream every round.
        stream = {k: v for k, v in batch.items() if not k.startswith("slot_")}
        slots = {k: v[0] for k, v in batch.items() if k.startswith("slot_")}
        stored = jax.tree.map(lambda a: a[0], stored)
        batch_size = stream["mask"].shape[2]
        # Without this pcast, gradients of the replicated params would be silently
        # psum-ed across devices (see docs/notes.md, 'shard_map and varying types').
        broadcast = varying(algorithm.broadcast(state))

        prepass = None
        if algorithm.uses_prepass:
            template = jax.eval_shape(algorithm.prepass_step, broadcast, stream_step(stream, 0))
            zeros = varying(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), template))

            def prepass_client(total, slot):
                def run(_):
                    def body(t, acc):
                        step = stream_step(stream, slot["slot_offset"] + t)
                        first_epoch = t * batch_size + jnp.arange(batch_size) < slot["slot_examples"]
                        part = algorithm.prepass_step(broadcast, {**step, "mask": step["mask"] & first_epoch})
                        return varying(jax.tree.map(jnp.add, acc, part))

                    steps = jnp.minimum(slot["slot_steps"], -(-slot["slot_examples"] // batch_size))
                    return jax.lax.fori_loop(0, steps, body, zeros)

                own = jax.lax.cond(slot["slot_steps"] > 0, run, lambda _: zeros, None)
                return varying(jax.tree.map(jnp.add, total, own)), own

            total, prepass = jax.lax.scan(prepass_client, zeros, slots)
            broadcast = varying(algorithm.after_prepass(broadcast, jax.lax.psum(total, AXIS)))

        def run_client(carry, xs):
            slot, stored_i, prepass_i = xs

            def train(carry):
                sums, metrics, bad = carry

                def local_step(t, inner):
                    client, metrics = inner
                    key = step_key(seed, state.round, slot["slot_client"], t)
                    client, step_metrics = algorithm.client_step(
                        client, stream_step(stream, slot["slot_offset"] + t), key, broadcast)
                    return varying((client, metrics.merge(step_metrics)))

                start = varying((algorithm.client_init(broadcast, stored_i, prepass_i), TrainMetrics.empty()))
                client, client_metrics = jax.lax.fori_loop(0, slot["slot_steps"], local_step, start)
                contribution, new_stored = algorithm.client_contribution(
                    client, broadcast, slot["slot_weight"], stored_i, prepass_i,
                    client_key(seed, state.round, slot["slot_client"]))
                contribution = client_total(contribution, slot["slot_weight"])  # weighted x p_i, p_i, summed, ...
                # A client whose update is not finite (NaN/Inf) is left out of the round, its stored
                # state unchanged, and counted; the train loop applies the run's policy.
                finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(contribution)]))
                keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
                sums = keep(jax.tree.map(jnp.add, sums, contribution), sums)
                metrics = keep(metrics.merge(client_metrics), metrics)
                bad = {"count": bad["count"] + jnp.where(finite, 0, 1),
                       "client": jnp.where(finite | (bad["client"] >= 0), bad["client"], slot["slot_client"])}
                return varying(((sums, metrics, bad), keep(new_stored, stored_i)))

            return jax.lax.cond(slot["slot_steps"] > 0, train, lambda c: varying((c, stored_i)), carry)

        sums_shape = jax.eval_shape(
            lambda: client_total(algorithm.client_contribution(
                algorithm.client_init(broadcast, jax.tree.map(lambda a: a[0], stored),
                                      jax.tree.map(lambda a: a[0], prepass)),
                broadcast, jnp.float32(1), jax.tree.map(lambda a: a[0], stored), jax.tree.map(lambda a: a[0], prepass),
                jax.random.PRNGKey(0))[0], jnp.float32(1)))
        no_bad = {"count": jnp.zeros((), jnp.int32), "client": jnp.full((), -1, jnp.int32)}
        init = varying((jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums_shape), TrainMetrics.empty(),
                         no_bad))
        (sums, metrics, bad), new_stored = jax.lax.scan(run_client, init, (slots, stored, prepass))
        sums, metrics = jax.lax.psum((sums, metrics), AXIS)
        bad = {"count": jax.lax.psum(bad["count"], AXIS), "client": jax.lax.pmax(bad["client"], AXIS)}
        return sums, metrics, bad, jax.tree.map(lambda a: a[None], new_stored)

    sharded = jax.shard_map(device_round, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                            out_specs=(P(), P(), P(), P(AXIS)))

    @jax.jit
    def train_round(state: ServerState, batch: Mapping[str, jax.Array], client_states: Any = None):
        sums, metrics, bad, new_states = sharded(state, batch, client_states)
        # A round in which every sampled client was empty leaves the server as is.
        skipped = state.replace(round=state.round + 1)
        key = server_key(seed, state.round)
        if algorithm.updates_on_empty_rounds:  # DP: noise / D even when no client trained
            new_state = algorithm.server_update(state, sums, key)
        else:
            new_state = jax.lax.cond(sums.weight > 0, lambda: algorithm.server_update(state, sums, key),
                                     lambda: skipped)
        stats = {"metrics": metrics, "weight": sums.weight, "nonfinite_clients": bad["count"],
                 "nonfinite_client": bad["client"], "logs": sums.metrics}  # the summed Contribution.metrics
        return (new_state, stats) if client_states is None else (new_state, stats, new_states)

    return train_round


def build_debug_round(
    algorithm: Algorithm, seed: int
) -> Callable[..., tuple[ServerState, dict[str, Any]] | tuple[ServerState, dict[str, Any], Any]]:
    """The round of `build_train_round`, run eagerly: clients one at a time, steps in a Python loop.

    Nothing is compiled (`jax.disable_jit`), so `print`, `float(x)` and `pdb`
    work inside an algorithm's hooks (`client_step`, `client_contribution`,
    `server_update`, ...). Same inputs and outputs as the compiled round, and
    the same keys, steps and weights; results agree with it to float rounding
    (clients are summed in another order). Slow: for finding bugs, not for runs.
    """

    def debug_round(state: ServerState, batch: Mapping[str, Any], client_states: Any = None):
        with jax.disable_jit():
            host = {k: np.asarray(v) for k, v in batch.items()}
            stream = {k: v for k, v in host.items() if not k.startswith("slot_")}
            stored_all = jax.tree.map(np.asarray, client_states)
            batch_size = stream["mask"].shape[2]
            devices, slots = host["slot_steps"].shape
            clients = [(d, j) for d in range(devices) for j in range(slots) if host["slot_steps"][d, j] > 0]

            def step_batch(d: int, index: int) -> dict[str, jax.Array]:
                return {k: jnp.asarray(v[d, index]) for k, v in stream.items()}

            def stored_of(d: int, j: int) -> Any:
                return jax.tree.map(lambda a: jnp.asarray(a[d, j]), stored_all)

            broadcast = algorithm.broadcast(state)
            prepass: dict[tuple[int, int], Any] = {}
            if algorithm.uses_prepass:
                total = None
                for d, j in clients:
                    own = None
                    steps = min(int(host["slot_steps"][d, j]), -(-int(host["slot_examples"][d, j]) // batch_size))
                    for t in range(steps):
                        step = step_batch(d, int(host["slot_offset"][d, j]) + t)
                        first_epoch = t * batch_size + jnp.arange(batch_size) < int(host["slot_examples"][d, j])
                        part = algorithm.prepass_step(broadcast, {**step, "mask": step["mask"] & first_epoch})
                        own = part if own is None else jax.tree.map(jnp.add, own, part)
                    prepass[d, j] = own
                    total = own if total is None else jax.tree.map(jnp.add, total, own)
                broadcast = algorithm.after_prepass(broadcast, total)
            sums, metrics = None, TrainMetrics.empty()
            bad_count, bad_client = 0, -1
            new_stored = stored_all
            for d, j in clients:
                client_id = int(host["slot_client"][d, j])
                stored_i = stored_of(d, j)
                client = algorithm.client_init(broadcast, stored_i, prepass.get((d, j)))
                client_metrics = TrainMetrics.empty()
                for t in range(int(host["slot_steps"][d, j])):
                    key = step_key(seed, state.round, jnp.int32(client_id), jnp.int32(t))
                    client, step_metrics = algorithm.client_step(
                        client, step_batch(d, int(host["slot_offset"][d, j]) + t), key, broadcast)
                    client_metrics = client_metrics.merge(step_metrics)
                weight = jnp.float32(host["slot_weight"][d, j])
                contribution, stored_out = algorithm.client_contribution(
                    client, broadcast, weight, stored_i, prepass.get((d, j)),
                    client_key(seed, state.round, jnp.int32(client_id)))
                contribution = client_total(contribution, weight)
                if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(contribution)):
                    bad_count, bad_client = bad_count + 1, max(bad_client, client_id)
                    continue  # left out of the round, its stored state unchanged (as in the compiled round)
                sums = contribution if sums is None else jax.tree.map(jnp.add, sums, contribution)
                metrics = metrics.merge(client_metrics)
                if new_stored is not None:
                    new_stored = jax.tree.map(lambda all_, one: _set(all_, d, j, one), new_stored, stored_out)
            if sums is None:  # no client trained: zeros shaped like a contribution
                d, j = clients[0] if clients else (0, 0)
                shape = jax.eval_shape(lambda: client_total(algorithm.client_contribution(
                    algorithm.client_init(broadcast, stored_of(d, j), None), broadcast, jnp.float32(1),
                    stored_of(d, j), None, jax.random.PRNGKey(0))[0], jnp.float32(1)))
                sums = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shape)
            key = server_key(seed, state.round)
            if algorithm.updates_on_empty_rounds or float(sums.weight) > 0:
                new_state = algorithm.server_update(state, sums, key)
            else:
                new_state = state.replace(round=state.round + 1)
            stats = {"metrics": metrics, "weight": sums.weight, "nonfinite_clients": jnp.int32(bad_count),
                     "nonfinite_client": jnp.int32(bad_client), "logs": sums.metrics}
        if client_states is None:
            return new_state, stats
        return new_state, stats, new_stored

    return debug_round


def _set(array: np.ndarray, d: int, j: int, value: Any) -> np.ndarray:
    """A copy of `array` with row [d, j] replaced by `value`."""
    out = np.array(array, copy=True)
    out[d, j] = np.asarray(value)
    return out


def build_eval(
    algorithm: Algorithm, mesh: jax.sharding.Mesh, num_slots: int
) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
    """Returns `evaluate(params, batch) -> per-client sums` for `EvalPipeline` chunks.

    The result holds `[num_slots]` arrays (per client of the chunk) of
    `EVAL_SUMS`, from which `summarize_eval` forms example-weighted (for
    sequence models: token-weighted) and client-averaged loss and accuracy.
    """
    model = algorithm.model

    def device_eval(params, batch):
        batch = jax.tree.map(lambda a: a[0], batch)
        params = varying(params)
        zeros = varying({key: jnp.zeros((num_slots,), jnp.float32) for key in EVAL_SUMS})

        def step(acc, s):
            def score(acc):
                logits = model.apply(params, s[model.input_key])
                w = s["mask"].astype(jnp.float32)
                scores = {**model.example_scores(logits, s[model.label_key]), "count": jnp.ones_like(w)}
                slot = s["slot"]
                return {key: acc[key].at[slot].add(jnp.sum(scores[key] * w)) for key in EVAL_SUMS}

            return jax.lax.cond(jnp.any(s["mask"]), score, lambda a: a, acc), None

        sums, _ = jax.lax.scan(step, zeros, batch)
        return jax.lax.psum(sums, AXIS)

    sharded = jax.shard_map(device_eval, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())
    return jax.jit(sharded)


def summarize_eval(per_client: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Pooled and client-averaged loss/accuracy from per-client sums (see `EVAL_SUMS`).

    Pooled numbers weight every scored target equally (an example for a
    classifier, a token for a sequence model). Clients without scored
    targets count in neither average.
    """
    sums = {key: np.asarray(per_client[key], np.float64) for key in EVAL_SUMS}
    has_loss, has_acc = sums["loss_count"] > 0, sums["accuracy_count"] > 0

    def client_mean(total: str, count: str, has: np.ndarray) -> float:
        return float(np.mean(sums[total][has] / sums[count][has])) if has.any() else float("nan")

    return {
        "loss": float(sums["loss"].sum() / max(sums["loss_count"].sum(), 1.0)),
        "accuracy": float(sums["correct"].sum() / max(sums["accuracy_count"].sum(), 1.0)),
        "client_mean_loss": client_mean("loss", "loss_count", has_loss),
        "client_mean_accuracy": client_mean("correct", "accuracy_count", has_acc),
        "num_clients": int((sums["count"] > 0).sum()),
        "num_examples": int(sums["count"].sum()),
    }
