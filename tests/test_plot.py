"""`fedstream plot`: PNGs from metrics.jsonl of several runs; opened and checked for size and content."""

import json
import sys

import numpy as np
import pytest

from fedstream.cli import main
from fedstream.config import ConfigError
from fedstream.data.format import FeatureSpec
from fedstream.data.writer import DatasetWriter
from fedstream.training import plot as plot_module
from fedstream.training.plot import MissingExtraError, plot_runs, read_metrics, resolve_metrics, run_labels

pytest.importorskip("matplotlib", reason="fedstream plot needs the plot extra (matplotlib)")


def fake_run(workdir, rounds, speed, seed, eval_every=2):
    """A workdir with a metrics.jsonl like a real run's, plus a line cut by a kill."""
    rng = np.random.default_rng(seed)
    workdir.mkdir(parents=True)
    lines = []
    for r in range(1, rounds + 1):
        lines.append({"round": r, "kind": "train", "loss": 2.3 / r ** speed + 0.05 * rng.random(),
                      "accuracy": 1 - 0.9 / r ** speed, "clients": 10, "examples": 200,
                      "round_seconds": 0.5 + 0.1 * rng.random(), "examples_per_second": 400.0})
        if r % eval_every == 0 or r == rounds:
            lines.append({"round": r, "kind": "eval", "loss": 2.4 / r ** speed, "accuracy": 1 - 0.95 / r ** speed,
                          "num_clients": 100, "num_examples": 400})
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"round": 99, "kind": "tr'
    (workdir / "metrics.jsonl").write_text(text)
    return workdir


@pytest.fixture
def runs(tmp_path):
    return [fake_run(tmp_path / "sgd", 12, 0.5, 0), fake_run(tmp_path / "adam", 9, 1.0, 1)]


def check_png(path, width, height):
    from matplotlib import image

    pixels = image.imread(str(path))
    assert pixels.shape[:2] == (height, width)
    rgb = pixels[..., :3]
    assert rgb.var() > 0.001
    colors = np.unique((rgb.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colors) > 20, len(colors)  # lines of two colors, text, grid, anti-aliasing
    return rgb


def test_plot_two_runs_by_round_and_by_time(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "cmp.png"
    assert main(["plot", *map(str, runs), "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    rgb = check_png(out, 1200, 760)  # 2 x 2 panels of 6 x 3.8 inches at 100 dpi
    # Both runs' line colors (matplotlib's first two: blue 1f77b4, orange ff7f0e) are drawn.
    flat = (rgb.reshape(-1, 3) * 255).round()
    for color in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(flat - color).sum(axis=1) < 30).sum() > 200, color

    timed = tmp_path / "time.png"
    assert main(["plot", *map(str, runs), "--output", str(timed), "--x", "time", "--metric", "eval/accuracy"]) == 0
    check_png(timed, 600, 380)


def test_metric_selection_and_labels(runs, tmp_path):
    series, elapsed = read_metrics(runs[0])
    assert sorted(series["eval/accuracy"]) == [2, 4, 6, 8, 10, 12]
    assert 99 not in series["train/loss"]  # the cut line is skipped
    assert elapsed[12] == pytest.approx(sum(json.loads(line)["round_seconds"] for line in
                                            (runs[0] / "metrics.jsonl").read_text().splitlines()[:-1]
                                            if '"train"' in line))
    available = set(series)
    assert resolve_metrics([], available) == ["train/loss", "train/accuracy", "eval/loss", "eval/accuracy"]
    assert resolve_metrics(["accuracy"], available) == ["train/accuracy", "eval/accuracy"]
    with pytest.raises(ConfigError, match="no run has metric 'bleu'"):
        resolve_metrics(["bleu"], available)
    assert run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]


def test_clear_errors(runs, tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing/metrics.jsonl: no such file" in err
    assert main(["plot", str(runs[0]), "--output", str(tmp_path / "x.gif")]) == 2
    assert "use .png, .svg or .pdf" in capsys.readouterr().err
    assert main(["plot", "--output", str(tmp_path / "x.png")]) == 2
    assert "at least one workdir (or --data DIR)" in capsys.readouterr().err
    assert main(["plot", str(runs[0]), "--data", str(runs[0]), "--output", str(tmp_path / "x.png")]) == 2
    assert "give no WORKDIR" in capsys.readouterr().err
    assert main(["plot", str(runs[0]), "--split", "train", "--output", str(tmp_path / "x.png")]) == 2
    assert "go with --data DIR" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'fedstream\[plot\]'"):
        plot_runs(runs, tmp_path / "y.png")
    assert main(["plot", str(runs[0]), "--output", str(tmp_path / "y.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the plot functions save, for looking at their axes."""
    figures = []
    save = plot_module._save

    def keep(figure, output, fmt):
        figures.append(figure)
        return save(figure, output, fmt)

    monkeypatch.setattr(plot_module, "_save", keep)
    return figures


def test_svg_and_pdf_y_labels_and_eval_rounds(runs, tmp_path, saved_figures):
    for name, head in (("cmp.svg", b"<?xml"), ("cmp.pdf", b"%PDF")):
        out = plot_runs(runs, tmp_path / name)
        assert out.read_bytes().startswith(head) and out.stat().st_size > 5000
    axes = [ax for ax in saved_figures[-1].axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == ["loss", "accuracy", "loss", "accuracy"]
    eval_acc = next(ax for ax in axes if ax.get_title() == "eval/accuracy")
    texts = sorted(t.get_text() for t in eval_acc.texts)
    # sgd: 12 rounds, eval every 2 (6 points, each labelled); adam: 9 rounds, eval at 2, 4, 6, 8, 9.
    assert texts == sorted(["r2", "r4", "r6", "r8", "r10", "r12", "r2", "r4", "r6", "r8", "r9"])
    assert all(line.get_marker() == "o" for line in eval_acc.lines)
    assert not any(ax.texts for ax in axes if ax.get_title().startswith("train/"))


def test_long_eval_series_labels_only_its_last_round(tmp_path, saved_figures):
    plot_runs([fake_run(tmp_path / "long", 60, 0.5, 0)], tmp_path / "long.png", metrics=["eval/loss"])
    assert [t.get_text() for t in saved_figures[-1].axes[0].texts] == ["r60"]


def labelled_dataset(path, num_clients, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    schema = {"x": FeatureSpec("float32", (2,)), "y": FeatureSpec("int32", ())}
    sizes = {}
    with DatasetWriter(path, schema) as writer:
        for c in range(num_clients):
            n = int(rng.integers(1, 30))
            sizes[f"c{c:04d}"] = n
            writer.add_client("train", f"c{c:04d}", {"x": np.zeros((n, 2)), "y": rng.integers(0, num_classes, n)})
    return sizes


def test_data_plot_stacks_labels_of_clients_sorted_by_size(tmp_path, saved_figures, capsys):
    sizes = labelled_dataset(tmp_path / "ds", 12)
    out = tmp_path / "labels.png"
    assert main(["plot", "--data", str(tmp_path / "ds"), "--output", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"  # all 12 clients shown: no note
    check_png(out, 1200, 840)
    bars_ax, hist_ax = saved_figures[-1].axes[:2]
    assert bars_ax.get_ylabel() == "examples" and hist_ax.get_ylabel() == "clients"
    heights = np.zeros(12)
    for patch in bars_ax.patches:
        heights[round(patch.get_x() + patch.get_width() / 2)] += patch.get_height()
    assert list(heights) == sorted(sizes.values(), reverse=True)  # stacked label counts = client sizes, sorted
    assert [t.get_text() for t in bars_ax.get_legend().get_texts()] == ["0", "1", "2"]
    ticks = [t.get_text() for t in bars_ax.get_xticklabels()]
    assert ticks == sorted(sizes, key=lambda c: -sizes[c])


def test_data_plot_caps_the_clients_shown(tmp_path, saved_figures, capsys):
    sizes = labelled_dataset(tmp_path / "ds", 250, num_classes=25)
    out = tmp_path / "labels.svg"
    assert main(["plot", "--data", str(tmp_path / "ds"), "--output", str(out), "--max-clients", "40"]) == 0
    printed = capsys.readouterr().out
    assert "40 of 250 clients of split 'train' shown, evenly spaced in size order" in printed
    assert out.read_bytes().startswith(b"<?xml")
    bars_ax = saved_figures[-1].axes[0]
    xs = {round(p.get_x() + p.get_width() / 2) for p in bars_ax.patches}
    assert xs == set(range(40)) and bars_ax.get_legend() is None  # 25 classes: a note instead of a legend
    heights = np.zeros(40)
    for patch in bars_ax.patches:
        heights[round(patch.get_x() + patch.get_width() / 2)] += patch.get_height()
    ordered = sorted(sizes.values(), reverse=True)
    assert heights[0] == ordered[0] and heights[-1] == ordered[-1] and list(heights) == sorted(heights, reverse=True)


def test_data_plot_without_labels_draws_the_histogram(tmp_path, saved_figures, capsys):
    with DatasetWriter(tmp_path / "text", {"y": FeatureSpec("int32", (None,))}) as writer:
        writer.add_client("train", "a", {"y": [np.arange(3)]})
    assert main(["plot", "--data", str(tmp_path / "text"), "--output", str(tmp_path / "t.pdf")]) == 0
    assert "no label plot: feature 'y' is int32[None]" in capsys.readouterr().out
    assert len(saved_figures[-1].axes) == 1
    assert main(["plot", "--data", str(tmp_path / "text"), "--split", "test", "--output", str(tmp_path / "t.pdf")]) == 2
    assert "no split 'test'" in capsys.readouterr().err
