"""Personalized evaluation: "FedAvg + fine-tune", and per-client personal models (Ditto, APFL) from the client store.

For every client c of the test split, with w the server model:

    fine-tune (evaluate_finetuned, k = `steps`):
        theta_c <- w;  k times:  theta_c <- ClientOpt(theta_c, grad f_c(theta_c; b_t))   # fresh optimizer state
        where b_1..b_k are full batches of c's TRAIN examples (same client id in the train split), in the order
        client_example_order(seed, round_index, c_train, n, ...) (see PersonalizedEvalPipeline);
        f_c is the plain model loss (the mean cross-entropy over the batch's scored targets).
    personal (evaluate_personal):
        theta_c <- client c's personal model if it has one (it was sampled at least once), else w:
        Ditto's v_c from the store, APFL's alpha_c v_c + (1 - alpha_c) w (`Algorithm.personal_model`)
    then score theta_c on c's TEST examples and report `summarize_eval`'s pooled and client-mean loss/accuracy.

Test clients without train data (or with no train client of the same id)
are scored with w, unfine-tuned; their number is reported
(`finetuned_clients_without_train_data`), as is the number of test clients
scored with w because they have no personal model
(`personal_clients_on_global_model`).

The computation is one jitted `shard_map` per chunk, like
`rounds.build_eval`: each device scans over its client slots; a slot runs
its fine-tuning steps from the device's train stream (a `fori_loop` over
exactly its own steps), then its test steps, and adds the sums to its
position of the chunk; sums are psum-ed over devices. Devices handle
different clients. Fine-tuning keys are the training ones,
`step_key(seed, round_index, train client, t)`, so dropout is reproducible.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedstream.algorithms.base import Algorithm
from fedstream.data.augment import get_augmentation
from fedstream.data.cohort import PersonalizedEvalPipeline, auto_data_threads
from fedstream.training.client_store import ClientStateStore
from fedstream.training.rounds import (AXIS, EVAL_SUMS, local_device_positions, per_device, shard_batch, step_key,
                                       stream_step, summarize_eval, varying)

PersonalizedEvalFn = Callable[..., dict[str, jax.Array]]


def build_personalized_eval(algorithm: Algorithm, mesh: jax.sharding.Mesh, num_slots: int,
                            seed: int) -> PersonalizedEvalFn:
    """Returns `evaluate(params, batch, round_index, personal=None) -> per-client sums`, jitted and sharded.

    `batch` comes from `PersonalizedEvalPipeline` (leaves `[devices, ...]`);
    `personal`, if given, is a params pytree with leaves `[devices, slots, ...]`
    used instead of `params` for slots whose `batch["slot_personal"]` is
    True. The result holds `[num_slots]` arrays of `EVAL_SUMS` (per client of
    the chunk), as `rounds.build_eval`'s. One compilation per shape (stream
    lengths and slots are bucketed).
    """
    model = algorithm.model
    optimizer = algorithm.client_optimizer

    def finetune_loss(params: Any, step: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
        loss, _ = Algorithm.client_loss(algorithm, params, step, key, None)
        return loss

    def device_eval(params, batch, round_index, personal):
        test = {k: v for k, v in batch.items() if k in (model.input_key, model.label_key, "mask")}
        train = {k[len("train_"):]: v for k, v in batch.items() if k.startswith("train_")}
        slots = {k: v[0] for k, v in batch.items() if k.startswith("slot_")}
        personal = None if personal is None else jax.tree.map(lambda a: a[0], personal)
        params = varying(params)
        zeros = varying({key: jnp.zeros((num_slots,), jnp.float32) for key in EVAL_SUMS})
        client_zeros = varying({key: jnp.zeros((), jnp.float32) for key in EVAL_SUMS})

        def run_slot(acc, xs):
            slot, personal_i = xs

            def run(acc):
                start = params
                if personal_i is not None:
                    start = jax.tree.map(lambda v, w: jnp.where(slot["slot_personal"], v.astype(w.dtype), w),
                                         personal_i, params)

                def finetune_step(t, carry):
                    theta, opt_state = carry
                    step = stream_step(train, slot["slot_train_offset"] + t)
                    grads = jax.grad(finetune_loss)(theta, step, step_key(seed, round_index, slot["slot_client"], t))
                    updates, opt_state = optimizer.update(grads, opt_state, theta)
                    return varying((optax.apply_updates(theta, updates), opt_state))

                theta, _ = jax.lax.fori_loop(0, slot["slot_train_steps"], finetune_step,
                                             varying((start, optimizer.init(start))))

                def eval_step(t, sums):
                    s = stream_step(test, slot["slot_eval_offset"] + t)
                    logits = model.apply(theta, s[model.input_key])
                    w = s["mask"].astype(jnp.float32)
                    scores = {**model.example_scores(logits, s[model.label_key]), "count": jnp.ones_like(w)}
                    return {key: sums[key] + jnp.sum(scores[key] * w) for key in EVAL_SUMS}

                sums = jax.lax.fori_loop(0, slot["slot_eval_steps"], eval_step, client_zeros)
                return varying({key: acc[key].at[slot["slot_position"]].add(sums[key]) for key in EVAL_SUMS})

            return jax.lax.cond(slot["slot_eval_steps"] > 0, run, lambda a: a, acc), None

        sums, _ = jax.lax.scan(run_slot, zeros, (slots, personal))
        return jax.lax.psum(sums, AXIS)

    sharded = per_device(device_eval, mesh, args="rsrs", out="r")

    @jax.jit
    def evaluate(params: Any, batch: Mapping[str, jax.Array], round_index: jax.Array,
                 personal: Any = None) -> dict[str, jax.Array]:
        return sharded(params, batch, jnp.asarray(round_index, jnp.int32), personal)

    return evaluate


# Compiled evaluation functions by (algorithm, mesh, slots, seed), so that calling the evaluate_* functions
# every few rounds compiles once per shape. Values hold the objects, so ids are never reused while cached.
_CACHE: dict[tuple[int, int, int, int], tuple[Algorithm, jax.sharding.Mesh, PersonalizedEvalFn]] = {}


def cached_personalized_eval(algorithm: Algorithm, mesh: jax.sharding.Mesh, num_slots: int,
                             seed: int) -> PersonalizedEvalFn:
    """`build_personalized_eval`, built once per (algorithm, mesh, num_slots, seed) object."""
    key = (id(algorithm), id(mesh), int(num_slots), int(seed))
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not algorithm or hit[1] is not mesh:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        hit = (algorithm, mesh, build_personalized_eval(algorithm, mesh, num_slots, seed))
        _CACHE[key] = hit
    return hit[2]


def personalized_pipeline(algorithm: Algorithm, dataset: Any, config: ml_collections.ConfigDict,
                          mesh: jax.sharding.Mesh, steps: int, round_index: int) -> PersonalizedEvalPipeline:
    """The test split in `eval.chunk_clients` chunks, each client with `steps` fine-tuning steps (client config)."""
    local = local_device_positions(mesh) if jax.process_count() > 1 else None
    return PersonalizedEvalPipeline(
        dataset, config.data.train_split, config.data.test_split,
        (algorithm.model.input_key, algorithm.model.label_key),
        eval_batch_size=int(config.eval.batch_size), batch_size=int(config.client.batch_size),
        finetune_steps=int(steps), seed=int(config.seed), round_index=int(round_index), num_devices=mesh.size,
        chunk_clients=int(config.eval.chunk_clients), data_threads=auto_data_threads(int(config.data_threads)),
        local_devices=local, max_examples=int(config.client.get("max_examples", 0)),
        augment=get_augmentation(str(config.data.get("augment", ""))))


def _run(algorithm: Algorithm, params: Any, pipeline: PersonalizedEvalPipeline, mesh: jax.sharding.Mesh,
         eval_fn: PersonalizedEvalFn, round_index: int,
         store: ClientStateStore | None) -> tuple[dict[str, np.ndarray], int]:
    """Per-client sums over the test split, and the number of scored clients left on the global model."""
    sums: dict[str, list[np.ndarray]] = {key: [] for key in EVAL_SUMS}
    on_global = 0
    host_params = jax.device_get(params) if store is not None else None  # for models mixed with w (APFL)
    for part in pipeline.chunks():
        batch = part["batch"]
        personal = None
        if store is not None:
            v, has = algorithm.personal_model(store.read(part["slot_train_client"]), host_params)
            scored = part["slot_test_client"] >= 0
            use = np.asarray(has, bool) & (part["slot_train_client"] >= 0) & scored
            on_global += int((scored & ~use).sum())
            batch = {**batch, "slot_personal": use}
            personal = shard_batch(v, mesh)
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh), round_index, personal))
        for key in sums:
            sums[key].append(np.asarray(out[key])[: len(part["clients"])])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in sums.items()}, on_global


def evaluate_finetuned(algorithm: Algorithm, params: Any, dataset: Any, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh, steps: int, *, round_index: int = 0,
                       eval_fn: PersonalizedEvalFn | None = None) -> dict[str, float]:
    """"FedAvg + fine-tune": each test client scored after `steps` fine-tuning steps from `params` on its train data.

    Returns `summarize_eval`'s numbers with a `finetuned_` prefix, plus
    `finetuned_clients_without_train_data` (test clients with examples but
    no train data: scored with `params` as is) and `finetuned_steps`.
    `round_index` fixes the fine-tuning example order (the train loop
    passes the rounds done). `steps` = 0 equals `train.evaluate`.
    """
    pipeline = personalized_pipeline(algorithm, dataset, config, mesh, steps, round_index)
    eval_fn = eval_fn or cached_personalized_eval(algorithm, mesh, pipeline.chunk_clients, int(config.seed))
    sums, _ = _run(algorithm, params, pipeline, mesh, eval_fn, round_index, None)
    result = {f"finetuned_{k}": v for k, v in summarize_eval(sums).items()}
    result["finetuned_clients_without_train_data"] = int(((pipeline.sizes > 0) & ~pipeline.has_train_data).sum())
    result["finetuned_steps"] = int(steps)
    return result


def evaluate_personal(algorithm: Algorithm, params: Any, store: ClientStateStore, dataset: Any,
                      config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                      eval_fn: PersonalizedEvalFn | None = None) -> dict[str, float]:
    """Each test client scored with its personal model from `store` (Ditto's v_c, APFL's mix with `params`), or
    `params` if it has none.

    `algorithm.personal_model(stored, params) -> (params pytree, has_one)`
    reads the store's states (`params`: the global model, on the host); the
    store is indexed by train-split position and test clients are matched
    by id. Returns `summarize_eval`'s numbers with a
    `personal_` prefix, plus `personal_clients_on_global_model` (scored
    test clients never trained, or absent from the train split).
    """
    if not algorithm.has_personal_models:
        raise ValueError(f"{type(algorithm).__name__} keeps no personal models (has_personal_models is False)")
    pipeline = personalized_pipeline(algorithm, dataset, config, mesh, 0, 0)
    eval_fn = eval_fn or cached_personalized_eval(algorithm, mesh, pipeline.chunk_clients, int(config.seed))
    sums, on_global = _run(algorithm, params, pipeline, mesh, eval_fn, 0, store)
    result = {f"personal_{k}": v for k, v in summarize_eval(sums).items()}
    result["personal_clients_on_global_model"] = on_global
    return result
