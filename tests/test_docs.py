"""The docs run: docs/algorithms.md's user algorithm trains through the real round, the tutorial's and the
README's commands run as written, and every other documented command parses and resolves."""

import pathlib
import re

import jax
import numpy as np
import pytest

from fedstream.algorithms import build_algorithm, make_optimizer
from fedstream.data.cohort import ClientBatching, CohortPipeline
from fedstream.models import get_model
from fedstream.training.rounds import build_train_round, make_mesh, replicate, shard_batch
from support import InMemorySource

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
ROOT = DOCS.parent


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_user_algorithm_from_the_docs_clips_and_trains():
    namespace: dict = {}
    for block in python_blocks("algorithms.md"):
        exec(compile(block, "docs/algorithms.md", "exec"), namespace)  # noqa: S102 - our own docs
    source = InMemorySource([30, 12, 50, 7], input_shape=(3, 2, 1), num_classes=3, seed=1)
    model = get_model("logistic", (3, 2, 1), 3)
    mesh = make_mesh(1)
    deltas = {}
    for clip in (1e-3, 1e3):
        algorithm = build_algorithm("clipped_fedavg", model, make_optimizer("sgd", 0.5), make_optimizer("sgd", 1.0),
                                    clip_norm=clip)
        pipeline = CohortPipeline(source, "train", ("x", "y"), seed=0, cohort_size=4, batching=ClientBatching(5),
                                  num_devices=1, data_threads=0, uniform_weights=True)
        state0 = algorithm.init(jax.random.PRNGKey(0))
        state, _ = build_train_round(algorithm, mesh, seed=0)(replicate(state0, mesh),
                                                              shard_batch(next(pipeline.iterator(1))["batch"], mesh))
        flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])  # noqa: E731
        deltas[clip] = np.linalg.norm(flat(state.params) - flat(state0.params))
    assert deltas[1e-3] <= 1e-3 + 1e-7  # a mean of clipped deltas is within the clip norm
    assert deltas[1e3] > 10 * 1e-3  # without clipping the model moves much further


def test_user_algorithm_runs_as_written_from_the_users_directory_and_logs_its_metric(tmp_path, monkeypatch, digits):
    """docs/algorithms.md: the block saved as my_algorithms.py, the documented command run from that directory."""
    import json
    import shlex
    import shutil

    from support import run_cli

    section = (DOCS / "algorithms.md").read_text().split("## Writing your own", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (tmp_path / "my_algorithms.py").write_text(block)
    shutil.copytree(digits, tmp_path / "data" / "digits")  # what the pipeline would preprocess on first use
    monkeypatch.chdir(tmp_path)
    (command,) = [c for c in shell_commands(DOCS / "algorithms.md") if "my_algorithms.py" in c]
    result = run_cli(*shlex.split(command)[1:])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs" / "clipped" / "metrics.jsonl").read_text().splitlines()]
    clipped = [r["clipped_clients"] for r in rows if r["kind"] == "train"]
    assert len(clipped) == 5 and all(0 <= c <= 10 for c in clipped) and sum(clipped) > 0


def test_readme_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's "Python API" block, from an empty directory: a user's Flax model on the digits held in
    memory, 20 rounds, test accuracy >= 0.8."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):readme.index("## A short tour")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own docs
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("test accuracy ")
    assert float(printed[-1].split()[-1]) >= 0.8
    assert list(tmp_path.iterdir()) == []  # in memory: nothing written


@pytest.mark.slow  # about 4 s; CI runs it
def test_fedjax_port_runs_on_a_small_stand_in(tmp_path, monkeypatch, digits):
    """docs/porting_from_fedjax.md's fedstream block, with the digits in place of EMNIST and 2 rounds."""
    blocks = python_blocks("porting_from_fedjax.md")
    assert len(blocks) == 1 and "sim.run(1500)" in blocks[0]
    code = (blocks[0].replace('"data/emnist"', repr(str(digits))).replace("(28, 28, 1), num_classes=62",
                                                                           "(8, 8, 1), num_classes=10")
            .replace("sim.run(1500)", "sim.run(2)"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/porting_from_fedjax.md", "exec"), {"__name__": "port"})  # noqa: S102 - our own docs
    assert (tmp_path / "checkpoints" / "emnist_fedavg" / "metrics.jsonl").exists()


# --- every shell command in the docs -------------------------------------------------------------------------------

PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def shell_commands(page: pathlib.Path) -> list[str]:
    """The `fedstream ...` commands of a page's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().rstrip("&").strip()
            quoted = re.search(r'"(fedstream [^"]*)"', line)  # e.g. inside gcloud ... --command "fedstream ..."
            if quoted:
                line = quoted.group(1)
            if line.startswith("fedstream "):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def resolve(argv: list[str]) -> None:
    """Parses a documented command as the CLI would and resolves its pipeline or recipe with its overrides."""
    from fedstream import cli
    from fedstream.config import apply_overrides, load_config, load_module

    rest, overrides = cli.split_overrides(argv)
    args = cli.build_parser().parse_args(rest)
    if args.command in ("train", "eval", "config") and args.pipeline and not (
            args.pipeline.endswith(".py") and not pathlib.Path(args.pipeline).exists()):
        # (not a user's own pipeline file that the page tells how to write, nor a workdir's stored config)
        load_config(args.pipeline, "fedstream.pipelines", overrides)
    elif args.command == "preprocess":
        apply_overrides(load_module(args.recipe, "preprocess").get_config(), overrides)


def test_every_documented_command_parses_and_resolves():
    """Flags, subcommands, pipeline and recipe names and every --config key of every documented command exist."""
    import shlex

    checked = 0
    for page in PAGES:
        for command in shell_commands(page):
            try:
                resolve(shlex.split(command)[1:])
            except (Exception, SystemExit) as e:  # noqa: BLE001 - report which command of which page
                raise AssertionError(f"{page.name}: {command!r}: {e!r}") from e
            checked += 1
    assert checked >= 15


@pytest.mark.slow  # about 10 s (preprocessing and training runs); CI runs it
def test_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/tutorial.md, every command in order, in a fresh directory; then what the page promises."""
    import json
    import shlex

    from fedstream import cli

    monkeypatch.chdir(tmp_path)
    commands = shell_commands(DOCS / "tutorial.md")
    assert [shlex.split(c)[1] for c in commands] == ["preprocess", "inspect", "train", "train", "train", "eval",
                                                      "plot"]
    outputs = []
    for command in commands:
        assert cli.main(shlex.split(command)[1:]) == 0, command
        outputs.append(capsys.readouterr().out)
    assert "resumed runs/fedadam from the checkpoint after round 10" in outputs[4]
    example = next(line for line in (DOCS / "tutorial.md").read_text().splitlines() if line.startswith("labels train"))
    assert example in outputs[1].splitlines()  # the inspect line the page shows
    for run in ("fedavg", "fedadam"):
        lines = [json.loads(x) for x in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines if x["kind"] == "train"] == list(range(1, 21))
    from matplotlib import image

    pixels = image.imread(tmp_path / "compare.png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels[..., :3].var() > 0.001  # not blank


@pytest.mark.slow  # the README's train command runs digits_fedavg's 200 rounds (~20-40 s on 2 cores)
def test_readme_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's tour commands (all but the two set-up lines, which .ci/run executes), in order."""
    import shlex

    from fedstream import cli

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)  # the user's own file that the arrays command reads
    np.savez(tmp_path / "mine.npz", x=rng.standard_normal((600, 4)).astype(np.float32), y=rng.integers(0, 5, 600))
    commands = [c for c in shell_commands(ROOT / "README.md") if "pip install" not in c]
    assert [shlex.split(c)[1] for c in commands] == ["preprocess", "preprocess", "preprocess", "inspect", "train"]
    for command in commands:
        assert cli.main(shlex.split(command)[1:]) == 0, command
    assert "final test accuracy" in capsys.readouterr().out


def load_benchmark(name: str):
    """A module from benchmarks/ (not a package: loaded by path, its folder on sys.path as when run)."""
    import importlib.util
    import sys

    folder = DOCS.parent / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_performance_page_matches_the_benchmark_results():
    report = load_benchmark("performance_report")
    assert report.main(["--check"]) == 0, "docs/performance.md is stale: run python benchmarks/performance_report.py"


def test_performance_report_takes_medians_over_runs_and_hides_paths(tmp_path):
    report = load_benchmark("performance_report")
    run_info = load_benchmark("run_info")
    command = run_info.public_command(["/somewhere/benchmarks/round_efficiency.py", "--data-dir", "/secret/d",
                                       "--json=/secret/r.jsonl", "--rounds", "3"])
    assert command == "python benchmarks/round_efficiency.py --data-dir DIR --json=FILE.jsonl --rounds 3"
    lines = []
    for i, (fed, lim) in enumerate([(2.0, 1.0), (3.0, 2.0), (9.0, 3.0)]):
        lines.append({"model": "cnn", "clients_per_round": 10, "steps_per_round": 90, "fedstream_median_s": fed,
                      "limit_median_s": lim, "ratio": fed / lim, "fedstream_ms_per_step": fed / 90 * 1e3,
                      "data_wait_median_s": 0.0, "paired_ratio_median": fed / lim,
                      "run": {"date": f"2026-12-0{i + 1} 10:00 UTC", "command": command, "machine": "2 CPU cores",
                              "versions": {"jax": "0.10.2"}, "load_average_at_start": 1.0}})
    (tmp_path / "round_efficiency.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in lines)
                                                     + '{"unstamped": true}\n')
    doc = "x\n<!-- BEGIN GENERATED round_limit -->\nold\n<!-- END GENERATED round_limit -->\ny\n"
    out = report.render(doc, tmp_path)
    row = next(line for line in out.splitlines() if line.startswith("| cnn"))
    # fedstream 3.0 (2.0-9.0), limit 2.0 (1.0-3.0), ratio median of (2.0, 1.5, 3.0) = 2.0 over 3 runs.
    assert row.split(" | ")[2:7] == ["3", "90", "3 (2–9)", "2 (1–3)", "**2.00 (1.50–3.00)**"]
    assert "Measured 2026-12-01 10:00 UTC to 2026-12-03 10:00 UTC; 3 invocations" in out and "/secret" not in out
    assert out.startswith("x\n") and out.endswith("y\n") and "old" not in out
