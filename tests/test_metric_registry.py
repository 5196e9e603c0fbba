"""The metric registry: a metric defined once reaches eval's summary, the report, the study's tables and figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from locedit.eval import cli as eval_cli
from locedit.evaluation.metric_registry import (
    METRICS,
    Metric,
    all_metrics,
    get_metric,
    per_question_metrics,
    register_metric,
)
from locedit.evaluation.similarity import FIELDS as SIMILARITY_FIELDS
from locedit.report import main as report_main
from locedit.report import make_parser
from locedit.reporting import Run, best_per_head_set, read_run
from locedit.reporting import study as study_report

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")


@pytest.fixture
def registry():
    """The registry as the test found it, given back afterwards (plugins' metrics loaded first, so kept)."""
    all_metrics()
    saved = dict(METRICS)
    yield METRICS
    METRICS.clear()
    METRICS.update(saved)


def answer_words(record: dict) -> int:
    return len(record["answer"].split())


def test_a_metric_registered_once_reaches_eval_report_study_and_figures(registry, tiny_model_dir, tmp_path, capsys):
    # The one place: a made-up per-question metric, the number of words of each answer (fewer is better here).
    register_metric(
        Metric(
            "answer_words",
            "Words",
            fields=("answer_words",),
            higher_is_better=False,
            format=".1f",
            against_kl="answer_words_vs_kl",
            per_question=answer_words,
        )
    )

    # Eval: each record gets its value, the summary (metrics.json) their mean, and the printed line its label.
    out = tmp_path / "base"
    argv = [TINY, "--base", "--model_name_or_path", str(tiny_model_dir("llama")), "--eval_output_dir", str(out)]
    argv += ["--eval_judge_truth", "none", "--eval_judge_info", "none", "--eval_corpus", "none"]
    argv += ["--eval_max_questions", "3", "--eval_max_new_tokens", "8", "--report_to", "none"]
    assert eval_cli(argv) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [r["answer_words"] for r in records] == [answer_words(r) for r in records]
    words = sum(answer_words(r) for r in records) / len(records)
    assert metrics["answer_words"] == pytest.approx(words)
    assert sum(c["answer_words"] * c["questions"] for c in metrics["per_category"].values()) == pytest.approx(
        words * len(records)
    )
    assert f"Words {words:.4g}" in capsys.readouterr().out

    # The report: a --metric choice, a column of its table, the score of its verdict and a figure of its own.
    assert make_parser().parse_args([str(out), "--metric", "answer_words"]).metric == "answer_words"
    report = tmp_path / "report"
    assert report_main([str(out), "--output_dir", str(report), "--metric", "answer_words"]) == 0
    with open(report / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["answer_words"]) == pytest.approx(words)
    assert "Words (`answer_words`)" in (report / "verdict.md").read_text()
    assert (report / "answer_words_vs_kl.png").is_file() and (report / "fig1c_5_mc_vs_kl.png").is_file()

    # The study: a column of its table and of the summary per family, printed with the metric's format.
    run = read_run(out, study_family="base")
    rows = study_report.table_rows([run])
    header, _, cells = (line.split("|")[1:-1] for line in study_report.format_table(rows).splitlines())
    assert header[-1].strip() == "Words" and cells[-1].strip() == f"{words:.1f}"
    (summary,) = study_report.summary_rows(rows, metric="answer_words")
    assert summary["answer_words"] == pytest.approx(words) and summary["best"] == pytest.approx(words)
    assert "Words" in study_report.format_table([summary], study_report.summary_columns("answer_words"))


def test_a_lower_is_better_metric_ranks_head_sets_by_its_lowest_value(registry):
    register_metric(Metric("answer_words", "Words", fields=("answer_words",), higher_is_better=False))
    runs = [
        Run(f"r{i}", "ipo", "random-4", "random:4", 0, tau, 0.05, None, {"answer_words": words})
        for i, (tau, words) in enumerate([(0.1, 9.0), (0.2, 4.0), (0.3, 6.0)])
    ]
    (best,) = best_per_head_set(runs, "answer_words").values()
    assert best.run_dir == "r1"
    rows = [{"family": "random", "answer_words": run.metrics["answer_words"]} for run in runs]
    assert study_report.summary_rows(rows, metric="answer_words")[0]["best"] == 4.0


def test_study_metrics_are_registry_metrics_after_true_info(registry, tmp_path):
    study_report.register_study_metric("first", "First", lambda output_dir, dataset: 1.0)
    study_report.register_study_metric("second", "Second", lambda output_dir, dataset: 2.0)
    keys = [key for key, _, _ in study_report.table_columns()]
    after = keys[keys.index("true_info") + 1 : keys.index("mc1")]
    assert after[-2:] == ["first", "second"]  # in the order registered, after any plugin's (the toy world's)
    assert not get_metric("first").fields  # a number per run, computed when a run is read (the report's too)
    (tmp_path / "base" / "eval").mkdir(parents=True)
    (tmp_path / "base" / "eval" / "metrics.json").write_text(json.dumps({"questions": 0}))
    assert read_run(tmp_path / "base").metrics["second"] == 2.0


def test_the_registry_holds_every_metric_once_with_its_definition():
    keys = [metric.key for metric in all_metrics()]
    assert len(keys) == len(set(keys))
    # What a report can rank head sets by: the metrics made of per-question values, not KL and CE.
    scores = {"true", "info", "true_info", "mc1", "mc2", "mc2_sc", "degenerate"}
    # ... and preference-style data's, over its held-out pairs and prompts (KL and CE per prompt are per question).
    scores |= {"prefers_chosen", "reward_accuracy", "reward_margin", "heldout_ipo_loss", "kl_prompts", "ce_prompts"}
    assert {metric.key for metric in per_question_metrics()} == scores | set(SIMILARITY_FIELDS)
    assert (
        get_metric("true_info").fields == ("truthful", "informative") and get_metric("true_info").label == "True*Info"
    )
    assert not get_metric("kl").higher_is_better and not get_metric("ce").higher_is_better
    assert get_metric("mc2").of_records([{"mc2": 0.2}, {"mc2": float("nan")}, {"mc2": 0.6}, {}]) == pytest.approx(0.4)
    # True*Info is the product of the two means, not the mean of per-question products.
    records = [{"truthful": True, "informative": False}, {"truthful": True, "informative": True}]
    assert get_metric("true_info").of_records(records) == 0.5
