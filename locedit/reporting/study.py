"""The study's report: the table of every evaluated model, a summary per family, the plot and study.json.

Plugins can add a column: `register_study_metric(key, title, fn)` with `fn(output_dir, dataset)` giving a value per
evaluated model or None (the toy world's "True (misconceptions)").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.files import atomic_path, write_text_atomic
from ..core.recipe import Recipe

FAMILY_ORDER = ("base", "iti", "iti_random", "probe", "random", "single", "all")
FAMILY_NAMES = {
    "base": "base model",
    "iti": "ITI at the probe heads",
    "iti_random": "ITI at random heads",
    "probe": "optimal at the probe heads",
    "random": "optimal at random heads",
    "single": "optimal at a single head",
    "all": "optimal at all heads",
}


@dataclass
class Edit:
    """One evaluated model of the study: the base model, ITI or an optimal edit."""

    family: str  # one of FAMILY_ORDER
    output_dir: str  # the run directory; for the base model, where its evaluation goes
    heads: str = ""
    learning_rate: float | None = None
    metrics: dict = field(default_factory=dict)


# key -> (column title, fn(output_dir, dataset) -> value or None): columns plugins add after True*Info.
STUDY_METRICS: dict[str, tuple[str, Callable[[str, str], float | None]]] = {}


def register_study_metric(key: str, title: str, value: Callable[[str, str], float | None]) -> None:
    STUDY_METRICS[key] = (title, value)


def metric_keys() -> tuple[str, ...]:
    return ("true", "info", "true_info", *STUDY_METRICS, "mc1", "mc2", "kl")


def table_columns() -> tuple[tuple[str, str], ...]:
    extra = tuple((key, title) for key, (title, _) in STUDY_METRICS.items())
    return (
        ("model", "model"),
        ("heads", "heads"),
        ("learning_rate", "lr"),
        ("true", "True"),
        ("info", "Info"),
        ("true_info", "True*Info"),
        *extra,
        ("mc1", "MC1"),
        ("mc2", "MC2"),
        ("kl", "KL"),
    )


def summary_columns() -> tuple[tuple[str, str], ...]:
    extra = tuple((key, title) for key, (title, _) in STUDY_METRICS.items())
    return (
        ("model", "family"),
        ("edits", "edits"),
        ("true", "True"),
        ("info", "Info"),
        ("true_info", "True*Info"),
        ("best_true_info", "best True*Info"),
        *extra,
        ("kl", "KL"),
    )


def table_rows(rows: list[Edit], dataset: str) -> list[dict]:
    """One row per evaluated model."""
    return [
        {
            "model": FAMILY_NAMES[edit.family],
            "family": edit.family,
            "heads": "all" if edit.family == "all" else edit.heads,
            "learning_rate": edit.learning_rate,
            **{key: edit.metrics.get(key) for key in metric_keys() if key not in STUDY_METRICS},
            **{key: value(edit.output_dir, dataset) for key, (_, value) in STUDY_METRICS.items()},
            "output_dir": edit.output_dir,
        }
        for edit in rows
    ]


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per family: the mean of each metric over its edits, and its best True*Info (the paper compares the
    best edit a location allows)."""
    summary = []
    for family in FAMILY_ORDER:
        members = [row for row in rows if row["family"] == family]
        if not members:
            continue
        row = {"model": FAMILY_NAMES[family], "family": family, "edits": len(members)}
        for key in metric_keys():
            values = [member[key] for member in members if member.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        row["best_true_info"] = max((member["true_info"] or 0.0) for member in members)
        summary.append(row)
    return summary


def format_table(rows: list[dict], columns=None) -> str:
    """A Markdown table of the rows; columns with no value in any row are left out."""
    columns = [
        (key, name) for key, name in columns or table_columns() if any(row.get(key) not in (None, "") for row in rows)
    ]
    cells = [[name for _, name in columns]]
    cells += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value if len(value) <= 40 else value[:37] + "..."
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def format_timings(stages: dict) -> str:
    lines = ["| stage | wall s | CPU s |", "| --- | --- | --- |"]
    lines += [f"| {stage} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} |" for stage, t in stages.items()]
    total_wall = sum(t["wall_s"] for t in stages.values())
    total_cpu = sum(t["cpu_s"] for t in stages.values())
    return "\n".join(lines + [f"| total | {total_wall:.1f} | {total_cpu:.1f} |"])


FAMILY_TITLES = {
    "base": "base",
    "iti": "ITI\nprobe heads",
    "iti_random": "ITI\nrandom heads",
    "probe": "optimal\nprobe heads",
    "random": "optimal\nrandom heads",
    "single": "optimal\nsingle head",
    "all": "optimal\nall heads",
}


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """Bars of True, Info and True*Info per family (the mean over its edits; each edit is a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("true", "True"), ("info", "Info"), ("true_info", "True*Info")]
    families = [family for family in FAMILY_ORDER if any(row["family"] == family for row in rows)]
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(1.4 * len(families) + 2.5, 4.5))
    for i, (key, name) in enumerate(keys):
        for x, family in enumerate(families):
            values = [row.get(key) or 0.0 for row in rows if row["family"] == family]
            position = x + (i - 1) * width
            ax.bar(position, sum(values) / len(values), width, color=f"C{i}", label=name if x == 0 else None)
            if len(values) > 1:
                ax.scatter([position] * len(values), values, s=10, color="black", zorder=3)
    ax.set_xticks(range(len(families)), [FAMILY_TITLES[family] for family in families], fontsize="small")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of test questions")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper left", fontsize="small", ncols=3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_study_report(rows: list[Edit], recipe: Recipe, study_dir: str) -> dict:
    """study.png (the plot) in `study_dir`; returns the tables and their rows (`write_study_files` writes them)."""
    os.makedirs(study_dir, exist_ok=True)
    table = table_rows(rows, recipe.edit.dataset)
    summary = summary_rows(table)
    questions = rows[0].metrics.get("questions", "?")
    title = f"{recipe.name}: {recipe.model.model_name_or_path}, {questions} test questions of {recipe.edit.dataset}"
    write_plot(table, os.path.join(study_dir, "study.png"), title)
    report = {
        "recipe": recipe.name,
        "title": title,
        "judges": {"truth": recipe.eval.eval_judge_truth, "info": recipe.eval.eval_judge_info},
        "rows": table,
        "summary": summary,
        "table": format_table(table),
        "summary_table": format_table(summary, summary_columns()),
    }
    return report


def write_study_files(report: dict, recipe: Recipe, study_dir: str) -> None:
    """study.md (the tables, the verdict and the timings) and study.json (rows, summary, verdict, timings)."""
    keys = ("recipe", "title", "judges", "rows", "summary", "verdict", "timings")
    write_text_atomic(os.path.join(study_dir, "study.json"), json.dumps({key: report[key] for key in keys}, indent=2))
    judges = f"{recipe.eval.eval_judge_truth} / {recipe.eval.eval_judge_info}"
    text = f"# locedit study: {report['title']}\n\nJudges (truth / info): {judges}.\n\n"
    text += f"{report['summary_table']}\n\n{report['table']}\n"
    text += "\n" + "\n".join(f"- {sentence}" for sentence in report["verdict"]["sentences"]) + "\n"
    text += "\n" + format_timings(report["timings"]) + "\n"
    write_text_atomic(os.path.join(study_dir, "study.md"), text)
