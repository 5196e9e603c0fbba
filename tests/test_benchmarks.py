"""Every benchmark runs in its CI-sized form (--small), so none of them rots, and shows what it can of the figure it
exists for at that size: equal results always (each script also exits 1 when its results differ beyond its stated
tolerance), and a ratio above 1 only where the small work is large enough for it to hold on 2 shared CPU cores.
Elsewhere a ratio is only checked to be a positive finite number: the ratios noted below are those seen in 3-6
runs of each --small form on 2 cores shared with other work (2026-12-07)."""

from __future__ import annotations

import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
# What each benchmark must print; CHECKS below reads their figures.
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
    "tracking.py": "report_to trackio",
}


def figures(pattern: str, out: str, count: int) -> list[float]:
    """The numbers `pattern`'s groups (of NUMBER's form) capture in `out`, in order: `count` of them."""
    matches = re.findall(pattern, out, re.MULTILINE)
    values = [float(v) for match in matches for v in (match if isinstance(match, tuple) else (match,))]
    assert len(values) == count, f"{pattern!r}: {len(values)} matches, not {count}, in:\n{out[-4000:]}"
    return values


def positive(values: list[float]) -> None:
    assert all(math.isfinite(v) and v > 0 for v in values), values


def check_edit_vs_lora(out: str) -> None:
    # The claim is parity (edit / LoRA <= 1.05 on the 4-layer model), and the small steps of ~20 ms swing with the
    # shared cores (0.41-1.18 seen): nothing but a ratio to check. Edit and LoRA train different parameters.
    positive(figures(rf"^ratio edit / LoRA\s*:\s*{NUMBER}", out, 1))


def check_edit_vs_trl(out: str) -> None:
    # locedit's default against TRL + PEFT LoRA, per edit (all, random:2, L1H0), 5 steps of 9-35 ms each: 1.20-6.22x
    # seen; while other work shared the cores one edit's could fall to 1.20x (L1H0), the median of the three not
    # below 1.83x. So the median above 1, each ratio positive.
    ratios = figures(rf"^\s+locedit all\s+{NUMBER}\s+{NUMBER}x", out, 3 * 2)[1::2]
    positive(ratios)
    assert statistics.median(ratios) > 1, ratios
    # The exact variants train TRL's batches, so the same edit (7e-09-1e-07 seen).
    assert all(d < 1e-4 for d in figures(rf"^\s+largest edit difference, .* vs none: {NUMBER}$", out, 3))


def check_mc_speed(out: str) -> None:
    none, iti = figures(rf"prompt shared by its choices:\s*{NUMBER} s \({NUMBER}x\)", out, 2 * 2)[1::2]
    # ITI's prompt (an instruction and six Q/A examples) shared by 58 choices: 2.96-3.58x seen. The bare Q/A
    # prompt is short and its two timings are 0.06-0.13 s: 0.88-2.54x seen, so only a ratio.
    assert iti > 1
    positive([none])
    assert all(d < 1e-3 for d in figures(rf"largest score difference\s*:\s*{NUMBER}", out, 2))


def check_multi_edit(out: str) -> None:
    # 2 edits in one run against 2 runs: each run's fixed cost (loading, data, the trainer) is paid once, 1.82-2.72x.
    (speedup,) = figures(rf"^speed-up\s*:\s*{NUMBER}x", out, 1)
    assert speedup > 1
    (difference,) = figures(rf"^largest parameter difference, one run vs separate runs: {NUMBER}$", out, 1)
    assert difference < 1e-4


def check_ref_precompute(out: str) -> None:
    # Two epochs of 94 pairs: the precompute pays off by a step's reference pass, a small share of a tiny model's
    # step (1.01-1.19x seen; 1.20x on the 4-layer model), so only a ratio.
    positive(figures(rf"^speed-up\s*:\s*{NUMBER}x", out, 1))
    (difference,) = figures(rf"^largest edit difference\s*:\s*{NUMBER}$", out, 1)
    assert difference < 1e-4


def check_gpu_7b(out: str) -> None:
    # On a CPU there is no MFU or peak memory to report: the six rows (3 edits, with and without checkpointing).
    rows = re.findall(r"^\s*(\S+)\s+(True|False)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+n/a\s+n/a$", out, re.MULTILINE)
    assert [(r[0], r[1]) for r in rows] == [(s, c) for s in ("random:1", "random:4", "all") for c in ("False", "True")]
    positive([float(r[3]) for r in rows] + [float(r[4]) for r in rows])


def check_gpu_check(out: str) -> None:
    # The summary table: the sections that need CUDA or 2 GPUs are skipped, the others ran, and where they compare
    # results (multi_edit, generation, probes) the results agree.
    rows = re.findall(r"^\| (\w+) \| ([^|]+?) \| [\d.]+ \(\d+\) \|(.*)\|$", out, re.MULTILINE)
    table = {name: (status, cells) for name, status, cells in rows}
    assert set(table) == {"train", "paged_adamw", "multi_edit", "generation", "probes", "nf4", "processes"}, table
    for name in ("train", "multi_edit", "generation", "probes"):
        assert table[name][0] == "ok", (name, table[name])
    for name in ("paged_adamw", "nf4", "processes"):
        assert table[name][0].startswith("skipped"), (name, table[name])
    assert ", within 1.0e-04;" in table["multi_edit"][1]
    assert "identical tokens: True" in table["generation"][1]
    within, timed = re.search(r"within one point on (\d+)/(\d+) heads", table["probes"][1]).groups()
    assert within == timed


def check_real_model(out: str) -> None:
    (difference, largest) = figures(
        rf"largest activation difference\s*:\s*{NUMBER} \(largest value {NUMBER}\)", out, 2
    )
    assert difference <= 1e-5 * largest
    # Stopping at the last projection saves half a layer of 2 and one LM-head position: 0.83-1.36x seen, only a ratio.
    positive(figures(rf"stopped at the last projection\s*:\s*{NUMBER} ms/example \({NUMBER}x\)", out, 2)[1::2])
    # The reference pass over the 24 pairs a 3-step run uses against all 525 pairs, cold and from the cache:
    # 22 times less work, 6.1-13.3x seen.
    assert all(r > 1 for r in figures(rf"^\s+the .*: +{NUMBER} s \({NUMBER}x\)$", out, 2 * 2)[1::2])


def check_processes(out: str) -> None:
    # The tables are identical (EXPECTED; the script exits 1 otherwise). Two processes on the 2 shared cores of CI
    # against one, at this size (6 edits in 4 families): only positive speed-ups to check; the figures are
    # benchmarks/README.md's.
    positive(figures(rf"^\| \w+ \| {NUMBER} \| {NUMBER} \|", out, 6 * 2))
    positive(figures(rf"^whole command: 1 process {NUMBER} s, 2 processes {NUMBER} s", out, 2))


def check_tracking(out: str) -> None:
    # Five steps of the small model on shared cores swing more than logging costs: only the times to check; the
    # shares are benchmarks/README.md's.
    positive(figures(rf"^report_to (?:none|trackio|wandb) *: +{NUMBER} ms/step", out, 3))


CHECKS = {
    "edit_vs_lora.py": check_edit_vs_lora,
    "edit_vs_trl.py": check_edit_vs_trl,
    "mc_speed.py": check_mc_speed,
    "multi_edit.py": check_multi_edit,
    "ref_precompute.py": check_ref_precompute,
    "gpu_7b.py": check_gpu_7b,
    "gpu_check.py": check_gpu_check,
    "real_model.py": check_real_model,
    "processes.py": check_processes,
    "tracking.py": check_tracking,
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_runs_small(script):
    result = subprocess.run(
        [sys.executable, script, "--small"], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED[script] in result.stdout
    if script in CHECKS:
        CHECKS[script](result.stdout)


def test_every_benchmark_is_run_by_a_test():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py"}
    tested_here = set(EXPECTED)
    # Benchmarks of other stages are run by their own stage's tests; they name themselves in a test file.
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = {s for s in scripts - tested_here if s not in tests}
    assert not untested, f"benchmarks no test runs: {sorted(untested)}"
