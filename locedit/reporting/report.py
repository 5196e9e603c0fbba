"""Writing the report of evaluated runs (`locedit report`): the table, the paper's figures and the verdict.

Reads every evaluated run under the given directories (`eval/metrics.json` and `eval/generations.jsonl`, with the
run's `heads.json`, `recipe.yaml` and `metrics.json`) and writes to the report directory:

- `results.csv` and `results.md`: one row per run (method, head family, heads, tau, learning rate or alpha, True,
  Info, True*Info, MC1, MC2, KL, CE);
- the paper's figures as PNG: True*Info of ITI at probe vs random heads (fig1a), the truth-info trade-off over tau
  of optimal edits per family and of ITI (fig2_3), the best True*Info of random single heads with all heads marked
  (fig4a), MC against KL (fig1c_5);
- `verdict.md` / `verdict.json`: for each method, a permutation p-value for "probe heads score higher than random
  head sets", and for each family whether it reaches the all-heads optimum within a paired bootstrap confidence
  interval over test questions.

A head set's score is its best True*Info over the hyperparameters it was run with (tau, learning rate, alpha), as
the paper compares the best edit each location allows.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..core.files import write_text_atomic
from ..core.tracking import offline_without_credentials
from .figures import write_figures
from .runs import COLUMNS, Run
from .stats import verdict


def write_table(runs: list[Run], output_dir: str) -> None:
    rows = [run.row() for run in sorted(runs, key=lambda r: (r.method, r.family, r.heads, r.heads_seed or 0))]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(os.path.join(output_dir, "results.csv"), text.getvalue())
    shown = [c for c in COLUMNS if c != "run_dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in shown) + " |")
    write_text_atomic(Path(output_dir, "results.md"), "\n".join(lines) + "\n")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_verdict(result: dict, output_dir: str) -> None:
    write_text_atomic(Path(output_dir, "verdict.json"), json.dumps(result, indent=2, default=str))
    lines = ["# Verdict", ""] + [f"- {sentence}" for sentence in result["sentences"]]
    if not result["sentences"]:
        lines.append(
            "- Not enough families were evaluated for a comparison (needs probe and random head sets, "
            "or all heads and another family)."
        )
    write_text_atomic(Path(output_dir, "verdict.md"), "\n".join(lines) + "\n")


def log_to_wandb(output_dir: str, runs: list[Run], result: dict, figures: list[str], project: str) -> None:
    import wandb

    offline_without_credentials()
    run = wandb.init(project=project, job_type="report", mode=os.environ.get("WANDB_MODE", "online"), dir=output_dir)
    table = wandb.Table(columns=COLUMNS, data=[[r.row()[c] for c in COLUMNS] for r in runs])
    run.log({"results": table, **{Path(f).stem: wandb.Image(f) for f in figures}})
    for method, stats in result["probe_vs_random"].items():
        run.summary[f"p_value/probe_vs_random/{method}"] = stats["p_value"]
    run.finish()


def write_report(runs: list[Run], output_dir: str, report_to: str = "none", project: str = "locedit") -> dict:
    """The table, the figures and the verdict of `runs` in `output_dir` (and on W&B); returns the verdict."""
    os.makedirs(output_dir, exist_ok=True)
    write_table(runs, output_dir)
    figures = write_figures(runs, output_dir)
    result = verdict(runs)
    write_verdict(result, output_dir)
    if report_to == "wandb":
        log_to_wandb(output_dir, runs, result, figures, project)
    return result
