"""`fedstream plot`: PNG plots of the metrics of one or more runs, read from their `metrics.jsonl`.

One panel per metric (`train/loss`, `eval/accuracy`, ...), one line per run
(labelled with the workdir's name), against the round or against training
wall time. Wall time is the cumulative `round_seconds` of the train records:
the time spent in rounds (data wait, the round itself, its first
compilation), without evaluation, checkpoint waits or the gaps of restarts.

Needs matplotlib (`pip install 'fedstream[plot]'`); without it the command
fails with a one-line message saying so.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

from fedstream.config import ConfigError

DEFAULT_METRICS = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy")
X_AXES = ("round", "time")
# Bookkeeping fields of a record that are not metrics to plot.
_NOT_METRICS = ("round", "kind")


class MissingExtraError(ImportError):
    """An optional dependency (a `fedstream[...]` extra) is not installed; the message says which."""


Series = dict[str, dict[int, float]]  # "kind/name" -> {round: value}


def read_metrics(workdir: str | os.PathLike) -> tuple[Series, dict[int, float]]:
    """The numeric metrics of a run, `{"kind/name": {round: value}}`, and the cumulative
    training seconds at the end of each round (`{round: seconds}`).

    A later record of the same round and kind replaces an earlier one; lines cut
    by a kill are skipped. Raises ConfigError when the workdir has no metrics.
    """
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (not a fedstream workdir, or no round has finished yet)")
    series: Series = {}
    round_seconds: dict[int, float] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                round_index, kind = int(record["round"]), str(record["kind"])
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut by a kill, or not a metrics record
            for name, value in record.items():
                if name in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                series.setdefault(f"{kind}/{name}", {})[round_index] = float(value)
            if kind == "train" and isinstance(record.get("round_seconds"), (int, float)):
                round_seconds[round_index] = float(record["round_seconds"])
    if not series:
        raise ConfigError(f"{path}: no metrics records")
    elapsed, total = {}, 0.0
    for r in sorted(round_seconds):
        total += round_seconds[r]
        elapsed[r] = total
    return series, elapsed


def resolve_metrics(requested: Sequence[str], available: Iterable[str]) -> list[str]:
    """Expands the `--metric` names: `kind/name` as is, a bare `name` to every kind that has it.

    With no request, the default panels present in any run. Raises ConfigError
    naming a metric that no run has, with the available ones.
    """
    available = sorted(set(available))
    if not requested:
        chosen = [m for m in DEFAULT_METRICS if m in available]
        return chosen or available[:4]
    chosen: list[str] = []
    for name in requested:
        matches = [name] if name in available else sorted(
            (m for m in available if m.split("/", 1)[-1] == name),
            key=lambda m: (["train", "eval"].index(m.split("/")[0]) if m.split("/")[0] in ("train", "eval") else 2, m))
        if not matches:
            raise ConfigError(f"no run has metric {name!r}; available: {', '.join(available)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def run_labels(workdirs: Sequence[str | os.PathLike]) -> list[str]:
    """Legend labels: the workdirs' names, with parent directories added until they are distinct."""
    paths = [pathlib.Path(os.path.normpath(os.path.abspath(w))) for w in workdirs]
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(w) for w in workdirs]


def _pyplot_free_figure(figsize: tuple[float, float], dpi: int) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("fedstream plot needs matplotlib: pip install 'fedstream[plot]' "
                                "(or pip install matplotlib)") from None
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def plot_runs(workdirs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
              metrics: Sequence[str] = (), x: str = "round", dpi: int = 100) -> pathlib.Path:
    """Writes a PNG comparing the runs in `workdirs` and returns its path.

    `metrics` as for `resolve_metrics`; `x` is 'round' or 'time' (cumulative
    training seconds, see the module docstring).
    """
    if not workdirs:
        raise ConfigError("fedstream plot needs at least one workdir")
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    output = pathlib.Path(output)
    if output.suffix.lower() != ".png":
        raise ConfigError(f"--output {output}: the plot is written as PNG, use a .png name")
    figure = _figure(workdirs, metrics=metrics, x=x, dpi=dpi)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    return output


def plot_image(workdir: str | os.PathLike, *, metrics: Sequence[str] = (), dpi: int = 80) -> Any:
    """The plot of one run (as `fedstream plot WORKDIR` draws it) as an RGB uint8 array [H, W, 3],
    for TensorBoard's image dashboard. Raises MissingExtraError without matplotlib."""
    import numpy as np

    figure = _figure([workdir], metrics=metrics, x="round", dpi=dpi)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _figure(workdirs: Sequence[str | os.PathLike], *, metrics: Sequence[str], x: str, dpi: int) -> Any:
    """The matplotlib Figure of `plot_runs`."""
    runs = [read_metrics(w) for w in workdirs]
    chosen = resolve_metrics(metrics, {m for series, _ in runs for m in series})
    labels = run_labels(workdirs)

    columns = min(len(chosen), 2)
    rows = math.ceil(len(chosen) / columns)
    figure = _pyplot_free_figure((6.0 * columns, 3.8 * rows), dpi)
    from matplotlib.ticker import MaxNLocator

    axes = figure.subplots(rows, columns, squeeze=False)
    for panel, metric in enumerate(chosen):
        ax = axes[panel // columns][panel % columns]
        for (series, elapsed), label in zip(runs, labels):
            points = series.get(metric)
            if not points:
                continue
            rounds = sorted(points)
            if x == "time":
                rounds = [r for r in rounds if r in elapsed]
                xs = [elapsed[r] for r in rounds]
            else:
                xs = rounds
            ys = [points[r] for r in rounds]
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 30 else None, markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("round" if x == "round" else "training time (s, sum of round_seconds)")
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for panel in range(len(chosen), rows * columns):
        axes[panel // columns][panel % columns].set_visible(False)
    figure.tight_layout()
    return figure
