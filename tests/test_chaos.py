"""The chaos resume benchmark as a test: a run SIGKILLed at random moments ends bit-identical (slow)."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "chaos_resume.py"


@pytest.mark.slow
def test_random_sigkills_then_resume_end_bit_identical(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--kills", "8", "--rounds", "30", "--seed", "3",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RESULT: bit-identical" in result.stdout
    assert "kills delivered: 8" in result.stdout
