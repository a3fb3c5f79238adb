"""Per-round Orbax checkpoints of a run: server state plus JSON metadata.

A checkpoint step `k` holds the server state after `k` completed rounds
(params, optimizer state, round counter) and a JSON item with the resolved
config, the data iterator's position and the run's seed. Saves are
asynchronous; a step becomes visible only after Orbax's atomic rename, so a
process killed mid-save leaves a temporary directory that is ignored on
restart (see docs/notes.md, 'Orbax: a step is committed by an atomic rename').

Integrity: every save records the sha256 of the state's bytes (and of the
client-store index) in the JSON item; a restore recomputes it, so bytes
altered after writing are refused (`CheckpointCorrupted`, naming the step's
directory) instead of silently training on. `quarantine` moves such a step out
of the way so a run can resume from the newest intact one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedstream.config import ConfigError, flatten

# Config keys that may change when a run resumes: they do not change the
# trained model (num_rounds extends or shortens a run).
RESUMABLE_KEYS = ("num_rounds", "data_threads", "chunk_mb", "checkpoint.", "eval.")


INTEGRITY_KEY = "integrity"
QUARANTINE_DIR = "corrupted_checkpoints"


class CheckpointCorrupted(RuntimeError):
    """A checkpoint step cannot be read back, or its bytes do not match the digest recorded at save time."""

    def __init__(self, step: int, path: pathlib.Path, why: str) -> None:
        super().__init__(f"checkpoint of round {step} ({path}) is corrupted: {why}")
        self.step, self.path, self.why = step, path, why


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, file too large, permissions); the previous ones are intact."""


def _write_reason(e: BaseException) -> str:
    """The OS reason of a failed write in a few words (Orbax/TensorStore messages run to several lines)."""
    text = str(e)
    match = re.search(r"os_error_code='?(\d+)", text)
    if match:
        code = int(match.group(1))
        return f"{os.strerror(code)} (errno {code})"
    if isinstance(e, OSError) and e.errno:
        return f"{os.strerror(e.errno)} (errno {e.errno})"
    return _first_line(e)


def _host_array(leaf: Any) -> np.ndarray:
    """A leaf's value on the host; in a multi-process run the local copy of a replicated array."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(np.asarray(leaf))


def tree_digest(tree: Any) -> str:
    """sha256 over a pytree's leaf paths, dtypes, shapes and bytes (equal trees give equal digests)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = _host_array(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class RunCheckpointer:
    """An Orbax CheckpointManager for one workdir (`<workdir>/checkpoints`)."""

    def __init__(self, workdir: str | pathlib.Path, *, every: int = 1, keep: int = 3) -> None:
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        if jax.process_index() == 0 and self.directory.is_dir():
            # Saves that never committed (killed, disk full). Orbax's own clean-up of them raced with the
            # first save of the same step after a failed one (FileNotFoundError in its rmtree).
            for leftover in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
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

    def step_path(self, step: int) -> pathlib.Path:
        """The directory of a committed step."""
        return self.directory / str(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of a checkpoint (cheap: does not load the state)."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(restored["meta"])
        except Exception as e:  # noqa: BLE001 - any failure to read it back means the bytes are bad
            raise CheckpointCorrupted(step, self.step_path(step) / "meta", _first_line(e)) from None
        if "config" not in meta or "round" not in meta:
            raise CheckpointCorrupted(step, self.step_path(step) / "meta", "the metadata lacks config or round")
        return meta

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores (state, meta) of `step`, with the structure of `like_state`, and checks the state's digest."""
        meta = self.read_meta(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            state = restored["state"]
            digest = tree_digest(state)
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorrupted(step, self.step_path(step) / "state", _first_line(e)) from None
        expected = meta.get(INTEGRITY_KEY, {}).get("state_sha256")
        if expected is not None and digest != expected:
            raise CheckpointCorrupted(step, self.step_path(step) / "state",
                                      "the state's sha256 differs from the one recorded when it was saved")
        return state, meta

    def restore_client_index(self, step: int) -> dict[str, np.ndarray]:
        """The client-state store's index saved with `step` (see `ClientStateStore`), digest-checked."""
        path = self.step_path(step) / "client_store"
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(client_store=ocp.args.StandardRestore()))
            index = {k: np.asarray(v) for k, v in restored["client_store"].items()}
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorrupted(step, path, _first_line(e)) from None
        expected = self.read_meta(step).get(INTEGRITY_KEY, {}).get("client_store_sha256")
        if expected is not None and tree_digest(index) != expected:
            raise CheckpointCorrupted(step, path, "the client-store index's sha256 differs from the saved one")
        return index

    def verify(self, step: int, like_state: Any, *, client_store: bool = False) -> None:
        """Raises CheckpointCorrupted unless `step` reads back with the digests recorded at save time."""
        self.restore(step, like_state)
        if client_store:
            self.restore_client_index(step)

    def quarantine(self, step: int) -> pathlib.Path:
        """Moves a (corrupted) step out of the checkpoint directory; returns where it went."""
        self.manager.wait_until_finished()
        target = self.directory.parent / QUARANTINE_DIR / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.step_path(step)), str(target))
        self.manager.reload()
        return target

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints on disk."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False,
             client_index: Mapping[str, np.ndarray] | None = None) -> bool:
        """Starts an asynchronous save of `step` if the interval says so (or `force`).

        `client_index` (for algorithms with per-client state) is saved with it.
        """
        if not (force or self.manager.should_save(step)):
            return False
        integrity = {"state_sha256": tree_digest(state)}
        if client_index is not None:
            integrity["client_store_sha256"] = tree_digest(dict(client_index))
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({**dict(meta), INTEGRITY_KEY: integrity})}
        if client_index is not None:
            items["client_store"] = ocp.args.StandardSave(dict(client_index))
        with self._write_errors(step):
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _write_errors(self, step: int | None = None) -> Iterator[None]:
        """Turns a failed (possibly earlier, asynchronous) save into one CheckpointWriteError line."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax re-raises the writer thread's error as it was
            latest = self.manager.latest_step()
            kept = f"the checkpoint of round {latest} is intact" if latest is not None else "no checkpoint was saved"
            when = f" (noticed when saving round {step})" if step is not None else ""
            raise CheckpointWriteError(f"could not write a checkpoint in {self.directory}{when}: {_write_reason(e)}; "
                                       f"{kept}; free space and rerun the same command to resume") from None

    def wait(self) -> None:
        """Blocks until pending saves are committed."""
        with self._write_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager (also after a failed save)."""
        try:
            self.wait()
        finally:
            self.manager.close()


RESUME_HINT = "use a new --workdir (only num_rounds, data_threads, eval.* and checkpoint.* may change on resume)"


def check_config_unchanged(saved: Mapping[str, Any], current: Mapping[str, Any], workdir: str | os.PathLike, *,
                           hint: str = RESUME_HINT) -> None:
    """Refuses a config that differs from the run's (`saved`) in a key that changes results (not `RESUMABLE_KEYS`).

    Raises ConfigError naming the first such key, with both values, followed
    by `hint` (what to do instead). A key the run's config lacks because it
    was added to fedstream later counts as its default (`default_train_config`).
    """
    from fedstream.config import default_train_config

    old, new = flatten(dict(saved)), flatten(dict(current))
    defaults = flatten(default_train_config().to_dict())
    for key in sorted(set(old) | set(new)):
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_KEYS):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # e.g. model.input_key in a run saved before that key existed
        if old.get(key, "<missing>") != new.get(key, "<missing>"):
            raise ConfigError(
                f"config key {key!r} is {new.get(key, '<missing>')!r} but the run in {workdir} was started with "
                f"{old.get(key, '<missing>')!r}; {hint}")
