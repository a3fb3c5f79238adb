"""The researcher's surface: --help on every command, `fedstream list`, `fedstream eval` of a saved checkpoint."""

import json
import pathlib

import pytest

from fedstream.cli import build_parser, main

COMMANDS = ("preprocess", "inspect", "train", "eval", "config", "plot", "list")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command}" in out or f"  {command}  " in out, command


def test_version_prints_the_package_version(capsys):
    import fedstream

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedstream {fedstream.__version__}"


@pytest.mark.parametrize("argv", [[], ["--traceback"]])
def test_bare_command_prints_the_whole_help_as_a_usage_error(argv, capsys):
    """No COMMAND: the full help (not argparse's one-line error), on stderr, with argparse's usage-error status 2."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: fedstream")
    for command in COMMANDS:
        assert f"    {command}" in captured.err, command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_useful_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fedstream {command}")
    assert "examples:" in out and f"fedstream {command} " in out.split("examples:")[1]
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 10, description  # a sentence, not just a title


def test_parser_has_no_command_without_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    assert all(action.help for action in sub._choices_actions)


def test_list_shows_recipes_pipelines_models_algorithms(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    sections = {block.split(" (")[0]: block for block in out.strip().split("\n\n")}
    assert list(sections) == ["recipes", "pipelines", "models", "algorithms", "optimizers"]
    assert "  digits " in sections["recipes"] and "embedded 8x8" in sections["recipes"]
    assert "  arrays " in sections["recipes"] and "  synthetic " in sections["recipes"]
    assert "  digits_fedavg " in sections["pipelines"]
    for model in ("logistic", "mlp", "cnn"):
        line = next(line for line in sections["models"].splitlines() if line.startswith(f"  {model} "))
        assert len(line.split()) > 3, line  # name plus a description
    assert "  fedavg " in sections["algorithms"]
    for optimizer in ("sgd", "adam", "yogi", "adagrad"):
        assert f"  {optimizer} " in sections["optimizers"]
    assert not any(line.lstrip().startswith("_") for line in out.splitlines())  # no private modules


def test_list_one_section_and_unknown_section(capsys):
    assert main(["list", "models"]) == 0
    assert capsys.readouterr().out.startswith("models (config key model.name):")
    assert main(["list", "widgets"]) == 2
    assert "unknown section 'widgets'" in capsys.readouterr().err


def test_commands_without_config_refuse_overrides():
    with pytest.raises(SystemExit, match="takes no --config"):
        main(["list", "--config.seed=1"])


# --------------------------------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A 2-round digits run: (workdir, data path)."""
    root = tmp_path_factory.mktemp("eval")
    data = digits
    workdir = root / "run"
    assert main(["train", "digits_fedavg", "--workdir", str(workdir), "--config.num_rounds=2", "--config.eval.every=1",
                 f"--config.data.path={data}"]) == 0
    return workdir, data


def _eval(capsys, workdir, data, *extra):
    """Runs `fedstream eval` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["eval", "digits_fedavg", "--workdir", str(workdir), f"--config.data.path={data}", *map(str, extra)])
    out, err = capsys.readouterr()
    return code, out, err


def _eval_json(capsys, workdir, data, *extra):
    code, out, err = _eval(capsys, workdir, data, "--json", *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(pathlib.Path(directory).rglob("*"))}


def _logged_eval(workdir, round_index):
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in logged if r["kind"] == "eval" and r["round"] == round_index][0]


def test_eval_latest_matches_the_runs_final_eval_and_reads_only(trained, capsys):
    workdir, data = trained
    in_progress = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"  # as a live run's pending save
    in_progress.mkdir()
    before = _snapshot(workdir)
    result = _eval_json(capsys, workdir, data, "--config.eval.batch_size=32")  # eval.* may differ from the run
    final = _logged_eval(workdir, 2)
    assert result["round"] == 2 and result["split"] == "test"
    for key in ("loss", "accuracy", "client_mean_accuracy", "num_clients", "num_examples"):
        assert result[key] == pytest.approx(final[key], rel=1e-5), key
    assert _snapshot(workdir) == before  # nothing written, the pending save's directory not cleaned up
    in_progress.rmdir()
    code, out, _ = _eval(capsys, workdir, data)
    assert code == 0 and out.strip().splitlines()[-1].startswith(f"{workdir} after round 2, split 'test': accuracy")


def test_eval_other_split_and_step(trained, capsys):
    workdir, data = trained
    first = _eval_json(capsys, workdir, data, "--split", "train", "--step", "1")
    assert first["round"] == 1 and first["split"] == "train"
    assert first["num_examples"] > 1000  # the train split, not the 396 test examples
    test_round1 = _eval_json(capsys, workdir, data, "--step", "1")
    assert test_round1["accuracy"] == pytest.approx(_logged_eval(workdir, 1)["accuracy"], rel=1e-5)


def test_eval_errors_are_one_line(trained, capsys, tmp_path):
    workdir, data = trained
    cases = [
        ((workdir, "--step", "9"), "no checkpoint of step 9; kept steps: 1, 2"),
        ((workdir, "--split", "validation"), "has no split 'validation' (splits: test, train)"),
        ((workdir, "--config.client.learning_rate=0.5"), "config key 'client.learning_rate' is 0.5 but the run"),
        ((workdir, "--config.client.batch_size=0"), "config key 'client.batch_size' must be an integer >= 1"),
        ((tmp_path / "nothing",), "no checkpoints/ directory"),
    ]
    for (where, *extra), message in cases:
        code, _, err = _eval(capsys, where, data, *extra)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("fedstream: error: "), (extra, err)
        assert message in err, (extra, err)
    assert not (tmp_path / "nothing").exists()
