"""`fedstream plot`: PNGs from metrics.jsonl of several runs; opened and checked for size and content."""

import json
import sys

import numpy as np
import pytest

from fedstream.cli import main
from fedstream.config import ConfigError
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
    assert main(["plot", str(runs[0]), "--output", str(tmp_path / "x.pdf")]) == 2
    assert "PNG" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'fedstream\[plot\]'"):
        plot_runs(runs, tmp_path / "y.png")
    assert main(["plot", str(runs[0]), "--output", str(tmp_path / "y.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
