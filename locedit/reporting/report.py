"""Writing the report of evaluated runs (`locedit report`): the table, the paper's figures and the verdict.

Reads every evaluated run under the given directories (`eval/metrics.json` and `eval/generations.jsonl`, with the
run's `heads.json`, `recipe.yaml` and `metrics.json`) and writes to the report directory:

- `results.csv` and `results.md`: one row per run (method, head family, heads, tau, learning rate or alpha, every
  metric of the tables that some run has (True, Info, True*Info, MC1, MC2, KL, CE, and plugins'), the chosen metric
  when it is none of these, whether the run is its head set's best by the chosen metric, and with `max_kl` whether
  it is broken);
- the paper's figures as PNG: the score of ITI at probe vs random heads (fig1a), the truth-info trade-off over tau
  of optimal edits per family and of ITI (fig2_3), the best score of random single heads with all heads marked
  (fig4a), MC against KL (fig1c_5), and any other metric registered to be drawn against KL;
- `verdict.md` / `verdict.json`: for each method and each localization heuristic evaluated (probe, importance, ...), a
  permutation p-value for "its heads score higher than random head sets", and for each family whether it reaches
  the all-heads optimum within a paired bootstrap confidence interval over test questions.

A head set's score is its best value of one metric over the hyperparameters it was run with (tau, learning rate,
alpha), as the paper compares the best edit each location allows: True*Info by default (the paper's; for runs on
preference-style data that no judges scored, the share of held-out pairs whose chosen completion the model prefers,
`prefers_chosen`), or any metric made of per-question values (True alone where no info judge ran, MC1, MC2,
TruthfulQA's BLEU/ROUGE `bleu_acc`, the preference metrics, ...; `locedit.evaluation.metric_registry`), the best
being the highest or, for a lower-is-better one, the lowest. With
`max_kl`, edits whose KL from the base model is above it are broken: flagged in the table and left out of the scores
and the verdict, as a high score from a broken model is no evidence.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..core.errors import RecipeError
from ..core.files import write_text_atomic
from ..core.tracking import Image, Markdown, Table, tracked_run
from ..evaluation.breakage import Breakage
from ..evaluation.metric_registry import MAIN, PREFERENCE_MAIN, all_metrics, get_metric, per_question_metrics
from .figures import write_figures
from .runs import SETTINGS, Run
from .stats import best_per_head_set, verdict


def scoring_metrics() -> list[str]:
    """The metrics a report can rank head sets by (`--metric`): those made of per-question values."""
    return [metric.key for metric in per_question_metrics()]


def default_metric(runs: list[Run]) -> str:
    """The score of head sets unless one is named: True*Info, or, where no run has it but some has the preference
    metric (preference-style data, no judges), `prefers_chosen`."""
    has = {key for run in runs for key, value in run.metrics.items() if value is not None}
    return PREFERENCE_MAIN if MAIN not in has and PREFERENCE_MAIN in has else MAIN


def check_metric(runs: list[Run], metric: str) -> None:
    """The metric is one the report can rank by and at least one run has it; else one error line."""
    scoring = scoring_metrics()
    if metric not in scoring:
        raise RecipeError(
            f"metric '{metric}' is not one a report can rank head sets by; use one of {', '.join(scoring)}"
        )
    if any(run.metrics.get(metric) is not None for run in runs):
        return
    present = [key for key in scoring if any(run.metrics.get(key) is not None for run in runs)]
    needs = get_metric(metric).needs
    why = f" ({get_metric(metric).label} needs {needs})" if needs else ""
    has = f"they have {', '.join(present)}; name one with --metric" if present else "they have no metric to rank by"
    raise RecipeError(f"no evaluated run has {metric}{why}: {has}")


def table(runs: list[Run], metric: str = MAIN, breakage: Breakage | None = None) -> tuple[list[str], list[dict]]:
    """The columns and rows of the results table: the metrics of the tables that some run has and the chosen one, in
    the registry's order (so the chosen one beside KL and CE), `best` marking each head set's best run by it (broken
    runs left out), `broken` (with `breakage`) the edits the break detector calls broken, and why."""
    metrics = [
        scored.key
        for scored in all_metrics()
        if scored.key == metric or (scored.table and any(run.metrics.get(scored.key) is not None for run in runs))
    ]
    columns = [*SETTINGS, *metrics, "best"]
    columns += ["broken", "broken_reasons"] if breakage is not None else []
    columns += ["run_dir"]
    best = best_per_head_set([run for run in runs if run.method != "base" and not run.is_broken(breakage)], metric)
    rows = []
    for run in sorted(runs, key=lambda r: (r.method, r.family, r.heads, r.heads_seed or 0)):
        row = run.row(columns)
        row["best"] = None if run.method == "base" else best.get(run.head_set) is run
        if breakage is not None:
            row["broken"] = None if run.method == "base" else run.is_broken(breakage)
            row["broken_reasons"] = "; ".join(run.broken_reasons(breakage)) or None
        rows.append(row)
    return columns, rows


def write_table(runs: list[Run], output_dir: str, metric: str = MAIN, breakage: Breakage | None = None) -> None:
    columns, rows = table(runs, metric, breakage)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(os.path.join(output_dir, "results.csv"), text.getvalue())
    shown = [c for c in columns if c != "run_dir"]
    lines = [_score_line(metric, breakage.describe() if breakage else None), ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in shown) + " |")
    write_text_atomic(Path(output_dir, "results.md"), "\n".join(lines) + "\n")


def _score_line(metric: str, broken: str | None) -> str:
    line = f"Score: {get_metric(metric).label} (`{metric}`); `best` marks each head set's best run by it"
    if broken is not None:
        line += f"; `broken`: {broken}, left out of `best` and of the verdict"
    return line + "."


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_verdict(result: dict, output_dir: str) -> None:
    write_text_atomic(Path(output_dir, "verdict.json"), json.dumps(result, indent=2, default=str))
    lines = ["# Verdict", "", _score_line(result["metric"], result.get("breakage")), ""]
    lines += [f"- {sentence}" for sentence in result["sentences"]]
    compared = result["sentences"][1:] if result.get("breakage") is not None else result["sentences"]  # after its
    if not compared:
        lines.append(
            "- Not enough families were evaluated for a comparison (needs probe and random head sets, "
            "or all heads and another family)."
        )
    write_text_atomic(Path(output_dir, "verdict.md"), "\n".join(lines) + "\n")


def report_values(output_dir: str, tabled: tuple, result: dict, figures: list[str]) -> dict:
    """What a report shows on a dashboard: the results table, each figure as an image, the verdict as markdown."""
    columns, rows = tabled
    values = {"report/results": Table(list(columns), [[row[c] for c in columns] for row in rows])}
    values.update({f"report/{Path(figure).stem}": Image(figure) for figure in figures})
    values["report/verdict"] = Markdown(Path(output_dir, "verdict.md").read_text())
    return values


def report_summary(result: dict) -> dict:
    summary = {"report/metric": result["metric"]}
    for method, stats in result["probe_vs_random"].items():
        summary[f"report/p_value/probe_vs_random/{method}"] = stats["p_value"]
    return summary


def write_report(
    runs: list[Run],
    output_dir: str,
    report_to: str | list[str] = "none",
    project: str = "locedit-report",
    metric: str = MAIN,
    breakage: Breakage | None = None,
) -> dict:
    """The table, the figures and the verdict of `runs` in `output_dir` (and on W&B), head sets scored by their best
    `metric`, edits the break detector (`breakage`) calls broken left out; returns the verdict. With `report_to`
    (trackio, wandb) the table, figures and verdict are also a tracked run named `report` in `project`."""
    check_metric(runs, metric)
    if breakage is not None and breakage.max_kl is not None and not breakage.max_kl >= 0:
        raise RecipeError(f"max_kl must be a KL, 0 or more, got {breakage.max_kl}")
    if breakage is not None and breakage.max_degenerate is not None and not 0 <= breakage.max_degenerate <= 1:
        raise RecipeError(f"max_degenerate must be a share from 0 to 1, got {breakage.max_degenerate}")
    os.makedirs(output_dir, exist_ok=True)
    write_table(runs, output_dir, metric, breakage)
    figures = write_figures(runs, output_dir, metric, breakage)
    result = verdict(runs, metric=metric, breakage=breakage)
    write_verdict(result, output_dir)
    with tracked_run(report_to, project, "report", job_type="report") as run:
        if run is not None:
            run.log(report_values(output_dir, table(runs, metric, breakage), result, figures))
            run.summary(report_summary(result))
    return result
