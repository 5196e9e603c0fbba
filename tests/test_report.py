"""The report's statistics on synthetic results with known answers, and its table and figures."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import yaml

from locedit.evaluation.breakage import Breakage
from locedit.report import main
from locedit.reporting import find_runs, paired_bootstrap, permutation_p_value, verdict

QUESTIONS = 80


def fake_run(
    root: Path,
    name: str,
    method: str,
    family: str,
    spec: str,
    seed: int,
    truth: float,
    info: float,
    tau: float = 0.1,
    alpha: float | None = None,
    rng_seed: int = 0,
    verdicts=None,
) -> Path:
    """A finished, evaluated run directory whose answers are truthful/informative with the given rates."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    rng = random.Random(rng_seed)
    verdicts = verdicts or [(rng.random() < truth, rng.random() < info) for _ in range(QUESTIONS)]
    true = sum(t for t, _ in verdicts) / QUESTIONS
    informative = sum(i for _, i in verdicts) / QUESTIONS
    if method != "base":
        (run / "heads.json").write_text(json.dumps({"spec": spec, "heads_seed": seed, "family": family}))
        (run / "recipe.yaml").write_text(yaml.safe_dump({"beta": tau, "learning_rate": 5e-4}))
        finished = {"method": "iti", "iti_alpha": alpha} if method == "iti" else {"train_loss": 1.0}
        (run / "metrics.json").write_text(json.dumps(finished))
    metrics = {
        "true": true,
        "info": informative,
        "true_info": true * informative,
        "mc1": truth / 2,
        "mc2": truth / 2,
        "kl": 1 - truth,
        "ce": 3.0,
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    lines = [json.dumps({"question_id": q, "truthful": t, "informative": i}) for q, (t, i) in enumerate(verdicts)]
    (run / "eval" / "generations.jsonl").write_text("\n".join(lines) + "\n")
    return run


def study(root: Path, probe_truth: float, random_truth: float, probe_sets: int = 6) -> Path:
    """Probe and random head sets under both methods, all heads, single heads and the base model."""
    fake_run(root, "base", "base", "base", "none", 0, 0.3, 0.9, rng_seed=999)
    fake_run(root, "all", "ipo", "all-heads", "all", 0, 0.9, 0.9, rng_seed=1)
    for method in ("ipo", "iti"):
        for s in range(probe_sets):
            fake_run(
                root,
                f"{method}-probe-{s}",
                method,
                "probe-16",
                f"probe:16@{s}",
                s,
                probe_truth,
                0.9,
                alpha=15.0,
                rng_seed=100 + s,
            )
        for s in range(16):
            fake_run(
                root,
                f"{method}-random-{s}",
                method,
                "random-16",
                "random:16",
                s,
                random_truth,
                0.9,
                alpha=15.0,
                rng_seed=200 + s,
            )
    for s in range(6):
        fake_run(root, f"single-{s}", "ipo", "single-head", "random:1", s, 0.5, 0.9, rng_seed=300 + s)
    return root


def test_a_clearly_better_family_gets_a_small_p_value_and_identical_ones_a_large_one(tmp_path):
    better = verdict(find_runs([str(study(tmp_path / "better", probe_truth=0.9, random_truth=0.4))]))
    same = verdict(find_runs([str(study(tmp_path / "same", probe_truth=0.6, random_truth=0.6))]))
    for method in ("ipo", "iti"):
        assert better["probe_vs_random"][method]["p_value"] < 0.01
        assert same["probe_vs_random"][method]["p_value"] > 0.1


def test_random_single_heads_are_random_head_sets_against_the_probes(tmp_path):
    """random:1 edits (their family is single-head) are random head sets: the probe's heads are tested against
    them."""
    fake_run(tmp_path, "probe", "ipo", "probe-1", "probe:1", 0, 0.9, 0.9, rng_seed=1)
    for s in range(5):
        fake_run(tmp_path, f"random-{s}", "ipo", "single-head", "random:1", s, 0.4, 0.9, rng_seed=10 + s)
    result = verdict(find_runs([str(tmp_path)]))["probe_vs_random"]["ipo"]
    assert len(result["probe"]) == 1 and len(result["random"]) == 5
    assert result["p_value"] == pytest.approx(1 / 6)


def test_permutation_p_value_matches_hand_computations():
    # One treated value above all of n control values: exactly 1/(n+1), the smallest p such a design allows.
    assert permutation_p_value([20.0], [float(i) for i in range(16)]) == pytest.approx(1 / 17)
    # Treated in the middle: the fraction of labelings at least as extreme.
    assert permutation_p_value([2.0], [1.0, 3.0, 4.0]) == pytest.approx(3 / 4)
    # Two of four: C(4,2)=6 labelings, only {3, 4} is as extreme as the observed {3, 4}.
    assert permutation_p_value([3.0, 4.0], [1.0, 2.0]) == pytest.approx(1 / 6)


def test_paired_bootstrap_tells_reaching_the_optimum_from_falling_short(tmp_path):
    rng = random.Random(5)
    shared = [(rng.random() < 0.9, rng.random() < 0.9) for _ in range(QUESTIONS)]
    optimum = fake_run(tmp_path, "all", "ipo", "all-heads", "all", 0, 0, 0, verdicts=shared)
    twin = fake_run(tmp_path, "twin", "ipo", "random-16", "random:16", 0, 0, 0, verdicts=shared)
    worse = fake_run(tmp_path, "worse", "ipo", "random-16", "random:16", 1, 0.3, 0.9, rng_seed=7)
    runs = {Path(r.run_dir).name: r for r in find_runs([str(tmp_path)])}
    difference, low, high = paired_bootstrap(runs["twin"], runs["all"])
    assert difference == 0 and low == 0 and high == 0  # the same answers: no difference in any resample
    difference, low, high = paired_bootstrap(runs["worse"], runs["all"])
    assert difference < 0 and high < 0
    result = verdict(list(runs.values()))["reaches_all_heads"]["random-16"]
    assert (result["sets"], result["reaching"]) == (2, 1)
    assert optimum and twin and worse


def test_best_over_hyperparameters_is_the_head_sets_score(tmp_path):
    fake_run(tmp_path, "p-tau1", "ipo", "probe-16", "probe:16", 0, 0.2, 0.9, tau=0.1, rng_seed=1)
    fake_run(tmp_path, "p-tau5", "ipo", "probe-16", "probe:16", 0, 0.95, 0.95, tau=0.5, rng_seed=2)
    fake_run(tmp_path, "r", "ipo", "random-16", "random:16", 0, 0.5, 0.9, rng_seed=3)
    result = verdict(find_runs([str(tmp_path)]))["probe_vs_random"]["ipo"]
    assert result["probe"] == [max(r.metrics["true_info"] for r in find_runs([str(tmp_path / "p-tau5")]))]


def test_report_writes_table_figures_and_verdict(tmp_path, capsys):
    root = study(tmp_path / "runs", probe_truth=0.8, random_truth=0.5)
    out = tmp_path / "report"
    assert main([str(root), "--output_dir", str(out)]) == 0
    for name in [
        "results.csv",
        "results.md",
        "verdict.md",
        "verdict.json",
        "fig1a_iti_probe_vs_random.png",
        "fig2_3_truth_info_tradeoff.png",
        "fig4a_single_heads.png",
        "fig1c_5_mc_vs_kl.png",
    ]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 1 + 2 * (6 + 16) + 6
    assert {row["method"] for row in rows} == {"base", "ipo", "iti"}
    printed = capsys.readouterr().out
    assert "p = " in printed and "reach the all-heads optimum" in printed


REPORT_IN_A_FRESH_PROCESS = """
import sys
from locedit.cli import main

code = main(["report", *sys.argv[1:]])
heavy = {"torch", "transformers", "trl", "peft", "datasets", "accelerate"} & set(sys.modules)
print(code, sorted(heavy))
"""


def test_report_and_its_errors_import_no_model_library(tmp_path):
    """`locedit report` reads results and draws figures: it (and its one-line errors) import none of torch,
    transformers, TRL, PEFT, datasets or accelerate, so it answers in about a second, not after their imports."""
    import subprocess
    import sys

    root = study(tmp_path / "runs", probe_truth=0.8, random_truth=0.5)
    for args, code in [([str(root), "--output_dir", str(tmp_path / "report")], 0), ([str(tmp_path / "none")], 2)]:
        result = subprocess.run(
            [sys.executable, "-c", REPORT_IN_A_FRESH_PROCESS, *args], capture_output=True, text=True, timeout=300
        )
        assert result.stdout.strip().splitlines()[-1] == f"{code} []", result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "report" / "verdict.md").is_file()


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2  # exists, but holds no evaluated run
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("locedit: error:") for line in errors)


def test_every_heuristic_is_tested_against_random_heads():
    """The verdict puts each localization heuristic's heads (probe, importance, ...) against the random sets, with
    the same permutation test; the probe's result also stays under its old key."""
    from locedit.reporting.runs import Run
    from locedit.reporting.stats import verdict

    def run(family: str, index: int, value: float) -> Run:
        return Run(
            run_dir=f"runs/{family}-{index}",
            method="ipo",
            family=family,
            heads=f"{family}-{index}",
            heads_seed=index,
            tau=0.1,
            learning_rate=1e-3,
            alpha=None,
            metrics={"mc2": value},
        )

    runs = [run("random-4", i, 0.4 + 0.01 * i) for i in range(7)]
    runs += [run("probe-4", 0, 0.45), run("importance-4", 0, 0.9)]
    result = verdict(runs, metric="mc2")
    assert set(result["heuristics_vs_random"]) == {"probe", "importance"}
    importance = result["heuristics_vs_random"]["importance"]["ipo"]
    assert importance["importance"] == [0.9] and importance["p_value"] == pytest.approx(1 / 8)
    assert result["probe_vs_random"]["ipo"] == {
        "probe": [0.45],
        "random": [run.metrics["mc2"] for run in runs[:7]],
        "p_value": pytest.approx(3 / 8),  # 0.45, 0.45 and 0.46 of the 8 values are >= 0.45: exact over all labelings,
    }
    assert any(s.startswith("Under optimal edits, importance heads (best MC2 0.900)") for s in result["sentences"])


def test_broken_edits_by_the_break_detector_leave_best_and_the_verdict_with_their_reasons(tmp_path, capsys):
    root = study(tmp_path / "runs", probe_truth=0.8, random_truth=0.5)
    # One probe-head edit's training diverged, one is full of degenerate answers: both out, whatever they score.
    diverged = next(
        p
        for p in sorted(root.iterdir())
        if json.loads((p / "metrics.json").read_text() if (p / "metrics.json").exists() else "{}").get("train_loss")
    )
    (diverged / "metrics.json").write_text(
        json.dumps({"train_diverged": True, "train_divergence": "its IPO loss ended at 1.9, above its start 1"})
    )
    out = tmp_path / "report"
    assert main([str(root), "--output_dir", str(out), "--max_degenerate", "0.5"]) == 0
    result = json.loads((out / "verdict.json").read_text())
    assert list(result["broken"]) == [str(diverged)]
    assert result["broken"][str(diverged)] == ["training diverged (its IPO loss ended at 1.9, above its start 1)"]
    with open(out / "results.csv") as f:
        rows = {row["run_dir"]: row for row in csv.DictReader(f)}
    assert rows[str(diverged)]["broken"] == "True" and rows[str(diverged)]["best"] == "False"
    assert "1 of " in capsys.readouterr().out


def test_family_intervals_pool_a_family_and_test_it_against_the_base_model():
    from locedit.reporting import Run
    from locedit.reporting.stats import sign_test
    from locedit.reporting.study import family_intervals, pooled_run

    def run(name, family, values, kl=0.01):
        values = {q: {"mc2": v} for q, v in enumerate(values)}
        return Run(
            name,
            "base" if family == "base" else "ipo",
            family,
            name,
            None,
            None,
            None,
            None,
            {"mc2": 0.5, "kl": kl},
            values,
            study_family=family,
        )

    base = run("base", "base", [0.4] * 40)
    better = [run(f"r{i}", "random", [0.4 + 0.1 * (q % 2) + 0.01 * i for q in range(40)]) for i in range(2)]
    broken = run("rb", "random", [1.0] * 40, kl=5.0)
    pooled = pooled_run(better, "random")
    assert pooled.values[1]["mc2"] == pytest.approx((0.5 + 0.51) / 2) and pooled.values[0]["mc2"] == pytest.approx(
        0.405
    )
    assert sign_test(pooled, base, "mc2") == (40, 0, pytest.approx(2 * 0.5**40))
    rows = family_intervals([base, *better, broken], Breakage(max_kl=1.0))
    (row,) = [r for r in rows if r["metric"] == "mc2"]
    assert row["edits"] == 2  # the broken edit is left out of the pool
    difference, low, high = row["vs_base"]
    assert difference == pytest.approx(0.055) and 0 < low <= difference <= high
