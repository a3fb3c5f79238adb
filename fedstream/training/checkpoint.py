"""Per-round Orbax checkpoints of a run: server state plus JSON metadata.

A checkpoint step `k` holds the server state after `k` completed rounds
(params, optimizer state, round counter) and a JSON item with the resolved
config, the data iterator's position and the run's seed. Saves are
asynchronous; a step becomes visible only after Orbax's atomic rename, so a
process killed mid-save leaves a temporary directory that is ignored on
restart (STACK_NOTES §3).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedstream.config import ConfigError, flatten

# Config keys that may change when a run resumes: they do not change the
# trained model (num_rounds extends or shortens a run).
RESUMABLE_KEYS = ("num_rounds", "data_threads", "checkpoint.", "eval.")


class RunCheckpointer:
    """An Orbax CheckpointManager for one workdir (`<workdir>/checkpoints`)."""

    def __init__(self, workdir: str | pathlib.Path, *, every: int = 1, keep: int = 3) -> None:
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1),
            max_to_keep=max(int(keep), 1),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta", "client_store"))

    def latest_round(self) -> int | None:
        """Rounds completed by the latest complete checkpoint, or None."""
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of a checkpoint (cheap: does not load the state)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores (state, meta) of `step`, with the structure of `like_state`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_client_index(self, step: int) -> dict[str, np.ndarray]:
        """The client-state store's index saved with `step` (see `ClientStateStore`)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(client_store=ocp.args.StandardRestore()))
        return {k: np.asarray(v) for k, v in restored["client_store"].items()}

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints on disk."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False,
             client_index: Mapping[str, np.ndarray] | None = None) -> bool:
        """Starts an asynchronous save of `step` if the interval says so (or `force`).

        `client_index` (for algorithms with per-client state) is saved with it.
        """
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta))}
        if client_index is not None:
            items["client_store"] = ocp.args.StandardSave(dict(client_index))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Blocks until pending saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_config_unchanged(saved: Mapping[str, Any], current: Mapping[str, Any], workdir: str | pathlib.Path) -> None:
    """Refuses to resume when a config value that changes results differs.

    Raises ConfigError naming the first such key, with both values.
    """
    old, new = flatten(dict(saved)), flatten(dict(current))
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_KEYS or any(key.startswith(p) for p in RESUMABLE_KEYS if p.endswith(".")):
            continue
        if old.get(key, "<missing>") != new.get(key, "<missing>"):
            raise ConfigError(
                f"config key {key!r} is {new.get(key, '<missing>')!r} but the run in {workdir} was started with "
                f"{old.get(key, '<missing>')!r}; use a new --workdir (only num_rounds, data_threads, eval.* and "
                "checkpoint.* may change on resume)")
