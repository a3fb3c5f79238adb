"""One federated round (and one evaluation pass) as sharded XLA programs.

The round is a `jax.shard_map` (`per_device`) over a one-dimensional `('clients',)` mesh of
all devices. Each device runs `lanes` clients at a time in lockstep (a `vmap`;
one lane runs plainly) and scans over its clients by rank (see
`fedstream.data.packed`): a client starts from the server model, runs a
`fori_loop` over exactly its own steps, each step's batch gathered on the
device from the client's stored examples by the step's index row, and adds its
contribution (its `weighted` part times its weight; see
`fedstream.algorithms.base`) to its lane's running `RoundTotal`. Padding
steps are never executed and no per-step branch touches the model.

A round is one or more chunk calls that carry the lanes' running sums; after
the last, the sums are added over lanes, `psum`-ed over devices, and the
server update runs once, replicated. A round of one chunk is one program.

Per-step dropout keys are `fold_in(fold_in(fold_in(key(seed), round),
client), step)`: a function of the client and its step only, never of the
device or lane it happens to run on.
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


MAX_AUTO_LANES = 16


def resolve_lanes(lanes: int | str, mesh: jax.sharding.Mesh, param_bytes: int = 0) -> int:
    """Clients per device run in lockstep: an int >= 1, or 'auto'.

    'auto' is 1 on CPU, where a `vmap` over lanes measured slower than running
    the clients one after another (docs/performance.md). On a GPU or TPU it
    is the most lanes (up to `MAX_AUTO_LANES`) whose model copies (parameters,
    gradients, optimizer and server state: 8 x `param_bytes` each) take at
    most a quarter of the device's memory; 8 when the memory is unknown.
    """
    if isinstance(lanes, str):
        if lanes != "auto":
            raise ValueError(f"lanes must be a positive integer or 'auto', got {lanes!r}")
        device = mesh.devices.flat[0]
        if device.platform == "cpu":
            return 1
        from fedstream.training.limits import device_memory_bytes

        memory = device_memory_bytes(device)
        if not memory or not param_bytes:
            return 8
        return int(np.clip(memory // 4 // (8 * param_bytes), 1, MAX_AUTO_LANES))
    if isinstance(lanes, bool) or int(lanes) != lanes or lanes < 1:
        raise ValueError(f"lanes must be a positive integer or 'auto', got {lanes!r}")
    return int(lanes)


def per_device(fn: Callable[..., Any], mesh: jax.sharding.Mesh, args: str, out: str) -> Callable[..., Any]:
    """`fn` run on every device of `mesh` at once (`jax.shard_map` over the 'clients' axis): the one layout of
    every program here (the round's init, chunk and finish, evaluation, personalized evaluation).

    `args` and `out` spell each argument's and each output's placement, one
    letter each: 's' split by device (a leading `[devices, ...]` axis, each
    device sees its `[1, ...]` part), 'r' replicated (the same on every
    device). A single-letter `out` is one output, not a tuple.
    """
    spec = {"s": P(AXIS), "r": P()}
    outs = spec[out] if len(out) == 1 else tuple(spec[c] for c in out)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec[c] for c in args), out_specs=outs)


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


def gather_step(examples: Mapping[str, jax.Array], index: jax.Array, lane: Any, step: jax.Array) -> dict[str, Any]:
    """One step's batch of one lane: its `index` row gathered from the lane's stored examples, plus `mask`.

    `examples` leaves are a device's `[1, lanes, E, ...]` block and `index` its
    `[1, lanes, S, batch]` positions (-1: padding), read in place (slicing the
    block first would copy it every call).
    """
    positions = index[0, lane, step]
    safe = jnp.maximum(positions, 0)
    return {**{name: v[0, lane, safe] for name, v in examples.items()}, "mask": positions >= 0}


def _by_rank(fn: Callable[..., Any], lanes: int, carry: Any, xs: Any) -> tuple[Any, Any]:
    """Scans client ranks k, running `fn(carry_lane, lane, xs_lane_k) -> (carry_lane, y)` on every lane at once.

    `carry` leaves are `[lanes, ...]`, `xs` leaves `[lanes, slots, ...]`; the
    lanes run in lockstep (`vmap`; one lane runs plainly). Returns the carry
    and the ys as `[lanes, slots, ...]`.
    """
    by_rank = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), xs)
    if lanes == 1:
        def body(c, x):
            c, y = fn(jax.tree.map(lambda a: a[0], c), 0, jax.tree.map(lambda a: a[0], x))
            return jax.tree.map(lambda a: a[None], c), jax.tree.map(lambda a: a[None], y)
    else:
        def body(c, x):
            return jax.vmap(fn)(c, jnp.arange(lanes), x)
    carry, ys = jax.lax.scan(body, carry, by_rank)
    return carry, jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), ys)


class TrainRound:
    """A federated round as calls over chunks of its clients (see `fedstream.data.packed`).

    `init(state, batch, client_states)` -> a zero carry (each lane's running
    sums); `chunk(state, carry, batch, client_states)` -> `(carry,
    new_client_states)`; `finish(state, carry)` -> `(new_state, stats)`.
    Calling the object runs a round of one chunk as one program:
    `round(state, batch[, client_states]) -> (new_state, stats[, new_client_states])`.
    A round cut into chunks gives exactly the result of the same round in one
    call (each lane adds its clients in the same order).
    """

    def __init__(self, init: Callable[..., Any], chunk: Callable[..., Any], finish: Callable[..., Any],
                 whole: Callable[..., Any]) -> None:
        self.init, self.chunk, self.finish, self._whole = init, chunk, finish, whole

    def __call__(self, state: ServerState, batch: Mapping[str, jax.Array], client_states: Any = None) -> Any:
        new_state, stats, new_states = self._whole(state, batch, client_states)
        return (new_state, stats) if client_states is None else (new_state, stats, new_states)

    def lower(self, state: ServerState, batch: Mapping[str, Any], client_states: Any = None) -> Any:
        """The one-call round lowered for these (possibly abstract) arguments (to compile ahead of time)."""
        return self._whole.lower(state, batch, client_states)

    def _cache_size(self) -> int:
        """Compiled programs of the one-call round (benchmarks count shapes with it)."""
        return self._whole._cache_size()


def build_train_round(algorithm: Algorithm, mesh: jax.sharding.Mesh, seed: int, lanes: int = 1) -> TrainRound:
    """The compiled, sharded round of `algorithm` over `mesh` (see `TrainRound`), `lanes` clients per device at once.

    A chunk's `batch` comes from `CohortPipeline` (`[devices, lanes, ...]`
    leaves); `client_states` (for algorithms with per-client state) has leaves
    `[devices, lanes, slots, ...]` in the batch's slot order. `stats` holds the
    psum-ed clu train metrics (`metrics`), the total client weight (`weight`)
    and the round's summed `Contribution.metrics` (`logs`, for
    `algorithm.log_values`); clients whose update was not finite are left out
    and counted in `nonfinite_clients` (`nonfinite_client`: one of them, by
    index, or -1). One compilation per chunk shape.
    """

    def split(batch: Mapping[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array, dict[str, jax.Array]]:
        examples = {k: v for k, v in batch.items() if k != "index" and not k.startswith("slot_")}
        slots = {k: v[0] for k, v in batch.items() if k.startswith("slot_")}  # [lanes, slots]
        return examples, batch["index"], slots

    def device_parts(state: ServerState, batch: Mapping[str, jax.Array], stored: Any):
        """Shared by the carry's template and the chunk: the broadcast and the prepass (one-chunk rounds only)."""
        examples, index, slots = split(batch)
        batch_size = index.shape[3]
        # Without this pcast, gradients of the replicated params would be silently
        # psum-ed across devices (see docs/notes.md, 'shard_map and varying types').
        broadcast = varying(algorithm.broadcast(state))
        prepass = None
        if algorithm.uses_prepass:
            template = jax.eval_shape(algorithm.prepass_step, broadcast, gather_step(examples, index, 0, 0))
            zeros = varying(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), template))

            def prepass_client(total, lane, slot):
                def run(_):
                    def body(t, acc):
                        step = gather_step(examples, index, lane, slot["slot_offset"] + t)
                        first_epoch = t * batch_size + jnp.arange(batch_size) < slot["slot_examples"]
                        part = algorithm.prepass_step(broadcast, {**step, "mask": step["mask"] & first_epoch})
                        return varying(jax.tree.map(jnp.add, acc, part))

                    steps = jnp.minimum(slot["slot_steps"], -(-slot["slot_examples"] // batch_size))
                    return jax.lax.fori_loop(0, steps, body, zeros)

                own = jax.lax.cond(slot["slot_steps"] > 0, run, lambda _: zeros, None)
                return varying(jax.tree.map(jnp.add, total, own)), own

            lane_zeros = jax.tree.map(lambda a: jnp.broadcast_to(a, (lanes, *a.shape)), zeros)
            total, prepass = _by_rank(prepass_client, lanes, lane_zeros, slots)
            total = jax.tree.map(lambda a: a.sum(0), total)
            broadcast = varying(algorithm.after_prepass(broadcast, jax.lax.psum(total, AXIS)))
        return examples, index, slots, broadcast, prepass

    def carry_template(state: ServerState, batch: Mapping[str, jax.Array], stored: Any) -> Any:
        _, _, slots, broadcast, prepass = device_parts(state, batch, stored)
        one = lambda tree: jax.tree.map(lambda a: a[0, 0], tree)  # noqa: E731 - lane 0, slot 0
        if algorithm.per_client_broadcast:
            broadcast = algorithm.client_broadcast(broadcast, one(slots))
        sums = jax.eval_shape(lambda: client_total(algorithm.client_contribution(
            algorithm.client_init(broadcast, one(jax.tree.map(lambda a: a[0], stored)), one(prepass)), broadcast,
            jnp.float32(1), one(jax.tree.map(lambda a: a[0], stored)), one(prepass), jax.random.PRNGKey(0))[0],
            jnp.float32(1)))
        return sums

    def device_init(state, batch, stored):
        sums = carry_template(state, batch, stored)
        bad = {"count": jnp.zeros((), jnp.int32), "client": jnp.full((), -1, jnp.int32)}
        zero = (jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums), TrainMetrics.empty(), bad)
        return varying(jax.tree.map(lambda a: jnp.broadcast_to(a, (1, lanes, *jnp.shape(a))), zero))

    def device_chunk(state, carry, batch, stored):
        examples, index, slots, broadcast, prepass = device_parts(state, batch, stored)
        stored = jax.tree.map(lambda a: a[0], stored)  # [lanes, slots, ...]
        carry = jax.tree.map(lambda a: a[0], carry)  # [lanes, ...]
        # Varying like the client ids it is folded with (under the lanes' vmap, fold_in needs both alike).
        round_index = varying(state.round)

        def run_client(carry, lane, xs):
            slot, stored_i, prepass_i = xs

            def train(carry):
                sums, metrics, bad = carry
                # FedBuff: the client's own view (the model version it started from); others: the broadcast
                mine = varying(algorithm.client_broadcast(broadcast, slot)) if algorithm.per_client_broadcast \
                    else broadcast

                def local_step(t, inner):
                    client, metrics = inner
                    key = step_key(seed, round_index, slot["slot_client"], t)
                    client, step_metrics = algorithm.client_step(
                        client, gather_step(examples, index, lane, slot["slot_offset"] + t), key, mine)
                    return varying((client, metrics.merge(step_metrics)))

                start = varying((algorithm.client_init(mine, stored_i, prepass_i), TrainMetrics.empty()))
                client, client_metrics = jax.lax.fori_loop(0, slot["slot_steps"], local_step, start)
                contribution, new_stored = algorithm.client_contribution(
                    client, mine, slot["slot_weight"], stored_i, prepass_i,
                    client_key(seed, round_index, slot["slot_client"]))
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

        carry, new_stored = _by_rank(run_client, lanes, carry, (slots, stored, prepass))
        return jax.tree.map(lambda a: a[None], carry), jax.tree.map(lambda a: a[None], new_stored)

    def device_finish(carry):
        sums, metrics, bad = jax.tree.map(lambda a: a[0], carry)  # [lanes, ...]
        sums, metrics = jax.tree.map(lambda a: a.sum(0), (sums, metrics))
        sums, metrics = jax.lax.psum((sums, metrics), AXIS)
        bad = {"count": jax.lax.psum(bad["count"].sum(), AXIS), "client": jax.lax.pmax(bad["client"].max(), AXIS)}
        return sums, metrics, bad

    init = per_device(device_init, mesh, args="rss", out="s")
    chunk = per_device(device_chunk, mesh, args="rsss", out="ss")
    reduce = per_device(device_finish, mesh, args="s", out="rrr")

    def finish(state: ServerState, carry: Any) -> tuple[ServerState, dict[str, Any]]:
        sums, metrics, bad = reduce(carry)
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
        return new_state, stats

    def whole(state, batch, client_states):
        carry, new_states = chunk(state, init(state, batch, client_states), batch, client_states)
        return (*finish(state, carry), new_states)

    if algorithm.uses_prepass:
        def chunk_guard(*_: Any) -> Any:
            raise ValueError(f"{type(algorithm).__name__} runs a prepass over the whole round before training; "
                             "its rounds run as one call (CohortPipeline chunk_bytes=0)")
        chunk_fn: Callable[..., Any] = chunk_guard
    else:
        chunk_fn = jax.jit(chunk)
    return TrainRound(jax.jit(init), chunk_fn, jax.jit(finish), jax.jit(whole))


def build_debug_round(
    algorithm: Algorithm, seed: int
) -> Callable[..., tuple[ServerState, dict[str, Any]] | tuple[ServerState, dict[str, Any], Any]]:
    """The round of `build_train_round`, run eagerly: clients one at a time, steps in a Python loop.

    Nothing is compiled (`jax.disable_jit`), so `print`, `float(x)` and `pdb`
    work inside an algorithm's hooks (`client_step`, `client_contribution`,
    `server_update`, ...). Same inputs (a round of one chunk) and outputs as
    the compiled round, and the same keys, steps and weights; results agree
    with it to float rounding (clients are summed in another order). Slow:
    for finding bugs, not for runs.
    """

    def debug_round(state: ServerState, batch: Mapping[str, Any], client_states: Any = None):
        with jax.disable_jit():
            host = {k: np.asarray(v) for k, v in batch.items()}
            examples = {k: v for k, v in host.items() if k != "index" and not k.startswith("slot_")}
            index = host["index"]
            stored_all = jax.tree.map(np.asarray, client_states)
            batch_size = index.shape[3]
            rows, lanes, slots = host["slot_steps"].shape
            clients = [(d, lane, j) for d in range(rows) for lane in range(lanes) for j in range(slots)
                       if host["slot_steps"][d, lane, j] > 0]

            def step_batch(d: int, lane: int, step: int) -> dict[str, jax.Array]:
                positions = index[d, lane, step]
                out = {k: jnp.asarray(v[d, lane][np.maximum(positions, 0)]) for k, v in examples.items()}
                return {**out, "mask": jnp.asarray(positions >= 0)}

            def stored_of(d: int, lane: int, j: int) -> Any:
                return jax.tree.map(lambda a: jnp.asarray(a[d, lane, j]), stored_all)

            broadcast = algorithm.broadcast(state)
            prepass: dict[tuple[int, int, int], Any] = {}
            if algorithm.uses_prepass:
                total = None
                for d, lane, j in clients:
                    own = None
                    examples_used = int(host["slot_examples"][d, lane, j])
                    steps = min(int(host["slot_steps"][d, lane, j]), -(-examples_used // batch_size))
                    for t in range(steps):
                        step = step_batch(d, lane, int(host["slot_offset"][d, lane, j]) + t)
                        first_epoch = t * batch_size + jnp.arange(batch_size) < examples_used
                        part = algorithm.prepass_step(broadcast, {**step, "mask": step["mask"] & first_epoch})
                        own = part if own is None else jax.tree.map(jnp.add, own, part)
                    prepass[d, lane, j] = own
                    total = own if total is None else jax.tree.map(jnp.add, total, own)
                broadcast = algorithm.after_prepass(broadcast, total)
            sums, metrics = None, TrainMetrics.empty()
            bad_count, bad_client = 0, -1
            new_stored = stored_all
            for d, lane, j in clients:
                client_id = int(host["slot_client"][d, lane, j])
                stored_i = stored_of(d, lane, j)
                mine = broadcast
                if algorithm.per_client_broadcast:
                    mine = algorithm.client_broadcast(broadcast, {k: jnp.asarray(v[d, lane, j]) for k, v in host.items()
                                                                  if k.startswith("slot_")})
                client = algorithm.client_init(mine, stored_i, prepass.get((d, lane, j)))
                client_metrics = TrainMetrics.empty()
                for t in range(int(host["slot_steps"][d, lane, j])):
                    key = step_key(seed, state.round, jnp.int32(client_id), jnp.int32(t))
                    client, step_metrics = algorithm.client_step(
                        client, step_batch(d, lane, int(host["slot_offset"][d, lane, j]) + t), key, mine)
                    client_metrics = client_metrics.merge(step_metrics)
                weight = jnp.float32(host["slot_weight"][d, lane, j])
                contribution, stored_out = algorithm.client_contribution(
                    client, mine, weight, stored_i, prepass.get((d, lane, j)),
                    client_key(seed, state.round, jnp.int32(client_id)))
                contribution = client_total(contribution, weight)
                if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(contribution)):
                    bad_count, bad_client = bad_count + 1, max(bad_client, client_id)
                    continue  # left out of the round, its stored state unchanged (as in the compiled round)
                sums = contribution if sums is None else jax.tree.map(jnp.add, sums, contribution)
                metrics = metrics.merge(client_metrics)
                if new_stored is not None:
                    new_stored = jax.tree.map(lambda all_, one: _set(all_, (d, lane, j), one), new_stored, stored_out)
            if sums is None:  # no client trained: zeros shaped like a contribution
                d, lane, j = clients[0] if clients else (0, 0, 0)
                mine = broadcast if not algorithm.per_client_broadcast else algorithm.client_broadcast(
                    broadcast, {k: jnp.asarray(v[d, lane, j]) for k, v in host.items() if k.startswith("slot_")})
                shape = jax.eval_shape(lambda: client_total(algorithm.client_contribution(
                    algorithm.client_init(mine, stored_of(d, lane, j), None), mine, jnp.float32(1),
                    stored_of(d, lane, j), None, jax.random.PRNGKey(0))[0], jnp.float32(1)))
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


def _set(array: np.ndarray, where: tuple[int, ...], value: Any) -> np.ndarray:
    """A copy of `array` with the entry at `where` replaced by `value`."""
    out = np.array(array, copy=True)
    out[where] = np.asarray(value)
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

    sharded = per_device(device_eval, mesh, args="rs", out="r")
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
