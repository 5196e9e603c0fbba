"""The study's report: the table of every evaluated model, a summary per family, the plot and study.json.

Its columns are the metrics of the tables (`locedit.evaluation.metric_registry`), in the registry's order. Plugins
can add a column: `register_study_metric(key, title, fn)` with `fn(output_dir, dataset)` giving a value per
evaluated model or None (the toy world's "True (misconceptions)"): a metric of the registry like any other, so the
report shows it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..core.files import atomic_path, write_text_atomic
from ..core.recipe import Recipe
from ..core.tracking import TRACKING_FILE, Image, Markdown, Table, tracked_run, trackers_of, trackio_writes_to
from ..evaluation.breakage import Breakage
from ..evaluation.metric_registry import MAIN, METRICS, Metric, all_metrics, get_metric, register_metric
from ..rundir import read_evaluation, read_training_loss
from .runs import Run
from .stats import paired_bootstrap, sign_test

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


NUMBER = ".3f"  # the format of a number that is no metric's (learning rate, IPO loss)


def register_study_metric(key: str, title: str, value: Callable[[str, str], float | None]) -> None:
    """A metric computed from each evaluated model's run directory and data set, placed after True*Info and the
    study metrics registered before it (where the study's table has always shown them)."""
    keys = list(METRICS)
    after = keys.index(MAIN)
    while after + 1 < len(keys) and METRICS[keys[after + 1]].value is not None:
        after += 1
    register_metric(Metric(key, title, value=value), after=keys[after])


def table_metrics() -> list[Metric]:
    """The metrics of the study's tables, in their order."""
    return [metric for metric in all_metrics() if metric.table]


def metric_keys() -> tuple[str, ...]:
    return tuple(metric.key for metric in table_metrics())


def judged_labels(judges: dict | None) -> dict[str, str]:
    """Column titles that say what measured True, Info and True*Info: the judge's kind ("True (cpu)"), and for the
    `similarity` truth judge its metric ("BLEU acc"), which measures closeness to the references, not truth."""
    judges = judges or {}
    kinds = {aspect: (spec or "none").partition(":")[0] for aspect, spec in judges.items()}
    labels = {}
    truth, info = kinds.get("truth", "none"), kinds.get("info", "none")
    if truth == "similarity":
        metric = (judges["truth"].partition(":")[2] or "bleu").replace("rougeL", "ROUGE-L").replace("rouge", "ROUGE-")
        labels["true"] = f"{metric.upper() if metric == 'bleu' else metric} acc"
    elif truth != "none":
        labels["true"] = f"True ({truth})"
    if info != "none":
        labels["info"] = f"Info ({info})"
    if "true" in labels and info != "none":
        labels["true_info"] = f"True*Info ({truth})" if truth == info else f"True*Info ({truth} x {info})"
    return labels


def table_columns(labels: dict | None = None) -> tuple[tuple[str, str, str], ...]:
    """(key, title, number format) of each column of the study's table; `labels` retitles metrics by key."""
    labels = labels or {}
    return (
        ("model", "model", NUMBER),
        ("heads", "heads", NUMBER),
        ("learning_rate", "lr", NUMBER),
        *((metric.key, labels.get(metric.key, metric.label), metric.format) for metric in table_metrics()),
        ("ipo_loss", "IPO loss", NUMBER),
        ("broken", "broken", NUMBER),
    )


def summary_columns(metric: str = MAIN, labels: dict | None = None) -> tuple[tuple[str, str, str], ...]:
    """(key, title, number format) of each column of the summary per family: the best True*Info beside True*Info,
    and `best`, the best of the verdict's `metric`, after the last metric made of per-question values."""
    labels = labels or {}
    main = get_metric(MAIN)
    columns: list[tuple[str, str, str]] = [("model", "family", NUMBER), ("edits", "edits", NUMBER)]
    metrics = table_metrics()
    last_scored = max(i for i, scored in enumerate(metrics) if scored.fields)
    for i, scored in enumerate(metrics):
        columns.append((scored.key, labels.get(scored.key, scored.label), scored.format))
        if scored.key == MAIN:
            columns.append((f"best_{MAIN}", f"best {labels.get(MAIN, main.label)}", main.format))
        if i == last_scored:
            columns.append(("best", "best", get_metric(metric).format))
    return (*columns, ("ipo_loss", "IPO loss", NUMBER), ("broken", "broken", NUMBER))


def table_rows(runs: list[Run], breakage: Breakage | None = None) -> list[dict]:
    """One row per evaluated model: its metrics, the IPO loss its training reached (on its training pairs, where
    measured; it starts at 1 / (4 tau^2)) and, with `breakage`, whether the break detector calls it broken, and why."""
    table = []
    for run in runs:
        loss = None if run.study_family in ("base", "iti", "iti_random") else read_training_loss(run.run_dir)
        table.append(
            {
                "model": family_name(run.study_family),
                "family": run.study_family,
                "heads": "all" if run.study_family == "all" else run.explicit_heads,
                "learning_rate": run.learning_rate,
                **{key: run.metrics.get(key) for key in metric_keys()},
                "ipo_loss": None if loss is None else loss[1],
                "broken": None
                if breakage is None or run.method == "base"
                else ("yes" if run.is_broken(breakage) else "no"),
                "broken_reasons": run.broken_reasons(breakage),
                "output_dir": run.run_dir,
            }
        )
    return table


def summary_rows(rows: list[dict], metric: str = MAIN) -> list[dict]:
    """One row per family: the mean of each metric over its edits, its best True*Info and its best `metric` among
    the edits not broken (the paper compares the best edit a location allows), and how many edits are broken."""
    main, scored = get_metric(MAIN), get_metric(metric)
    summary = []
    for family in family_order(row["family"] for row in rows):
        members = [row for row in rows if row["family"] == family]
        row = {"model": family_name(family), "family": family, "edits": len(members)}
        for key in (*metric_keys(), "ipo_loss"):
            values = [member[key] for member in members if member.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        mains = [member[MAIN] for member in members if member.get(MAIN) is not None]
        row[f"best_{MAIN}"] = main.best(mains) if mains else None  # no info judge: no True*Info
        sound = [m[metric] for m in members if m.get(metric) is not None and m.get("broken") != "yes"]
        row["best"] = scored.best(sound) if sound else None
        flagged = [member for member in members if member.get("broken") is not None]
        row["broken"] = f"{sum(m['broken'] == 'yes' for m in flagged)} of {len(flagged)}" if flagged else None
        summary.append(row)
    return summary


def pooled_run(members: list[Run], name: str) -> Run:
    """A family as one run: on each test question, the mean of each per-question value over its edits."""
    values: dict[int, dict[str, float]] = {}
    for question in sorted({q for run in members for q in run.values}):
        present = [run.values[question] for run in members if question in run.values]
        fields = {key for value in present for key in value}
        values[question] = {
            key: sum(value[key] for value in present if key in value) / sum(key in value for value in present)
            for key in fields
        }
    return Run(name, "ipo", name, name, None, None, None, None, {}, values)


def family_intervals(runs: list[Run], breakage: Breakage | None, level: float = 0.95) -> list[dict]:
    """Each family's edits (the unbroken ones, pooled per question) against the base model and against the all-heads
    edit, on every metric made of per-question values that the runs have: the difference, its paired bootstrap
    interval over test questions, and for the base model the exact sign test over questions."""
    base = next((run for run in runs if run.study_family == "base"), None)
    if base is None:
        return []
    all_heads = [run for run in runs if run.study_family == "all" and not run.is_broken(breakage)]
    keys = [m.key for m in table_metrics() if m.fields and any(run.metrics.get(m.key) is not None for run in runs)]
    rows = []
    for family in family_order(run.study_family for run in runs):
        members = [run for run in runs if run.study_family == family and not run.is_broken(breakage)]
        if family == "base" or not members:
            continue
        pooled = pooled_run(members, family)
        for key in keys:
            row = {"family": family, "edits": len(members), "metric": key}
            row["vs_base"] = paired_bootstrap(pooled, base, level=level, metric=key)
            # A pooled family's mean of 0/1 values (True, MC1, degenerate) is no longer 0/1 where the base's is: their
            # differences are not symmetric under no effect, so the sign test is left to continuous scores there.
            if len(members) == 1 or not _binary(base, get_metric(key)):
                row["sign_test"] = sign_test(pooled, base, key)
            if all_heads and family != "all":
                row["vs_all_heads"] = paired_bootstrap(pooled, all_heads[0], level=level, metric=key)
            rows.append(row)
    return rows


def _binary(run: Run, metric: Metric) -> bool:
    """Whether the run's per-question values of a one-field metric are all 0 or 1."""
    values = [v.get(metric.fields[0]) for v in run.values.values()] if len(metric.fields) == 1 else [0.5]
    return all(value in (0.0, 1.0) for value in values if value is not None)


def format_intervals(rows: list[dict], level: float = 0.95) -> str:
    """The intervals as a markdown table."""

    def interval(value) -> str:
        return "-" if value is None else f"{value[0]:+.3f} [{value[1]:+.3f}, {value[2]:+.3f}]"

    lines = [
        f"| family | unbroken edits | metric | vs base: difference [{level:.0%} CI] | sign test (better / worse, p) "
        f"| vs all heads: difference [{level:.0%} CI] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        sign = row.get("sign_test")  # absent: not a valid test for this family and metric
        tested = "-" if sign is None else f"{sign[0]} / {sign[1]}, p = {sign[2]:.2g}"
        lines.append(
            f"| {family_name(row['family'])} | {row['edits']} | {get_metric(row['metric']).label} "
            f"| {interval(row['vs_base'])} | {tested} | {interval(row.get('vs_all_heads'))} |"
        )
    return "\n".join(lines)


def sample_answers(runs: list[Run], count: int = 6) -> str:
    """The first `count` test questions with the answer of the base model and of the first edit of each family."""
    firsts = {}
    for run in runs:
        firsts.setdefault(run.study_family, run)
    answers = {}
    for family, run in firsts.items():
        try:
            answers[family] = read_evaluation(run.run_dir)[1]
        except OSError:
            continue
    base = answers.get("base") or next(iter(answers.values()), [])
    lines = []
    for index, record in enumerate(base[:count]):
        lines.append(f"**Q: {record['question']}**\n")
        for family, records in answers.items():
            if index < len(records):
                answer = records[index]["answer"].replace("\n", " ") or "(empty)"
                heads = "all" if family == "all" else firsts[family].explicit_heads or "no edit"
                heads = heads if len(heads) <= 60 else heads[:57] + "..."
                lines.append(f"- {family_name(family)} ({heads}): {answer}")
        lines.append("")
    return "\n".join(lines)


def format_table(rows: list[dict], columns=None) -> str:
    """A Markdown table of the rows, `columns` (key, title, number format) or the study table's; columns with no
    value in any row are left out."""
    columns = [
        column for column in columns or table_columns() if any(row.get(column[0]) not in (None, "") for row in rows)
    ]
    cells = [[title for _, title, _ in columns]]
    cells += [[_cell(row.get(key), number) for key, _, number in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _cell(value, number: str = NUMBER) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value if len(value) <= 40 else value[:37] + "..."
    if isinstance(value, int):
        return str(value)
    return f"{value:{number}}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


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
    """Bars of the metrics registered as `study_bar` that some row has (True, Info and True*Info; on preference-style
    data the shares of pairs preferring chosen and reward-accurate) per family (the mean over its edits; each edit is
    a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in all_metrics() if m.study_bar and any(row.get(m.key) is not None for row in rows)]
    keys = [(metric.key, metric.label) for metric in shown]
    families = family_order(row["family"] for row in rows)
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(families) + 2.5, 4.5))
    for i, (key, name) in enumerate(keys):
        for x, family in enumerate(families):
            values = [row.get(key) or 0.0 for row in rows if row["family"] == family]
            position = x + (i - (len(keys) - 1) / 2) * width
            ax.bar(position, sum(values) / len(values), width, color=f"C{i}", label=name if x == 0 else None)
            if len(values) > 1:
                ax.scatter([position] * len(values), values, s=10, color="black", zorder=3)
    ax.set_xticks(
        range(len(families)),
        [FAMILY_TITLES.get(family, f"optimal\n{family} heads") for family in families],
        fontsize="small",
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of test " + ("questions or pairs" if any(m.over_pairs for m in shown) else "questions"))
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper left", fontsize="small", ncols=len(keys))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_study_report(runs: list[Run], recipe: Recipe, study_dir: str, metric: str = MAIN) -> dict:
    """study.png (the plot) in `study_dir`; returns the tables and their rows (`write_study_files` writes them).
    `metric` is the score of the verdict, whose best per family the summary gives."""
    os.makedirs(study_dir, exist_ok=True)
    breakage = Breakage.of(recipe.eval)
    table = table_rows(runs, breakage)
    summary = summary_rows(table, metric)
    labels = judged_labels({"truth": recipe.eval.eval_judge_truth, "info": recipe.eval.eval_judge_info})
    questions = runs[0].metrics.get("questions", "?")
    title = f"{recipe.name}: {recipe.model.model_name_or_path}, {questions} test questions of {recipe.edit.dataset}"
    write_plot(table, os.path.join(study_dir, "study.png"), title)
    report = {
        "recipe": recipe.name,
        "title": title,
        "judges": {"truth": recipe.eval.eval_judge_truth, "info": recipe.eval.eval_judge_info},
        "rows": table,
        "summary": summary,
        "metric": metric,
        "breakage": breakage.describe(),
        "table": format_table(table, table_columns(labels)),
        "summary_table": format_table(summary, summary_columns(metric, labels)),
        "samples": sample_answers(runs),
        "intervals": family_intervals(runs, breakage),
    }
    return report


def write_study_files(report: dict, recipe: Recipe, study_dir: str) -> None:
    """study.md (the tables, the verdict and the timings) and study.json (rows, summary, verdict, timings)."""
    keys = ("recipe", "title", "judges", "metric", "breakage", "rows", "summary", "intervals", "verdict", "timings")
    write_text_atomic(os.path.join(study_dir, "study.json"), json.dumps({key: report[key] for key in keys}, indent=2))
    judges = f"{recipe.eval.eval_judge_truth} / {recipe.eval.eval_judge_info}"
    text = f"# locedit study: {report['title']}\n\nJudges (truth / info): {judges}. "
    text += f'The verdict\'s score ("best"): {report["metric"]}.'
    text += f' Edits are broken with {report["breakage"]}: out of "best" and of the verdict.'
    text += f"\n\n{report['summary_table']}\n\n{report['table']}\n"
    if report.get("intervals"):
        text += (
            "\n## Each family against the base model and the all-heads edit\n\nThe unbroken edits of a family pooled "
            "(each question's values averaged over them); 95% paired bootstrap intervals over test questions, and the "
            "exact sign test over the questions where the family and the base model differ (for a family of several "
            "edits only on continuous scores such as MC2: its mean of 0/1 values has no symmetric null).\n\n"
        )
        text += format_intervals(report["intervals"]) + "\n"
    text += "\n## Verdict\n\n" + "\n".join(f"- {sentence}" for sentence in report["verdict"]["sentences"]) + "\n"
    text += "\n## Wall time per stage\n\n" + format_timings(report["timings"]) + "\n"
    if report.get("samples"):
        text += "\n## Sample answers (the first test questions)\n\n" + report["samples"] + "\n"
    write_text_atomic(os.path.join(study_dir, "study.md"), text)


def track_study(report: dict, recipe: Recipe, study_dir: str, report_dir: str) -> None:
    """The study as one tracked run named `study` (report_to: trackio and/or W&B): the family table and every
    edit's row as tables, study.png and the paper's figures as images, the verdict and study.md as markdown. Its
    project is written to `tracking.json`, where `locedit dashboard STUDY_DIR` finds it."""
    trackers = trackers_of(recipe.training.report_to)
    if not trackers:
        return
    project = recipe.edit.wandb_project
    values = {
        "study/families": _table(report["summary"]),
        "study/edits": _table(report["rows"]),
        "study/study": Image(os.path.join(study_dir, "study.png")),
        **{f"study/{name[:-4]}": Image(os.path.join(report_dir, name)) for name in _figures(report_dir)},
        "study/verdict": Markdown(Path(report_dir, "verdict.md").read_text()),
        "study/study_md": Markdown(Path(study_dir, "study.md").read_text()),
    }
    best = {f"study/best/{row['family']}": row["best"] for row in report["summary"] if row["best"] is not None}
    with tracked_run(trackers, project, f"{recipe.name}-study", group="study", job_type="study") as run:
        run.log(values)
        run.summary({"study/metric": report["metric"], **best})
    where = {"project": project, "trackers": trackers, "run": f"{recipe.name}-study"}
    if "trackio" in trackers:
        where["trackio_dir"] = str(trackio_writes_to().resolve())
    write_text_atomic(os.path.join(study_dir, TRACKING_FILE), json.dumps(where, indent=2) + "\n")


def _table(rows: list[dict]) -> Table:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Table.of_records(rows, columns)


def _figures(report_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(report_dir) if name.endswith(".png"))
