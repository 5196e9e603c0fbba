"""`locedit study RECIPE`: the paper's comparison in one command, each stage run as its own command would run it.

    locedit study recipes/toy.yaml                        # the toy world on a CPU, no download
    python -m locedit.study recipes/toy.yaml --study_single 4 --beta 0.3

From one recipe whose heads are `probe:K` (ITI's localization), in one process:

1. model   the recipe's base model (the toy model is pre-trained on first use, then cached);
2. probe   every head probed on the training questions (`locedit probe`);
3. iti     ITI's edit at the K probe heads and at the `--study_random` random sets of K heads (`locedit iti`);
4. train   the optimal (IPO) edit at the K probe heads, at `--study_random` random sets of K heads, at
           `--study_single` random single heads and at all heads (`locedit train` with other `--heads`). The recipe's
           learning rate is for K heads; all heads and single heads get it scaled as the paper's 1e-4 and 2e-3 are
           to its 5e-4 (`--study_lr_all`, `--study_lr_single` set them);
5. eval    the base model and every edit on the test questions (`locedit eval --base`);
6. report  the table of every model and a summary per family (printed, `study.md`, `study.json`) and a plot of
           True, Info and True*Info (`study.png`), in `outputs/<recipe>/study/`, with each stage's wall and CPU time;
           and `locedit report` of every run in `study/report/`: the paper's figures, the permutation p-value of the
           probe heads against the random sets (under ITI and optimal edits) and which head sets reach the all-heads
           optimum (paired bootstrap), printed as the verdict.

Each stage prints the command that reproduces it alone. Recipe flags after the recipe apply to every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .recipe import USER_ERRORS, Recipe, RecipeError, parse_recipe

# The paper's learning rates (appendix A) relative to its 16-head one, 5e-4: 1e-4 for all heads, 2e-3 for one head.
LR_SCALE = {"all": 0.2, "single": 4.0}
STUDY_DIR = "study"
REPORT_DIR = "report"
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
class StudyOptions:
    random: int = 8  # random sets of K heads (the paper draws 16)
    single: int = 8  # random single heads (the paper draws 24)
    lr_all: float | None = None  # default: the recipe's learning rate x LR_SCALE["all"]
    lr_single: float | None = None  # default: the recipe's learning rate x LR_SCALE["single"]


@dataclass
class Edit:
    """One evaluated model of the study: the base model, ITI or an optimal edit."""

    family: str  # one of FAMILY_ORDER
    output_dir: str  # the run directory; for the base model, where its evaluation goes
    heads: str = ""
    learning_rate: float | None = None
    metrics: dict = field(default_factory=dict)


def parse_options(argv: list[str]) -> tuple[StudyOptions, list[str]]:
    """The study's own `--study_*` flags, and the recipe's arguments (everything else)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--study_random", type=int, default=StudyOptions.random)
    parser.add_argument("--study_single", type=int, default=StudyOptions.single)
    parser.add_argument("--study_lr_all", type=float, default=None)
    parser.add_argument("--study_lr_single", type=float, default=None)
    known, rest = parser.parse_known_args(argv)
    options = StudyOptions(known.study_random, known.study_single, known.study_lr_all, known.study_lr_single)
    if options.random < 0 or options.single < 0:
        raise RecipeError("--study_random and --study_single must be 0 or more")
    return options, rest


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


def family_flags(recipe: Recipe, options: StudyOptions) -> list[tuple[str, list[str]]]:
    """(family, recipe flags) of each optimal edit the study trains, in order."""
    spec = recipe.edit.heads.strip()
    lr = recipe.training.learning_rate
    lr_all = options.lr_all if options.lr_all is not None else lr * LR_SCALE["all"]
    lr_single = options.lr_single if options.lr_single is not None else lr * LR_SCALE["single"]
    families = [("probe", ["--heads", spec])]
    if options.random:
        families.append(("random", random_heads_flags(recipe, options)))
    if options.single:
        families.append(("single", ["--heads", f"single:{options.single}", "--learning_rate", f"{lr_single:g}"]))
    families.append(("all", ["--heads", "all", "--learning_rate", f"{lr_all:g}"]))
    return families


def check_study_recipe(recipe: Recipe) -> None:
    """The study needs `probe:K` heads; a toy model, toy data, toy judges and a toy corpus must all name the same
    world."""
    from .heads import is_probe_spec
    from .toy.world import ToySpecError, is_toy_spec, parse_toy_spec

    if not is_probe_spec(recipe.edit.heads):
        raise RecipeError(
            f"the study compares edits at the probe heads with others: set heads to probe:K, not '{recipe.edit.heads}'"
        )
    specs = {
        "model_name_or_path": recipe.model.model_name_or_path,
        "dataset": recipe.edit.dataset,
        "eval_judge_truth": recipe.eval.eval_judge_truth,
        "eval_judge_info": recipe.eval.eval_judge_info,
        "eval_corpus": recipe.eval.eval_corpus,
    }
    worlds = {}
    for key, spec in specs.items():
        if is_toy_spec(spec):
            try:
                worlds[key] = parse_toy_spec(spec).world()
            except ToySpecError as err:
                raise RecipeError(f"{key}: {err}") from None
    if len(set(worlds.values())) > 1:
        named = ", ".join(f"{key} {specs[key]}" for key in worlds)
        raise RecipeError(f"the toy model, data and judges must name the same world (seed, entities): {named}")


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


class Timer:
    """Wall and CPU seconds (all threads of the process) of each stage."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            entry = self.stages.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - wall
            entry["cpu_s"] += time.process_time() - cpu


def run_study(recipe_argv: list[str], options: StudyOptions) -> dict:
    """Run every stage of the study and write its report. Returns the report: rows, summary, timings."""
    from . import eval as evaluation
    from . import iti, probe, train
    from .tiny import resolve_model_path

    timer = Timer()
    recipe = parse_recipe(recipe_argv, prog="locedit study")
    check_study_recipe(recipe)
    study_dir = os.path.join("outputs", recipe.name, STUDY_DIR)
    base_argv = list(recipe_argv)

    def stage(command: str, flags: list[str], shown: list[str] | None = None) -> Recipe:
        print(f"\nlocedit study: {shlex.join(['locedit', command, *(shown or []), *base_argv, *flags])}", flush=True)
        return parse_recipe(base_argv + flags, prog=f"locedit {command}")

    print(f"locedit study: {recipe.name}: model {recipe.model.model_name_or_path}, data {recipe.edit.dataset}")
    with timer("model"):
        resolve_model_path(recipe.model.model_name_or_path)  # pre-trains the toy model on first use
    with timer("probe"):
        probe.main(stage("probe", []))

    edits: list[Edit] = []
    with timer("iti"):
        iti_recipe = stage("iti", [])
        heads = iti.main(iti_recipe)["heads_spec"]
        edits.append(Edit("iti", iti.iti_output_dir(iti_recipe), heads))
        if options.random:  # the same random sets as the optimal edits' (same heads_seed), for Fig. 1a
            random_recipe = stage("iti", random_heads_flags(recipe, options))
            iti.main(random_recipe)
            for edit_dir in evaluation.expand_run_dirs([iti.iti_output_dir(random_recipe)]):
                edits.append(Edit("iti_random", edit_dir, read_heads(edit_dir)))

    for family, flags in family_flags(recipe, options):
        with timer(f"train {family}"):
            run_recipe = stage("train", flags)
            run_dir = train.default_output_dir(run_recipe.edit, run_recipe.training, run_recipe.name)
            train.main(run_recipe)
        for edit_dir in evaluation.expand_run_dirs([run_dir]):  # a multi-edit run holds one directory per edit
            edits.append(Edit(family, edit_dir, read_heads(edit_dir), run_recipe.training.learning_rate))

    base = Edit("base", os.path.join(study_dir, "base"))
    with timer("eval"):
        eval_recipe = stage("eval", ["--eval_output_dir", base.output_dir], shown=["RUN_DIR...", "--base"])
        all_metrics = evaluation.main(eval_recipe, [edit.output_dir for edit in edits], base=True)
    by_dir = {os.path.normpath(m["edit"]) if m["edit"] else None: m for m in all_metrics}
    base.metrics = by_dir[None]
    for edit in edits:
        edit.metrics = by_dir[os.path.normpath(edit.output_dir)]

    with timer("report"):
        report = write_report([base, *edits], recipe, study_dir)
        report["verdict"] = write_paper_report([base, *edits], recipe, study_dir)
    report["timings"] = timer.stages
    write_json(report, study_dir)
    print(f"\n{report['table']}\n\n{report['summary_table']}\n\n{format_timings(timer.stages)}", flush=True)
    print("\n" + "\n".join(f"- {sentence}" for sentence in report["verdict"]["sentences"]), flush=True)
    print(
        f"\nlocedit study: wrote {study_dir}/study.md, study.json and study.png; the paper's figures, table and "
        f"verdict in {study_dir}/{REPORT_DIR}/",
        flush=True,
    )
    return report


def random_heads_flags(recipe: Recipe, options: StudyOptions) -> list[str]:
    """The head flags of the `--study_random` random sets of K heads (K of the recipe's `probe:K`)."""
    count = recipe.edit.heads.strip().partition(":")[2].strip()
    return ["--heads", f"random:{count}", "--heads_draws", str(options.random)]


def read_heads(edit_dir: str) -> str:
    """An edit's heads as written in its heads.json, e.g. `L0H1,L2H3`."""
    from .heads import format_heads

    with open(os.path.join(edit_dir, "heads.json")) as f:
        return format_heads([tuple(head) for head in json.load(f)["heads"]])


def write_paper_report(rows: list[Edit], recipe: Recipe, study_dir: str) -> dict:
    """`locedit report` of the study's runs in `study/report/`: the paper's figures, table and verdict."""
    from . import report

    runs = report.find_runs([edit.output_dir for edit in rows])
    report_to = "wandb" if "wandb" in (recipe.training.report_to or []) else "none"
    return report.write_report(runs, os.path.join(study_dir, REPORT_DIR), report_to, recipe.edit.wandb_project)


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def misconception_truth(edit: Edit, dataset: str) -> float | None:
    """On the toy world: the fraction of the test questions with a planted misconception that are answered truly."""
    from .eval import EVAL_DIR
    from .toy.world import is_toy_spec, make_world, parse_toy_spec

    if not is_toy_spec(dataset):
        return None
    planted = {q["question"] for q in make_world(parse_toy_spec(dataset)).misconception_questions()}
    with open(os.path.join(edit.output_dir, EVAL_DIR, "generations.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    judged = [r["truthful"] for r in records if r["question"] in planted and "truthful" in r]
    return sum(judged) / len(judged) if judged else None


METRIC_KEYS = ("true", "info", "true_info", "true_misconceptions", "mc1", "mc2", "kl")
COLUMNS = (
    ("model", "model"),
    ("heads", "heads"),
    ("learning_rate", "lr"),
    ("true", "True"),
    ("info", "Info"),
    ("true_info", "True*Info"),
    ("true_misconceptions", "True (misconceptions)"),
    ("mc1", "MC1"),
    ("mc2", "MC2"),
    ("kl", "KL"),
)
SUMMARY_COLUMNS = (
    ("model", "family"),
    ("edits", "edits"),
    ("true", "True"),
    ("info", "Info"),
    ("true_info", "True*Info"),
    ("best_true_info", "best True*Info"),
    ("true_misconceptions", "True (misconceptions)"),
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
            **{key: edit.metrics.get(key) for key in METRIC_KEYS if key != "true_misconceptions"},
            "true_misconceptions": misconception_truth(edit, dataset),
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
        for key in METRIC_KEYS:
            values = [member[key] for member in members if member.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        row["best_true_info"] = max((member["true_info"] or 0.0) for member in members)
        summary.append(row)
    return summary


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    """A Markdown table of the rows; columns with no value in any row are left out."""
    columns = [(key, name) for key, name in columns if any(row.get(key) not in (None, "") for row in rows)]
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
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(rows: list[Edit], recipe: Recipe, study_dir: str) -> dict:
    """study.md (the tables) and study.png (the plot) in `study_dir`; returns the tables and their rows."""
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
        "summary_table": format_table(summary, SUMMARY_COLUMNS),
    }
    with open(os.path.join(study_dir, "study.md"), "w") as f:
        judges = f"{recipe.eval.eval_judge_truth} / {recipe.eval.eval_judge_info}"
        f.write(f"# locedit study: {title}\n\nJudges (truth / info): {judges}.\n\n")
        f.write(f"{report['summary_table']}\n\n{report['table']}\n")
    return report


def write_json(report: dict, study_dir: str) -> None:
    """study.json (rows, summary, timings); the timings are also appended to study.md."""
    keys = ("recipe", "title", "judges", "rows", "summary", "verdict", "timings")
    with open(os.path.join(study_dir, "study.json"), "w") as f:
        json.dump({key: report[key] for key in keys}, f, indent=2)
    with open(os.path.join(study_dir, "study.md"), "a") as f:
        f.write("\n" + "\n".join(f"- {sentence}" for sentence in report["verdict"]["sentences"]) + "\n")
        f.write("\n" + format_timings(report["timings"]) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Run the study from command-line arguments: a recipe, recipe flags and `--study_*` flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options, recipe_argv = parse_options(argv)
    return run_study(recipe_argv, options)


def cli(argv: list[str] | None = None) -> int:
    """`locedit study RECIPE [--key value ...] [--study_random N] [--study_single N] [--study_lr_all LR]
    [--study_lr_single LR]`: a user's mistake prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        main(argv)
    except USER_ERRORS as err:
        print(f"locedit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
