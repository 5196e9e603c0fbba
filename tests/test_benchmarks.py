"""Every benchmark runs in its CI-sized form (--small), so none of them rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# What each benchmark must print: the figure it exists for.
EXPECTED = {
    "edit_vs_lora.py": "ratio edit / LoRA",
    "edit_vs_trl.py": "locedit all",
    "mc_speed.py": "prompt shared by its choices",
    "multi_edit.py": "largest parameter difference",
    "ref_precompute.py": "speed-up",
    "gpu_7b.py": "tokens/s",
    "gpu_check.py": "gpu check summary",
    "real_model.py": "from the cache",
    "processes.py": "study tables identical: True",
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_runs_small(script):
    result = subprocess.run(
        [sys.executable, script, "--small"], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED[script] in result.stdout


def test_every_benchmark_is_run_by_a_test():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py"}
    tested_here = set(EXPECTED)
    # Benchmarks of other stages are run by their own stage's tests; they name themselves in a test file.
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = {s for s in scripts - tested_here if s not in tests}
    assert not untested, f"benchmarks no test runs: {sorted(untested)}"
