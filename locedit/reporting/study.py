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
from ..rundir import read_evaluation, read_training_loss

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


def family_order(families) -> list[str]:
    """The study's order of the families present; another localization heuristic's (importance, ...) right after
    the probes'."""
    present = list(dict.fromkeys(families))
    others = [family for family in present if family not in FAMILY_ORDER]
    order = [
        *FAMILY_ORDER[: FAMILY_ORDER.index("probe") + 1],
        *others,
        *FAMILY_ORDER[FAMILY_ORDER.index("probe") + 1 :],
    ]
    return [family for family in order if family in present]


def family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, f"optimal at the {family} heads")


@dataclass
class Edit:
    """One evaluated model of the study: the base model, ITI or an optimal edit."""

    family: str  # one of FAMILY_ORDER, or the name of another localization heuristic (importance, ...)
    output_dir: str  # the run directory; for the base model, where its evaluation goes
    heads: str = ""
    learning_rate: float | None = None
    metrics: dict = field(default_factory=dict)


# key -> (column title, fn(output_dir, dataset) -> value or None): columns plugins add after True*Info.
STUDY_METRICS: dict[str, tuple[str, Callable[[str, str], float | None]]] = {}


def register_study_metric(key: str, title: str, value: Callable[[str, str], float | None]) -> None:
    STUDY_METRICS[key] = (title, value)


def metric_keys() -> tuple[str, ...]:
    return ("true", "info", "true_info", *STUDY_METRICS, "mc1", "mc2", "kl", "ce")


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
        ("ce", "CE"),
        ("ipo_loss", "IPO loss"),
        ("broken", "broken"),
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
        ("mc1", "MC1"),
        ("mc2", "MC2"),
        ("best", "best"),
        ("kl", "KL"),
        ("ce", "CE"),
        ("ipo_loss", "IPO loss"),
        ("broken", "broken"),
    )


def table_rows(rows: list[Edit], dataset: str, max_kl: float | None = None) -> list[dict]:
    """One row per evaluated model: its metrics, the IPO loss its training reached (on its training pairs, where
    measured; it starts at 1 / (4 tau^2)) and, with `max_kl`, whether its KL makes it broken."""
    table = []
    for edit in rows:
        loss = None if edit.family in ("base", "iti", "iti_random") else read_training_loss(edit.output_dir)
        kl = edit.metrics.get("kl")
        table.append(
            {
                "model": family_name(edit.family),
                "family": edit.family,
                "heads": "all" if edit.family == "all" else edit.heads,
                "learning_rate": edit.learning_rate,
                **{key: edit.metrics.get(key) for key in metric_keys() if key not in STUDY_METRICS},
                **{key: value(edit.output_dir, dataset) for key, (_, value) in STUDY_METRICS.items()},
                "ipo_loss": None if loss is None else loss[1],
                "broken": None if max_kl is None or kl is None else ("yes" if kl > max_kl else "no"),
                "output_dir": edit.output_dir,
            }
        )
    return table


def summary_rows(rows: list[dict], metric: str = "true_info") -> list[dict]:
    """One row per family: the mean of each metric over its edits, its best True*Info and its best `metric` among
    the edits not broken (the paper compares the best edit a location allows), and how many edits are broken."""
    summary = []
    for family in family_order(row["family"] for row in rows):
        members = [row for row in rows if row["family"] == family]
        row = {"model": family_name(family), "family": family, "edits": len(members)}
        for key in (*metric_keys(), "ipo_loss"):
            values = [member[key] for member in members if member.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        scored = [member["true_info"] for member in members if member.get("true_info") is not None]
        row["best_true_info"] = max(scored) if scored else None  # no info judge: no True*Info
        sound = [m[metric] for m in members if m.get(metric) is not None and m.get("broken") != "yes"]
        row["best"] = max(sound) if sound else None
        flagged = [member for member in members if member.get("broken") is not None]
        row["broken"] = f"{sum(m['broken'] == 'yes' for m in flagged)} of {len(flagged)}" if flagged else None
        summary.append(row)
    return summary


def sample_answers(rows: list[Edit], count: int = 6) -> str:
    """The first `count` test questions with the answer of the base model and of the first edit of each family."""
    firsts = {}
    for edit in rows:
        firsts.setdefault(edit.family, edit)
    answers = {}
    for family, edit in firsts.items():
        try:
            answers[family] = read_evaluation(edit.output_dir)[1]
        except OSError:
            continue
    base = answers.get("base") or next(iter(answers.values()), [])
    lines = []
    for index, record in enumerate(base[:count]):
        lines.append(f"**Q: {record['question']}**\n")
        for family, records in answers.items():
            if index < len(records):
                answer = records[index]["answer"].replace("\n", " ") or "(empty)"
                heads = "all" if family == "all" else firsts[family].heads or "no edit"
                heads = heads if len(heads) <= 60 else heads[:57] + "..."
                lines.append(f"- {family_name(family)} ({heads}): {answer}")
        lines.append("")
    return "\n".join(lines)


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
    families = family_order(row["family"] for row in rows)
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(1.4 * len(families) + 2.5, 4.5))
    for i, (key, name) in enumerate(keys):
        for x, family in enumerate(families):
            values = [row.get(key) or 0.0 for row in rows if row["family"] == family]
            position = x + (i - 1) * width
            ax.bar(position, sum(values) / len(values), width, color=f"C{i}", label=name if x == 0 else None)
            if len(values) > 1:
                ax.scatter([position] * len(values), values, s=10, color="black", zorder=3)
    ax.set_xticks(
        range(len(families)),
        [FAMILY_TITLES.get(family, f"optimal\n{family} heads") for family in families],
        fontsize="small",
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of test questions")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper left", fontsize="small", ncols=3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_study_report(rows: list[Edit], recipe: Recipe, study_dir: str, metric: str = "true_info") -> dict:
    """study.png (the plot) in `study_dir`; returns the tables and their rows (`write_study_files` writes them).
    `metric` is the score of the verdict, whose best per family the summary gives."""
    os.makedirs(study_dir, exist_ok=True)
    max_kl = recipe.study.study_max_kl
    table = table_rows(rows, recipe.edit.dataset, max_kl)
    summary = summary_rows(table, metric)
    questions = rows[0].metrics.get("questions", "?")
    title = f"{recipe.name}: {recipe.model.model_name_or_path}, {questions} test questions of {recipe.edit.dataset}"
    write_plot(table, os.path.join(study_dir, "study.png"), title)
    report = {
        "recipe": recipe.name,
        "title": title,
        "judges": {"truth": recipe.eval.eval_judge_truth, "info": recipe.eval.eval_judge_info},
        "rows": table,
        "summary": summary,
        "metric": metric,
        "max_kl": max_kl,
        "table": format_table(table),
        "summary_table": format_table(summary, summary_columns()),
        "samples": sample_answers(rows),
    }
    return report


def write_study_files(report: dict, recipe: Recipe, study_dir: str) -> None:
    """study.md (the tables, the verdict and the timings) and study.json (rows, summary, verdict, timings)."""
    keys = ("recipe", "title", "judges", "metric", "max_kl", "rows", "summary", "verdict", "timings")
    write_text_atomic(os.path.join(study_dir, "study.json"), json.dumps({key: report[key] for key in keys}, indent=2))
    judges = f"{recipe.eval.eval_judge_truth} / {recipe.eval.eval_judge_info}"
    text = f"# locedit study: {report['title']}\n\nJudges (truth / info): {judges}. "
    text += f'The verdict\'s score ("best"): {report["metric"]}.'
    if report["max_kl"] is not None:
        text += f' Edits with KL above {report["max_kl"]:g} are broken: out of "best" and of the verdict.'
    text += f"\n\n{report['summary_table']}\n\n{report['table']}\n"
    text += "\n## Verdict\n\n" + "\n".join(f"- {sentence}" for sentence in report["verdict"]["sentences"]) + "\n"
    text += "\n## Wall time per stage\n\n" + format_timings(report["timings"]) + "\n"
    if report.get("samples"):
        text += "\n## Sample answers (the first test questions)\n\n" + report["samples"] + "\n"
    write_text_atomic(os.path.join(study_dir, "study.md"), text)
