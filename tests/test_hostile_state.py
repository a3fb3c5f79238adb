"""Damaged run state (#16): every byte of a checkpoint checked, one line per failure, nothing lost.

A checkpoint's JSON meta is sealed by its own sha256 (`integrity.meta_sha256`),
per-client state files by theirs, a DP ledger by the epsilon saved with it.
Each damage below is refused naming the step, and `--resume-last-good` sets
each damaged step aside with one line and finishes the run from the newest
intact one. The slow fuzz flips every bit of a saved meta file.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from fedstream.training.checkpoint import (FORMAT_KEY, INTEGRITY_KEY, CheckpointCorrupted, RunCheckpointer,
                                           check_meta, meta_digest)
from support import run_cli


def meta_file(workdir: pathlib.Path, step: int) -> pathlib.Path:
    return workdir / "checkpoints" / str(step) / "meta" / "metadata"


def flip_bit_at(path: pathlib.Path, needle: str, offset: int, bit: int, after: str = "") -> str:
    """Flips `bit` of the byte `offset` characters into the first occurrence of `needle` (after the first of
    `after`); returns the text `needle` became."""
    data = bytearray(path.read_bytes())
    at = data.index(needle.encode(), data.index(after.encode())) + offset
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))
    return data[at - offset: at - offset + len(needle)].decode(errors="replace")


def train(workdir: pathlib.Path, data: pathlib.Path, pipeline: str, rounds: int, *extra: str):
    return run_cli("train", pipeline, "--workdir", workdir, f"--config.data.path={data}",
                   f"--config.num_rounds={rounds}", "--config.eval.every=0", *extra)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def train_rounds(workdir: pathlib.Path) -> list[int]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["round"] for row in rows if row["kind"] == "train"]


# --- the meta item: sealed, a missing or renamed key cannot unseal it ---------------------------------------------


def save_steps(directory: pathlib.Path, steps=(1, 2), **meta) -> tuple[RunCheckpointer, dict]:
    state = {"w": np.linspace(0, 1, 64, dtype=np.float32), "round": np.array(2, np.int32)}
    checkpointer = RunCheckpointer(directory, keep=5)
    for step in steps:
        checkpointer.save(step, state, {"config": {"lr": 0.1}, "round": step, "seed": 0,
                                        "data_iterator": {"next_round": step}, **meta})
    checkpointer.wait()
    return checkpointer, state


def test_meta_is_sealed_and_an_older_versions_meta_is_accepted_as_legacy(tmp_path):
    checkpointer, state = save_steps(tmp_path)
    meta = json.loads(meta_file(tmp_path, 2).read_text())
    first = json.loads(meta_file(tmp_path, 1).read_text())
    assert meta[FORMAT_KEY] == 2 and check_meta(meta) is True
    assert meta[INTEGRITY_KEY]["meta_sha256"] == meta_digest(meta)
    # An older version's meta (no format, no meta digest, only the keys it wrote) passes, marked legacy.
    legacy = {k: v for k, v in first.items() if k != FORMAT_KEY}
    legacy[INTEGRITY_KEY] = {"state_sha256": first[INTEGRITY_KEY]["state_sha256"]}
    meta_file(tmp_path, 1).write_text(json.dumps(legacy))
    checkpointer.restore(1, state)
    assert checkpointer.legacy_steps == {1}
    # Taking the digest (or the state digest) away, or renaming the format key, is damage.
    for damaged in ({**meta, INTEGRITY_KEY: {"state_sha256": meta[INTEGRITY_KEY]["state_sha256"]}},
                    {**meta, INTEGRITY_KEY: {"meta_sha256": meta[INTEGRITY_KEY]["meta_sha256"]}},
                    {**{k: v for k, v in meta.items() if k != FORMAT_KEY}, "checkpoint_formas": 2},
                    {**legacy, INTEGRITY_KEY: {"state_sha257": meta[INTEGRITY_KEY]["state_sha256"]}}):
        meta_file(tmp_path, 2).write_text(json.dumps(damaged))
        with pytest.raises(CheckpointCorrupted, match=r"checkpoint of round 2 .*2/meta"):
            checkpointer.restore(2, state)
    checkpointer.close()


@pytest.mark.parametrize("needle, offset, bit", [
    ('"next_round": 2', 14, 0),   # the data iterator's position: 2 -> 3
    ('"state_sha256"', 1, 5),     # the key name: "State_sha256"
    ('"meta_sha256"', 3, 0),      # the digest's own key name: "meua_sha256"
    ('"lr": 0.1', 8, 1),          # a config value: 0.1 -> 0.3
])
def test_one_flipped_bit_in_the_meta_is_refused_naming_the_step(tmp_path, needle, offset, bit):
    checkpointer, state = save_steps(tmp_path)
    flip_bit_at(meta_file(tmp_path, 2), needle, offset, bit)
    with pytest.raises(CheckpointCorrupted, match=r"^checkpoint of round 2 \(.*2/meta\) is corrupted: ") as error:
        checkpointer.read_meta(2)
    assert "\n" not in str(error.value)
    checkpointer.restore(1, state)  # the previous step is untouched
    checkpointer.close()


# --- a DP run: meta flips, a missing state file, a re-sealed ledger; --resume-last-good ------------------------------


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, digits) -> pathlib.Path:
    """digits_dp_fedavg (noise 0.3) after 5 rounds, every checkpoint kept."""
    workdir = tmp_path_factory.mktemp("dp") / "run"
    result = train(workdir, digits, "digits_dp_fedavg", 5, "--config.checkpoint.keep=5")
    assert result.returncode == 0, result.stderr
    return workdir


def test_each_damaged_step_is_refused_then_set_aside_with_one_line_and_the_run_completes(tmp_path, dp_run, digits):
    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    # Step 5: a bit of the key name `state_sha256`; 4: the ledger's noise 0.3 -> 0.7 (the epsilon cut);
    # 3: the data iterator's position; 2: a state file missing. Step 1 is intact.
    assert flip_bit_at(meta_file(run, 5), '"state_sha256"', 3, 1) == '"stcte_sha256"'
    assert flip_bit_at(meta_file(run, 4), '"noise_multiplier": 0.3', 22, 2, after='"privacy"') == \
        '"noise_multiplier": 0.7'
    assert flip_bit_at(meta_file(run, 3), '"next_round": 3', 14, 2) == '"next_round": 7'
    (run / "checkpoints" / "2" / "state" / "_METADATA").unlink()

    refused = train(run, digits, "digits_dp_fedavg", 6)
    assert refused.returncode == 2
    line = one_line(refused.stderr)
    assert line.startswith("fedstream: error: checkpoint of round 5 (") and "5/meta) is corrupted" in line
    assert "--resume-last-good" in line and "rounds 1, 2, 3, 4 are on disk" in line
    checkpointer = RunCheckpointer(run)
    for step in (4, 3):
        with pytest.raises(CheckpointCorrupted, match=rf"^checkpoint of round {step} .*the metadata's sha256 differs"):
            checkpointer.read_meta(step)
    checkpointer.close()

    resumed = train(run, digits, "digits_dp_fedavg", 6, "--resume-last-good")
    assert resumed.returncode == 0, resumed.stderr
    # No Orbax/TensorStore logs, no tracebacks (dp-accounting may warn about RDP orders it leaves out).
    assert all("_compute_log_a_frac failed to converge" in line for line in resumed.stderr.splitlines())
    lines = resumed.stdout.splitlines()
    set_aside = [line for line in lines if " is corrupted: " in line]
    assert [line.split()[3] for line in set_aside] == ["5", "4", "3", "2"]
    assert "5/meta) is corrupted: the metadata lacks its state_sha256" in set_aside[0]
    assert "the metadata's sha256 differs" in set_aside[1] and "2/state) is corrupted" in set_aside[3]
    assert all("; moved to " in line and "corrupted_checkpoints" in line for line in set_aside)
    assert lines[len(set_aside)] == f"resumed {run} from the checkpoint after round 1"
    assert not any("Traceback" in line or "WARNING" in line for line in lines)
    assert sorted(p.name.split("-")[0] for p in (run / "corrupted_checkpoints").iterdir()) == ["2", "3", "4", "5"]
    assert train_rounds(run) == [1, 2, 3, 4, 5, 6]
    epsilons = [json.loads(line).get("dp_epsilon") for line in (run / "metrics.jsonl").read_text().splitlines()]
    epsilons = [e for e in epsilons if e is not None]
    assert epsilons == sorted(epsilons) and len(epsilons) == 6  # never decreasing


def test_a_tampered_ledger_that_is_re_sealed_is_refused_by_its_epsilon(tmp_path, dp_run, digits):
    """Even with a correct meta digest, the ledger must reproduce the epsilon saved with it."""
    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    path = meta_file(run, 5)
    meta = json.loads(path.read_text())
    for segment in meta["privacy"]["segments"]:
        segment["mechanism"]["noise_multiplier"] = 0.7
    meta["privacy"]["mechanism"]["noise_multiplier"] = 0.7
    meta[INTEGRITY_KEY]["meta_sha256"] = meta_digest(meta)
    path.write_text(json.dumps(meta))
    assert check_meta(meta)
    refused = train(run, digits, "digits_dp_fedavg", 6)
    line = one_line(refused.stderr)
    assert refused.returncode == 2 and line.startswith("fedstream: error: checkpoint of round 5 (")
    assert "its privacy ledger gives epsilon" in line and "was recorded with it (the ledger was altered)" in line


def test_epsilon_falling_between_rounds_stops_the_run(monkeypatch, digits, tmp_path):
    from fedstream.algorithms.privacy import PrivacyLedger, PrivacyLedgerError

    monkeypatch.setattr(PrivacyLedger, "epsilon", lambda self, delta=None: 10.0 - self.rounds)
    from fedstream.config import load_config
    from fedstream.training.train import train as train_api

    config = load_config("digits_dp_fedavg", "fedstream.pipelines",
                         [f"data.path={digits}", "num_rounds=2", "eval.every=0"])
    with pytest.raises(PrivacyLedgerError, match=r"^round 2: the privacy ledger's epsilon fell from 9.0 to 8.0; .*"
                                                 r"checkpoint of round 1 is intact"):
        train_api(config, tmp_path / "run", log=lambda _: None)


# --- per-client state files ---------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_client_state_file_is_refused_and_resume_last_good_recovers(tmp_path, digits):
    run = tmp_path / "run"
    assert train(run, digits, "digits_topk", 3).returncode == 0
    meta = json.loads(meta_file(run, 3).read_text())
    assert set(meta[INTEGRITY_KEY]["client_files"]) >= {"round-00000003.states"}
    damaged = run / "client_state" / "round-00000003.states"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))

    refused = train(run, digits, "digits_topk", 4)
    line = one_line(refused.stderr)
    assert refused.returncode == 2
    assert line.startswith(f"fedstream: error: checkpoint of round 3 ({damaged}) is corrupted: the client-state "
                           "file's sha256 differs")
    resumed = train(run, digits, "digits_topk", 4, "--resume-last-good")
    assert resumed.returncode == 0 and resumed.stderr == ""
    lines = resumed.stdout.splitlines()
    assert lines[0].startswith(f"checkpoint of round 3 ({damaged}) is corrupted") and "; moved to " in lines[0]
    assert lines[1] == f"resumed {run} from the checkpoint after round 2"
    assert train_rounds(run) == [1, 2, 3, 4]


# --- a round in which every client was non-finite -----------------------------------------------------------------


def test_a_round_with_every_client_non_finite_stops_the_run_naming_it(tmp_path, digits):
    run = tmp_path / "run"
    result = train(run, digits, "digits_fedavg", 4, "--config.client.learning_rate=1e6")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("fedstream: error: round 2: all 10 clients sent non-finite (NaN/Inf) updates and were "
                           "skipped") and "the checkpoint of round 1 is intact" in line
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["clients"] + rows[0]["nonfinite_clients_skipped"] == 10
    progress = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    if rows[0]["nonfinite_clients_skipped"]:
        assert f"{rows[0]['nonfinite_clients_skipped']} non-finite clients skipped" in progress[0]


def test_progress_line_names_skipped_clients_and_is_never_throttled_away():
    from fedstream.training.metrics_log import Progress

    lines: list[str] = []
    progress = Progress(10, 0, every_secs=3600, emit=lines.append)
    progress.update(1, 100, {"loss": 1.0, "accuracy": 0.5, "nonfinite_clients_skipped": 0})  # the first line
    progress.update(2, 100, {"loss": 1.0, "accuracy": 0.5, "nonfinite_clients_skipped": 0})  # throttled
    progress.update(3, 100, {"loss": 1.0, "accuracy": 0.5, "nonfinite_clients_skipped": 4})  # printed anyway
    assert len(lines) == 2 and lines[1].startswith("round 3/10") and "| 4 non-finite clients skipped" in lines[1]
    assert "skipped" not in lines[0]


# --- slow: every bit of a saved meta file --------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_every_bit_flip_of_a_meta_file_is_refused_or_reads_back_identically(tmp_path, dp_run):
    """Each single-bit flip of a DP run's meta file either reads back equal to the saved meta or is refused."""
    path = meta_file(dp_run, 5)
    original = path.read_bytes()
    expected = json.loads(original)
    work = tmp_path / "run"
    shutil.copytree(dp_run / "checkpoints" / "5", work / "checkpoints" / "5")
    target = meta_file(work, 5)
    checkpointer = RunCheckpointer(work)
    counts = {"refused": 0, "identical": 0}
    flips = [(i, b) for i in range(len(original)) for b in range(8)]
    for i, b in flips:
        data = bytearray(original)
        data[i] ^= 1 << b
        target.write_bytes(bytes(data))
        try:
            meta = checkpointer.read_meta(5)
        except CheckpointCorrupted:
            counts["refused"] += 1
            continue
        assert meta == expected, f"byte {i} bit {b}: accepted with a changed value"
        counts["identical"] += 1
    checkpointer.close()
    print(f"meta fuzz: {len(flips)} single-bit flips of a {len(original)}-byte meta: {counts}")
    assert sum(counts.values()) == len(flips) == 8 * len(original)
