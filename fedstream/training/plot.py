"""`fedstream plot`: plots of the metrics of one or more runs (read from their `metrics.jsonl`), or of a
dataset's label distribution over clients.

Runs: one panel per metric (`train/loss`, `eval/accuracy`, ...), one line per
run (labelled with the workdir's name), against the round, against
training wall time, or against simulated time. Wall time is the cumulative
`round_seconds` of the train records: the time spent in rounds (data wait,
the round itself, its first compilation), without evaluation, checkpoint
waits or the gaps of restarts. Simulated time is the `simulated_time` of the
train records of runs on the simulated clock (`clock.enabled`,
docs/simulated_clock.md): where the clock stood when the round ended.
Evaluation points are marked, and labelled with their round (every point of
a line with at most `_LABEL_ROUNDS_UP_TO` of them, else the last).

Data (`--data DIR`): stacked bars of each client's label counts, clients
sorted by size (as Flower Datasets' `plot_label_distributions` draws them; at
most `max_clients` bars, evenly spaced over the size order), and a histogram
of the examples per client.

The output's extension picks the format: .png, .svg or .pdf.

Needs matplotlib (`pip install 'fedstream[plot]'`); without it the command
fails with a one-line message saying so.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from fedstream.config import ConfigError

DEFAULT_METRICS = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy")
X_AXES = ("round", "time", "simulated_time")
_X_LABELS = {"round": "round", "time": "training time (s, sum of round_seconds)",
             "simulated_time": "simulated time (s, the clock at the round's end)"}
FORMATS = ("png", "svg", "pdf")
_LABEL_ROUNDS_UP_TO = 12  # eval points of a line labelled with their round when it has at most this many
DEFAULT_MAX_CLIENTS = 100  # bars of the label-distribution plot
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


def output_format(output: str | os.PathLike) -> str:
    """The plot format named by the output's extension (png, svg or pdf); a ConfigError otherwise."""
    suffix = pathlib.Path(output).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ConfigError(f"--output {output}: the extension picks the format; use .png, .svg or .pdf")
    return suffix


def _save(figure: Any, output: pathlib.Path, fmt: str) -> pathlib.Path:
    """Lays out and writes `figure` to `output` in `fmt`; returns `output`."""
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format=fmt)
    return output


def _y_label(metric: str) -> str:
    """`eval/accuracy` -> 'accuracy'; `train/examples_per_second` -> 'examples per second'."""
    return metric.split("/", 1)[-1].replace("_", " ")


def plot_runs(workdirs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
              metrics: Sequence[str] = (), x: str = "round", dpi: int = 100) -> pathlib.Path:
    """Writes a plot comparing the runs in `workdirs` and returns its path.

    `metrics` as for `resolve_metrics`; `x` is 'round', 'time' (cumulative
    training seconds, see the module docstring) or 'simulated_time' (runs on
    the simulated clock; a run without it is a ConfigError naming it). The format follows the
    output's extension (`output_format`).
    """
    if not workdirs:
        raise ConfigError("fedstream plot needs at least one workdir (or --data DIR)")
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    output = pathlib.Path(output)
    fmt = output_format(output)
    return _save(_figure(workdirs, metrics=metrics, x=x, dpi=dpi), output, fmt)


def plot_image(workdir: str | os.PathLike, *, metrics: Sequence[str] = (), dpi: int = 80) -> Any:
    """The plot of one run (as `fedstream plot WORKDIR` draws it) as an RGB uint8 array [H, W, 3],
    for TensorBoard's image dashboard. Raises MissingExtraError without matplotlib."""
    figure = _figure([workdir], metrics=metrics, x="round", dpi=dpi)
    figure.tight_layout()
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _figure(workdirs: Sequence[str | os.PathLike], *, metrics: Sequence[str], x: str, dpi: int) -> Any:
    """The matplotlib Figure of `plot_runs`."""
    runs = [read_metrics(w) for w in workdirs]
    chosen = resolve_metrics(metrics, {m for series, _ in runs for m in series})
    labels = run_labels(workdirs)
    positions = [_x_positions(series, elapsed, x, w) for (series, elapsed), w in zip(runs, workdirs)]

    columns = min(len(chosen), 2)
    rows = math.ceil(len(chosen) / columns)
    figure = _pyplot_free_figure((6.0 * columns, 3.8 * rows), dpi)
    from matplotlib.ticker import MaxNLocator

    axes = figure.subplots(rows, columns, squeeze=False)
    for panel, metric in enumerate(chosen):
        ax = axes[panel // columns][panel % columns]
        for (series, _), at, label in zip(runs, positions, labels):
            points = series.get(metric)
            if not points:
                continue
            rounds = sorted(points)
            if at is not None:
                rounds = [r for r in rounds if r in at]
                xs = [at[r] for r in rounds]
            else:
                xs = rounds
            ys = [points[r] for r in rounds]
            is_eval = metric.startswith("eval/")
            line, = ax.plot(xs, ys, label=label, marker="o" if is_eval or len(xs) <= 30 else None,
                            markersize=4 if is_eval else 3)
            if is_eval and rounds:
                shown = range(len(rounds)) if len(rounds) <= _LABEL_ROUNDS_UP_TO else [len(rounds) - 1]
                for i in shown:
                    ax.annotate(f"r{rounds[i]}", (xs[i], ys[i]), textcoords="offset points", xytext=(0, 5),
                                ha="center", fontsize="x-small", color=line.get_color())
        if metric.startswith("eval/"):
            ax.margins(y=0.12)  # room for the round labels above the points
        ax.set_title(metric)
        ax.set_ylabel(_y_label(metric))
        ax.set_xlabel(_X_LABELS[x])
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for panel in range(len(chosen), rows * columns):
        axes[panel // columns][panel % columns].set_visible(False)
    return figure


def _x_positions(series: Series, elapsed: dict[int, float], x: str,
                 workdir: str | os.PathLike) -> dict[int, float] | None:
    """Each round's position on the x axis `x` for one run (None: the round itself)."""
    if x == "time":
        return elapsed
    if x == "simulated_time":
        at = series.get("train/simulated_time")
        if not at:
            raise ConfigError(f"{workdir}: its metrics have no simulated_time (the run did not use the simulated "
                              "clock, config key clock.enabled); plot it with --x round or --x time")
        return at
    return None


def _class_colors(num: int) -> list[Any]:
    """Distinct colors for `num` classes: tab10 / tab20 when they suffice, else a sampled colormap."""
    from matplotlib import colormaps

    if num <= 10:
        return [colormaps["tab10"](i) for i in range(num)]
    if num <= 20:
        return [colormaps["tab20"](i) for i in range(num)]
    return [colormaps["viridis"](i / max(num - 1, 1)) for i in range(num)]


def plot_data(path: str | os.PathLike, output: str | os.PathLike, *, split: str | None = None,
              max_clients: int = DEFAULT_MAX_CLIENTS, label_key: str | None = None,
              dpi: int = 100) -> tuple[pathlib.Path, list[str]]:
    """Writes the label distribution over the clients of one split of the dataset at `path` and a
    histogram of its client sizes; returns the file and notes to print (clients left out, no labels).

    `split` defaults to `train` (else the first split). The bars are the clients sorted by examples,
    largest first: all of them up to `max_clients`, else `max_clients` evenly spaced over that order
    (the largest and the smallest included), whose labels alone are read.
    """
    from fedstream.data.inspect import find_label_key, label_counts
    from fedstream.data.reader import FederatedDataset

    output = pathlib.Path(output)
    fmt = output_format(output)
    if max_clients < 1:
        raise ConfigError(f"--max-clients must be >= 1, got {max_clients}")
    ds = FederatedDataset(path)
    if split is None:
        split = "train" if "train" in ds.splits else ds.splits[0]
    sizes = np.asarray(ds.client_sizes(split), np.int64)  # raises naming the splits if `split` is unknown
    notes: list[str] = []
    key, why = find_label_key(ds, label_key)
    if key is None:
        notes.append(f"no label plot: {why}")
    figure = _pyplot_free_figure((12.0, 4.2 * (2 if key else 1)), dpi)
    axes = figure.subplots(2 if key else 1, 1, squeeze=False)[:, 0]
    if key is not None:
        by_size = np.argsort(-sizes, kind="stable")
        if len(by_size) > max_clients:
            shown = by_size[np.unique(np.linspace(0, len(by_size) - 1, max_clients).round().astype(np.int64))]
            notes.append(f"label plot: {len(shown):,} of {len(sizes):,} clients of split {split!r} shown, evenly "
                         "spaced in size order (--max-clients N changes the number)")
        else:
            shown = by_size
        counts = label_counts(ds, split, key, positions=shown)
        dense = counts.dense(np.searchsorted(counts.positions, shown))
        ax = axes[0]
        colors = _class_colors(len(counts.classes))
        bottom = np.zeros(len(shown))
        xs = np.arange(len(shown))
        for k, label in enumerate(counts.classes.tolist()):
            ax.bar(xs, dense[:, k], bottom=bottom, width=0.85, color=colors[k], label=str(label), linewidth=0)
            bottom += dense[:, k]
        subset = f" ({len(shown):,} of {len(sizes):,}, evenly spaced)" if len(shown) < len(sizes) else ""
        ax.set_title(f"labels ({key}) per client of split {split!r}{subset}")
        ax.set_xlabel("client, sorted by examples (largest first)")
        ax.set_ylabel("examples")
        ax.set_xlim(-0.6, len(shown) - 0.4)
        if len(counts.classes) <= 20:
            ax.legend(title=key, fontsize="small", ncols=1 if len(counts.classes) <= 10 else 2,
                      loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ax.text(1.0, 1.0, f"{len(counts.classes)} classes,\ncolored {counts.classes[0]}..{counts.classes[-1]}\n"
                    "(viridis)", transform=ax.transAxes, va="top", ha="left", fontsize="small")
        if len(shown) <= 30:
            ax.set_xticks(xs, [str(c) for c in ds.client_ids(split)[shown]], rotation=90, fontsize="x-small")
        else:
            ax.set_xticks([])
    ax = axes[-1]
    ax.hist(sizes, bins=min(50, max(1, len(np.unique(sizes)))), color="#4c72b0")
    median = float(np.median(sizes)) if len(sizes) else 0.0
    ax.set_title(f"examples per client, split {split!r}: {len(sizes):,} clients, {int(sizes.sum()):,} examples, "
                 f"median {median:g}")
    ax.set_xlabel("examples per client")
    ax.set_ylabel("clients")
    return _save(figure, output, fmt), notes
