"""The chaos resume benchmark as a test: a run SIGKILLed 8 times ends bit-identical (slow).

The hook kills are placed by events (the train loop's FEDSTREAM_FAULT hook at
a round) and each timed kill (SIGKILL after a random delay) carries a
kill_after_round backstop, so every launch but the last is killed whatever the
machine's speed, and the count of each hook kind is fixed by the seed. Whether
the timer or the backstop kills a timed launch depends on speed, so only their
sum is checked.
"""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "chaos_resume.py"
HOOK_KINDS = ("kill_in_data", "kill_in_round", "kill_during_save", "kill_after_round")
KILLS = 8


def summary(stdout: str) -> dict:
    """The benchmark's `SUMMARY {json}` line."""
    lines = [line for line in stdout.splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0][len("SUMMARY "):])


@pytest.mark.slow
def test_random_sigkills_then_resume_end_bit_identical(tmp_path):
    # Timed kills wait 0.5-10 s (start-up, restore, compilation and the first rounds on 2 cores); the reference
    # run goes alongside the chaos launches: ~70-90 s instead of ~95 s on 2 idle cores.
    result = subprocess.run([sys.executable, str(SCRIPT), "--kills", str(KILLS), "--rounds", "30", "--seed", "3",
                             "--max-delay", "10", "--reference-alongside", "--workdir", str(tmp_path)],
                            check=False, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RESULT: bit-identical" in result.stdout
    found = summary(result.stdout)
    assert found["identical"] and found["all_delivered"], found
    # Exactly KILLS kills, one per launch but the last; each hook kind at least once (seed 3 schedules every
    # kind in its first five kills), every scheduled kill delivered as its kind.
    assert found["kills_delivered"] == found["kills_scheduled"] == KILLS and found["launches"] == KILLS + 1, found
    for kind in HOOK_KINDS:
        assert found["delivered"].get(kind, 0) == found["scheduled"][kind] >= 1, (kind, found)
    timed = found["delivered"].get("timed", 0) + found["delivered"].get("timed_backstop", 0)
    assert timed == found["scheduled"]["timed"] >= 1, found
