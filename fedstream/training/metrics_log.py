"""Where metrics go: `metrics.jsonl` in the workdir, TensorBoard, a progress line.

`metrics.jsonl` has one JSON object per line: `{"round": r, "kind": "train" |
"eval", ...}`. On resume from round k the lines of later rounds (written
before the crash, not covered by a checkpoint) are dropped, so the file always
matches the restored state.

TensorBoard event files (`<workdir>/tensorboard/`) are written by
`fedstream.training.tensorboard_writer.EventWriter`, a `clu.metric_writers`
writer on the `tensorboard` package alone (no TensorFlow): the optional extra
`fedstream[tensorboard]`. They hold every number of `metrics.jsonl` as the
scalar `kind/name` at step = round, the run's config as hparams (once, when
the run starts from round 0) and, when a `Simulation.run` finishes and
matplotlib is installed, the run's plot (`fedstream plot`) as the image
`plots/metrics` at the last round. On resume from round k the events of later
rounds are cut from the existing event files, as from `metrics.jsonl`, and
the new segment's file starts with a `SessionLog.START` at step k + 1 (see
`tensorboard_writer`), so each step appears once. Without the extra the JSONL
file is the record and a one-line note says so.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, TextIO

from fedstream.io_safety import create_exclusive, open_no_follow


def _tensorboard_writer(logdir: pathlib.Path, resume_round: int) -> Any | None:
    """An EventWriter into `logdir` after cutting its files back to `resume_round`; None without the extra."""
    from fedstream.training import tensorboard_writer

    if not tensorboard_writer.available():
        return None
    tensorboard_writer.purge_after(logdir, resume_round)
    return tensorboard_writer.EventWriter(logdir, restart_step=resume_round + 1 if resume_round > 0 else None)


def truncate_jsonl(path: pathlib.Path, last_round: int) -> None:
    """Keeps only lines with round <= last_round (atomically rewritten).

    Neither the file nor its temporary copy is opened through a symbolic link (`fedstream.io_safety`).
    """
    if not path.exists() and not path.is_symlink():
        return
    kept = []
    with open_no_follow(path, "r", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(record, dict) and int(record.get("round", -1)) <= last_round:
                kept.append(json.dumps(record) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    with create_exclusive(tmp, "w") as f:
        f.write("".join(kept))
    os.replace(tmp, path)


class MetricsLog:
    """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard (if installed).

    With `enabled=False` (processes other than 0 of a multi-process run) it
    writes nothing.
    """

    def __init__(self, workdir: str | pathlib.Path, resume_round: int, tensorboard: bool = True,
                 enabled: bool = True) -> None:
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self.resume_round = int(resume_round)
        if not enabled:
            self._file, self._tb, self.tensorboard_enabled = None, None, False
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_round)
        self._file: TextIO = open_no_follow(self.path, "a")
        self._tb = _tensorboard_writer(pathlib.Path(workdir) / "tensorboard", self.resume_round) if tensorboard else None
        self.tensorboard_enabled = self._tb is not None

    def write(self, round_index: int, kind: str, values: Mapping[str, Any]) -> None:
        """Appends one record; numbers also go to TensorBoard as `kind/name`."""
        if not self.enabled:
            return
        record = {"round": int(round_index), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            scalars = {f"{kind}/{k}": v for k, v in record.items()
                       if k not in ("round", "kind") and isinstance(v, (int, float))}
            self._tb.write_scalars(int(round_index), scalars)
            self._tb.flush()

    def write_hparams(self, flat_config: Mapping[str, Any]) -> bool:
        """Records the run's config as TensorBoard hparams, once per run: only when the run starts
        from round 0 (not on resume), only on process 0, only with TensorBoard installed.

        `flat_config` maps dotted keys to values (`fedstream.config.flatten(config.to_dict())`);
        values that are not bool/int/float/str are written as their JSON text. Returns whether
        anything was written.
        """
        if not self.enabled or self._tb is None or self.resume_round > 0:
            return False
        self._tb.write_hparams(hparams_values(flat_config))
        self._tb.flush()
        return True

    def write_plot(self, round_index: int) -> bool:
        """Draws the run's metrics so far (`fedstream plot`) into TensorBoard as the image `plots/metrics`
        at step `round_index`. Needs TensorBoard and matplotlib (the `plot` extra); returns whether
        anything was written."""
        if not self.enabled or self._tb is None or round_index <= 0:
            return False
        from fedstream.config import ConfigError
        from fedstream.training.plot import MissingExtraError, plot_image

        self._file.flush()
        try:
            image = plot_image(self.path.parent)
        except (MissingExtraError, ConfigError):  # no matplotlib, or no metrics records yet
            return False
        self._tb.write_images(int(round_index), {"plots/metrics": image})
        self._tb.flush()
        return True

    def close(self) -> None:
        """Flushes and closes the files."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def hparams_values(flat_config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Config values as TensorBoard hparams accept them: bool, int, float or str (others as JSON text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in flat_config.items():
        value = _plain(value)
        if isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(value, sort_keys=True, default=str)
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def print_line(line: str) -> None:
    """Prints one line at once (progress must show while stdout is a pipe or a file)."""
    print(line, flush=True)


class Progress:
    """A throttled one-line progress report: round, rounds/s, examples/s, ETA, last eval.

    Clients skipped as non-finite (`nonfinite_clients_skipped` of the train
    metrics) since the previous line are named on the next one, and force it
    out: a round that skipped clients is never silent.
    """

    def __init__(self, total_rounds: int, start_round: int, stream: TextIO | None = None, every_secs: float = 2.0,
                 enabled: bool = True, emit: Callable[[str], None] | None = None):
        self.total, self.start, self.enabled = total_rounds, start_round, enabled
        # None: whatever sys.stdout is when a line is printed (not the stream at import time).
        self.stream, self.every = stream, every_secs
        self.emit = emit  # where lines go instead of the stream (e.g. a simulation's `log`)
        self.t0 = time.perf_counter()
        self.last_print = -math.inf
        self.examples = 0
        self.last_eval = ""
        self.skipped = 0  # non-finite clients skipped since the last line printed

    def update(self, round_done: int, examples: int, train: Mapping[str, float], force: bool = False) -> None:
        """Counts a finished round; prints a line if `every_secs` passed (or `force`, the last round, skipped clients)."""
        self.examples += examples
        skipped = int(train.get("nonfinite_clients_skipped", 0) or 0)
        self.skipped += skipped
        force = force or skipped > 0
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last_print < self.every and round_done < self.total):
            return
        self.last_print = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (round_done - self.start) / elapsed
        eta = (self.total - round_done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        line = (f"round {round_done}/{self.total} | {rate:.2f} rounds/s | {self.examples / elapsed:,.0f} ex/s | "
                f"ETA {eta_text} | train loss {train.get('loss', float('nan')):.4f} "
                f"acc {train.get('accuracy', float('nan')):.4f}")
        if self.skipped:
            line += f" | {self.skipped} non-finite clients skipped"
            self.skipped = 0
        if self.last_eval:
            line += f" | {self.last_eval}"
        if self.emit is not None:
            self.emit(line)
        else:
            print(line, file=self.stream if self.stream is not None else sys.stdout, flush=True)
