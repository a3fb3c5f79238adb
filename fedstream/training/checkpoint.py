"""Per-round Orbax checkpoints of a run: server state plus JSON metadata.

A checkpoint step `k` holds the server state after `k` completed rounds
(params, optimizer state, round counter) and a JSON item with the resolved
config, the data iterator's position and the run's seed. Saves are
asynchronous; a step becomes visible only after Orbax's atomic rename, so a
process killed mid-save leaves a temporary directory that is ignored on
restart (see docs/notes.md, 'Orbax: a step is committed by an atomic rename').

Integrity: every save records the sha256 of the state's bytes, of the
client-store index and of each per-client state file the index refers to in
the JSON item, and seals the JSON item itself with `meta_sha256`: the sha256
of its canonical JSON (every key but that digest, the state's digest
included). A restore recomputes all of them, so bytes altered after writing,
anywhere in the step, are refused (`CheckpointCorrupted`, naming the step's
directory) instead of silently training on. A missing or renamed key cannot
turn the check off: a meta item carrying `checkpoint_format` (every one this
version writes) must have both digests, and one with any key an older
version never wrote is refused too. Only a meta item of an older version
(no `checkpoint_format`, only the keys older versions wrote) is accepted
without its own digest (`RunCheckpointer.legacy_steps`; the caller warns).
`quarantine` moves a refused step out of the way so a run can resume from the
newest intact one.

Saving never stalls the train loop: `RunCheckpointer.save` hands the step to
one saving thread and returns. That thread hashes the state (the digest goes
into the step's JSON item, so a committed step always carries it), waits for
Orbax's previous save (Orbax keeps one in flight and its `save` blocks on it)
and starts the step's Orbax save. The caller blocks only when two steps are
already waiting behind the one being written; a failed save is raised on the
caller's thread at its next `save` or `wait` (`CheckpointWriteError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import queue
import re
import shutil
import threading
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
CLIENT_STATE_DIR = "client_state"  # next to checkpoints/ (fedstream.training.client_store)

# The meta item's format: 2 = sealed by `meta_sha256` (absent in the meta items of older versions).
FORMAT_KEY = "checkpoint_format"
META_FORMAT = 2
# The only keys a meta item of an older version (no FORMAT_KEY) can hold; any other key means damage.
_LEGACY_KEYS = frozenset({"config", "round", "seed", "data_iterator", "privacy", INTEGRITY_KEY})
_LEGACY_INTEGRITY_KEYS = frozenset({"state_sha256", "client_store_sha256"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CLIENT_FILE = re.compile(r"^round-\d{8}\.states$")


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of a JSON value: sorted keys, no spaces, ASCII (equal values, equal bytes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of a meta item's canonical JSON, leaving out only `integrity.meta_sha256` (the digest itself)."""
    integrity = meta.get(INTEGRITY_KEY)
    body = dict(meta)
    if isinstance(integrity, Mapping):
        body[INTEGRITY_KEY] = {k: v for k, v in integrity.items() if k != "meta_sha256"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal_meta(meta: Mapping[str, Any], integrity: Mapping[str, Any]) -> dict[str, Any]:
    """The meta item as saved: `meta` plus the format and `integrity` (state digest, ...) sealed by `meta_sha256`.

    The digest is taken over the JSON form (tuples as lists), as the item reads back.
    """
    sealed = json.loads(canonical_json({**meta, FORMAT_KEY: META_FORMAT, INTEGRITY_KEY: dict(integrity)}))
    sealed[INTEGRITY_KEY]["meta_sha256"] = meta_digest(sealed)
    return sealed


def check_meta(meta: Any) -> bool:
    """Checks a meta item as read back: True if sealed and intact, False for an older version's (unsealed) item.

    Raises ValueError saying what is wrong: a sealed item whose digest differs
    or that lacks `meta_sha256` or `state_sha256`; an item of an unknown
    format; an unsealed one with a key older versions never wrote (a renamed
    key: the damage that would otherwise pass it off as an older version's).
    """
    if not isinstance(meta, dict):
        raise ValueError(f"the metadata is a JSON {type(meta).__name__}, not an object")
    integrity = meta.get(INTEGRITY_KEY)
    if FORMAT_KEY not in meta:
        unknown = sorted(set(meta) - _LEGACY_KEYS)
        if isinstance(integrity, dict):
            unknown += sorted(f"{INTEGRITY_KEY}.{k}" for k in set(integrity) - _LEGACY_INTEGRITY_KEYS)
        elif integrity is not None:
            unknown.append(INTEGRITY_KEY)
        if unknown:
            raise ValueError(f"the metadata has no {FORMAT_KEY!r} and holds unexpected keys "
                             f"({', '.join(map(repr, unknown[:3]))}): a damaged key name")
        return False
    if meta[FORMAT_KEY] != META_FORMAT or isinstance(meta[FORMAT_KEY], bool):
        raise ValueError(f"unknown checkpoint metadata format {meta[FORMAT_KEY]!r} (this version writes "
                         f"{META_FORMAT})")
    if not isinstance(integrity, dict):
        raise ValueError(f"the metadata has no {INTEGRITY_KEY!r} digests")
    for key in ("meta_sha256", "state_sha256"):
        if not isinstance(integrity.get(key), str) or not _SHA256.match(integrity[key]):
            raise ValueError(f"the metadata lacks its {key} (or it is not a sha256)")
    if meta_digest(meta) != integrity["meta_sha256"]:
        raise ValueError("the metadata's sha256 differs from the one recorded when it was saved")
    return True


def file_sha256(path: pathlib.Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


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
    """An error in one short line: its type and first line, without TensorStore's spec dump (plus the cause's
    line when TensorStore only points at it)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    for tail in (" [tensorstore_spec", " See full TensorStore details"):
        text = text.split(tail, 1)[0]
    cause = e.__cause__ or e.__context__
    if "See full TensorStore details" in (lines[0] if lines else "") and cause is not None and cause is not e:
        text = f"{text} {_first_line(cause)}"
    return f"{type(e).__name__}: {text[:300]}"


@dataclasses.dataclass
class _SaveJob:
    """One step handed to the saving thread (the state is a device tree, hashed and copied there)."""

    step: int
    state: Any
    meta: dict[str, Any]
    client_index: dict[str, np.ndarray] | None
    client_files: dict[str, str] | None  # sha256 of each client-state file the index refers to, by name


_STOP = object()  # tells the saving thread to exit


class RunCheckpointer:
    """An Orbax CheckpointManager for one workdir (`<workdir>/checkpoints`), saving on a thread of its own."""

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
        self._every = max(int(every), 1)
        # The saving thread (started by the first save) and what it shares with the caller.
        self._jobs: queue.Queue = queue.Queue(maxsize=2)
        self._saver: threading.Thread | None = None
        self._manager_lock = threading.Lock()  # the caller's manager calls never overlap the thread's save
        self._pending: set[int] = set()  # steps handed over and not yet passed to Orbax (under _pending_lock)
        self._pending_lock = threading.Lock()
        self._requested: int | None = None  # the newest step handed over
        self._failure: BaseException | None = None  # the saving thread's error (it saves nothing after one)
        self._failure_raised = False  # raised once, by the next save or wait
        self._handled = threading.Condition()  # notified as the thread finishes with each step
        self._handled_step: int | None = None  # the newest step the thread passed to Orbax (or dropped)
        self.client_state_dir = self.directory.parent / CLIENT_STATE_DIR
        self.legacy_steps: set[int] = set()  # steps read back whose meta an older version wrote (unsealed)

    def latest_round(self) -> int | None:
        """Rounds completed by the latest complete checkpoint, or None."""
        return self.manager.latest_step()

    def step_path(self, step: int) -> pathlib.Path:
        """The directory of a committed step."""
        return self.directory / str(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of a checkpoint, its digest checked (`check_meta`; cheap: does not load the state).

        A step whose meta an older version wrote (no digest) is accepted and added to `legacy_steps`.
        """
        path = self.step_path(step) / "meta"
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = restored["meta"]
        except Exception as e:  # noqa: BLE001 - any failure to read it back means the bytes are bad
            raise CheckpointCorrupted(step, path, _first_line(e)) from None
        try:
            sealed = check_meta(meta)
        except ValueError as e:
            raise CheckpointCorrupted(step, path, str(e)) from None
        if not sealed:
            self.legacy_steps.add(step)
        if "config" not in meta or "round" not in meta:
            raise CheckpointCorrupted(step, path, "the metadata lacks config or round")
        if meta["round"] != step or isinstance(meta["round"], bool):
            raise CheckpointCorrupted(step, path, f"the metadata says round {meta['round']!r}")
        return dict(meta)

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
        expected = (meta.get(INTEGRITY_KEY) or {}).get("state_sha256")  # present unless an older version's
        if expected is not None and digest != expected:
            raise CheckpointCorrupted(step, self.step_path(step) / "state",
                                      "the state's sha256 differs from the one recorded when it was saved")
        return state, meta

    def restore_client_index(self, step: int, *, check_files: bool = True) -> dict[str, np.ndarray]:
        """The client-state store's index saved with `step` (see `ClientStateStore`), digest-checked.

        With `check_files`, every client-state file the index refers to must
        be on disk with the sha256 recorded in the step's meta
        (`client_files`; steps of older versions recorded none).
        """
        path = self.step_path(step) / "client_store"
        meta = self.read_meta(step)
        integrity = meta.get(INTEGRITY_KEY) or {}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(client_store=ocp.args.StandardRestore()))
            index = {k: np.asarray(v) for k, v in restored["client_store"].items()}
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorrupted(step, path, _first_line(e)) from None
        expected = integrity.get("client_store_sha256")
        if expected is None and step not in self.legacy_steps:
            raise CheckpointCorrupted(step, path, "the metadata lacks the client-store index's sha256")
        if expected is not None and tree_digest(index) != expected:
            raise CheckpointCorrupted(step, path, "the client-store index's sha256 differs from the saved one")
        if check_files and step not in self.legacy_steps:
            self._check_client_files(step, index, integrity.get("client_files"))
        return index

    def client_files(self, step: int) -> dict[str, str]:
        """The sha256 of each client-state file recorded with `step` (by file name; empty for older versions)."""
        return dict((self.read_meta(step).get(INTEGRITY_KEY) or {}).get("client_files") or {})

    def _check_client_files(self, step: int, index: Mapping[str, np.ndarray], files: Any) -> None:
        """Every file `index` refers to is listed in `files` and on disk with that sha256 (else CheckpointCorrupted)."""
        rounds = np.asarray(index.get("round", np.zeros(0)))
        needed = {f"round-{int(r):08d}.states" for r in np.unique(rounds[rounds >= 0])}
        meta_path = self.step_path(step) / "meta"
        if not isinstance(files, dict) or not all(isinstance(k, str) and _CLIENT_FILE.match(k) and
                                                  isinstance(v, str) and _SHA256.match(v) for k, v in files.items()):
            raise CheckpointCorrupted(step, meta_path, "the metadata lacks the client-state files' sha256")
        if needed - set(files):
            raise CheckpointCorrupted(step, meta_path, f"the client-state file {sorted(needed - set(files))[0]} "
                                                       "has no recorded sha256")
        for name in sorted(needed):
            path = self.client_state_dir / name
            try:
                digest = file_sha256(path)
            except OSError as e:
                raise CheckpointCorrupted(step, path, f"client-state file unreadable: {_write_reason(e)}") from None
            if digest != files[name]:
                raise CheckpointCorrupted(step, path, "the client-state file's sha256 differs from the one recorded "
                                                      "when the checkpoint was saved")

    def verify(self, step: int, like_state: Any, *, client_store: bool = False) -> None:
        """Raises CheckpointCorrupted unless `step` reads back with the digests recorded at save time."""
        self.restore(step, like_state)
        if client_store:
            self.restore_client_index(step)

    def quarantine(self, step: int) -> pathlib.Path:
        """Moves a (corrupted) step out of the checkpoint directory; returns where it went."""
        self.wait()
        target = self.directory.parent / QUARANTINE_DIR / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.step_path(step)), str(target))
        self.manager.reload()
        return target

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk, being written or waiting on the saving thread, ascending."""
        with self._manager_lock:
            steps = set(self.manager.all_steps())
        with self._pending_lock:
            steps |= self._pending
        return sorted(steps)

    def should_save(self, step: int) -> bool:
        """Whether `save(step)` would save: Orbax's default decision, counting steps still on the saving thread.

        A step is saved when it is a multiple of `every`, or when no checkpoint
        exists yet (Orbax's initial save), and only if it is newer than every
        step saved or handed over.
        """
        # Every step Orbax holds was handed over before `_requested`; before the first save, ask Orbax.
        newest = self._requested if self._requested is not None else self.manager.latest_step()
        if newest is not None and newest >= step:
            return False
        return step % self._every == 0 or newest is None

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False,
             client_index: Mapping[str, np.ndarray] | None = None,
             client_files: Mapping[str, str] | None = None) -> bool:
        """Hands `step` to the saving thread if the interval says so (or `force`); True if it will be saved.

        Returns at once unless two steps already wait for the saving thread.
        `state` must not change afterwards (JAX arrays never do); the thread
        hashes it, records the digests in the meta and starts the Orbax save.
        `client_index` (for algorithms with per-client state) is saved with it,
        and `client_files` (the sha256 of each client-state file it refers to,
        by name) goes into the sealed meta.
        A failure of an earlier save is raised here (`CheckpointWriteError`).
        """
        self._raise_failure(step)
        if self._failure is not None or not (force or self.should_save(step)):
            return False  # after a reported failure nothing more is saved
        if jax.process_count() > 1:
            # Every process must enter Orbax's save (its barriers and collectives) in the same order as the
            # rounds' collectives; from a thread of its own it deadlocked against the next round's. So here
            # the save starts on the caller's thread (Orbax still writes asynchronously).
            self._requested = step
            try:
                self._write(_SaveJob(step, state, dict(meta), dict(client_index) if client_index is not None
                                     else None, dict(client_files) if client_files is not None else None))
            except Exception as e:  # noqa: BLE001 - reported like a failure of the saving thread
                self._failure = e
                self._raise_failure(step)
            with self._handled:
                self._handled_step = step
                self._handled.notify_all()
            return True
        if self._saver is None:
            self._saver = threading.Thread(target=self._save_loop, name="fedstream-checkpoint", daemon=True)
            self._saver.start()
        with self._pending_lock:
            self._pending.add(step)
        self._requested = step
        self._jobs.put(_SaveJob(step, state, dict(meta), dict(client_index) if client_index is not None else None,
                                dict(client_files) if client_files is not None else None))
        return True

    def _save_loop(self) -> None:
        """The saving thread: hash, wait for the previous Orbax save, start this one; stop saving after a failure."""
        while (job := self._jobs.get()) is not _STOP:
            try:
                if self._failure is None:
                    self._write(job)
            except Exception as e:  # noqa: BLE001 - reported on the caller's thread
                self._failure = e
            finally:
                with self._pending_lock:
                    self._pending.discard(job.step)
                with self._handled:
                    self._handled_step = job.step
                    self._handled.notify_all()
                self._jobs.task_done()
        self._jobs.task_done()

    def _write(self, job: _SaveJob) -> None:
        """Hashes a step's state (and client index) and starts its Orbax save (on the saving thread)."""
        integrity: dict[str, Any] = {"state_sha256": tree_digest(job.state)}  # waits for the round computing it
        if job.client_index is not None:
            integrity["client_store_sha256"] = tree_digest(job.client_index)
            integrity["client_files"] = dict(job.client_files or {})
        items = {"state": ocp.args.StandardSave(job.state),
                 "meta": ocp.args.JsonSave(seal_meta(job.meta, integrity))}
        if job.client_index is not None:
            items["client_store"] = ocp.args.StandardSave(job.client_index)
        self.manager.wait_until_finished()  # the previous step's save, without holding the lock
        with self._manager_lock:
            # The decision was taken when the step was handed over; force keeps Orbax from re-deciding.
            self.manager.save(job.step, args=ocp.args.Composite(**items), force=True)

    def wait_started(self, step: int) -> None:
        """Blocks until the saving thread has started the Orbax save of `step` (so every earlier one is committed).

        The save of `step` itself may still be in flight. Returns at once if a
        save failed (`wait` raises it). For fault injection: a kill "during the save".
        """
        with self._handled:
            self._handled.wait_for(lambda: self._failure is not None or
                                   (self._handled_step is not None and self._handled_step >= step))

    def _raise_failure(self, step: int | None = None) -> None:
        """Raises the saving thread's error, if any, as a CheckpointWriteError (see `_write_errors`)."""
        if self._failure is not None and not self._failure_raised:
            self._failure_raised = True
            with self._write_errors(step):
                raise self._failure

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
        """Blocks until every step handed to `save` is committed (raises CheckpointWriteError if one failed)."""
        self._jobs.join()
        self._raise_failure()
        with self._write_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then stops the saving thread and releases the manager (also after a failure)."""
        try:
            self.wait()
        except BaseException:
            self._shut_down(reported=True)
            raise
        self._shut_down(reported=False)

    def _shut_down(self, *, reported: bool) -> None:
        """Stops the saving thread and closes the manager; `reported`: a failed save was raised already, so
        the manager's close re-raising the same failure is dropped."""
        if self._saver is not None:
            self._jobs.put(_STOP)
            self._saver.join()
            self._saver = None
        if reported:
            with contextlib.suppress(Exception):
                self.manager.close()
        else:
            with self._write_errors():
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
