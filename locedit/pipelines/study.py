"""The study: every stage of the paper's comparison from one `probe:K` recipe (`locedit study`).

Its families: ITI at the probe heads and at random heads; optimal edits at the probe heads, at the heads every other
localization heuristic ranks first (one family per locator of `locedit.locate.LOCATORS`, e.g. gradient importance:
`importance:K`, with the same K), at random heads, at single heads and at all heads.

Under `accelerate launch --num_processes N` every stage uses every process (`locedit.processes`): the probes'
activations and the other heuristics' scores are computed by example shares, every edit of every family is dealt to
the processes, and each process trains its share of a family as one multi-edit run alone on its own device (in its
own interpreter on CPUs, `processes.alone`; in one child process for all its runs on GPUs), so that the edits are
those of one process; the evaluation shares its models, and the main process makes ITI's edits and writes the report.
The files are those one process writes. A model too large for one device is trained data parallel (or sharded) by
`accelerate launch -m locedit.train` with each family's printed command first; the study then finds those runs
finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import processes
from ..config import parse_recipe
from ..core import threads
from ..core.errors import RecipeError
from ..core.plugins import load_plugins
from ..core.recipe import STUDY_CHECKS, Recipe
from ..data import validate_dataset_arg
from ..evaluation import check_settings, evaluate, preference_data
from ..evaluation.breakage import Breakage
from ..evaluation.metric_registry import PREFERENCE_MAIN, per_question_metrics
from ..heads import HeadSpec
from ..locate import LOCATORS, probe_recipe
from ..models.sources import resolve_model_path
from ..reporting import Run, read_run, write_report
from ..reporting.study import format_timings, track_study, write_study_files, write_study_report
from ..rundir import expand_run_dirs, is_finished, output_dir_of
from .iti import iti_run_dir, make_iti_edits
from .locate import locate_together
from .train import complete_multi_edit_run, multi_edit_names, train_recipe, train_share

# The paper's learning rates (appendix A) relative to its 16-head one, 5e-4: 1e-4 for all heads, 2e-3 for one head.
LR_SCALE = {"all": 0.2, "single": 4.0}
STUDY_DIR = "study"
REPORT_DIR = "report"


@dataclass
class StudyOptions:
    random: int = 8  # random sets of K heads (the paper draws 16)
    single: int = 8  # random single heads (the paper draws 24)
    lr_all: float | None = None  # default: the recipe's learning rate x LR_SCALE["all"]
    lr_single: float | None = None  # default: the recipe's learning rate x LR_SCALE["single"]
    heuristics: tuple[str, ...] = ()  # other locators whose K best heads get an optimal edit (importance, ...)

    @classmethod
    def of(cls, recipe: Recipe) -> StudyOptions:
        """The recipe's `study_*` settings (its file's keys, or flags)."""
        study = recipe.study
        heuristics = tuple(
            name.strip() for name in study.study_heuristics.split(",") if name.strip() not in ("", "none")
        )
        return cls(study.study_random, study.study_single, study.study_lr_all, study.study_lr_single, heuristics)


STUDY_FLAGS = ("--study_random", "--study_single", "--study_lr_all", "--study_lr_single", "--study_heuristics")


def parse_options(argv: list[str]) -> tuple[StudyOptions, list[str]]:
    """The study's `study_*` settings (from the recipe file, or `--study_*` flags), and the recipe's arguments
    without the `--study_*` flags (what each stage's command gets)."""
    options = StudyOptions.of(parse_recipe(list(argv), prog="locedit study"))
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in STUDY_FLAGS:
            skip = True
        elif not arg.startswith(tuple(flag + "=" for flag in STUDY_FLAGS)):
            rest.append(arg)
    return options, rest


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


def family_flags(recipe: Recipe, options: StudyOptions, spec: HeadSpec | None = None) -> list[tuple[str, list[str]]]:
    """(family, recipe flags) of each optimal edit the study trains, in order (`spec`: the recipe's `probe:K`, parsed
    here when not given)."""
    spec = spec or HeadSpec.of(recipe.edit)
    lr = recipe.training.learning_rate
    lr_all = options.lr_all if options.lr_all is not None else lr * LR_SCALE["all"]
    lr_single = options.lr_single if options.lr_single is not None else lr * LR_SCALE["single"]
    families = [("probe", ["--heads", spec.text])]
    # The other localization heuristics asked for, at as many heads as the probes pick.
    families += [(name, heuristic_flags(spec, name)) for name in options.heuristics]
    if options.random:
        families.append(("random", random_heads_flags(spec, options)))
    if options.single:
        families.append(("single", ["--heads", f"single:{options.single}", "--learning_rate", f"{lr_single:g}"]))
    families.append(("all", ["--heads", "all", "--learning_rate", f"{lr_all:g}"]))
    return families


def check_study_recipe(recipe: Recipe) -> HeadSpec:
    """The study needs `probe:K` heads; plugins add their own checks. Returns the recipe's head spec."""
    validate_dataset_arg(recipe.edit.dataset)  # a missing data file now, not after the model is built or converted
    spec = HeadSpec.of(recipe.edit)
    if spec.locator != "probe":
        raise RecipeError(
            f"the study compares edits at the probe heads with others: set heads to probe:K, not '{recipe.edit.heads}'"
        )
    if recipe.training.output_dir_was_given:  # every stage would write its runs into that one directory
        raise RecipeError(
            f"output_dir '{recipe.training.output_dir}' names one run's directory; the study names each stage's own "
            f"under outputs/{recipe.name}/ (after the recipe file's name): run it from another directory, or copy the "
            "recipe under another name"
        )
    load_plugins()  # a plugin's heuristics and checks register when it is imported
    heuristics = StudyOptions.of(recipe).heuristics
    unknown = [name for name in heuristics if name not in LOCATORS or name == "probe"]
    if unknown:
        others = ", ".join(sorted(set(LOCATORS) - {"probe"}))
        raise RecipeError(
            f"study_heuristics names {', '.join(unknown)}: not a heuristic besides the probes ({others})"
        )
    if recipe.study.study_metric is not None:
        scores = [metric.key for metric in per_question_metrics()]
        if recipe.study.study_metric not in scores:
            raise RecipeError(
                f"study_metric '{recipe.study.study_metric}' is not valid; choose one of {', '.join(scores)}"
            )
    for check in STUDY_CHECKS:
        check(recipe)
    return spec


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of the child processes it has waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Timer:
    """Wall and CPU seconds (all threads of the process, and the training runs it started) of each stage."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            entry = self.stages.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - wall
            entry["cpu_s"] += _cpu_seconds() - cpu

    def of_every_process(self) -> dict[str, dict[str, float]]:
        """The stages of every process of a launch: the longest wall time of each (they ran side by side) and the
        CPU time of all of them."""
        merged: dict[str, dict[str, float]] = {}
        for stages in processes.gather([(processes.index(), self.stages)]):
            for stage, entry in stages.items():
                into = merged.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0})
                into["wall_s"] = max(into["wall_s"], entry["wall_s"])
                into["cpu_s"] += entry["cpu_s"]
        return merged


def free_device_memory() -> None:
    """What this process's earlier stages left on its GPU (the probes' and ITI's models, in torch's cache)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class TrainJob:
    """One edit of the study's training: its family, the family's recipe flags, and its name among the family's
    edits (None: the family is one edit, or edits a locator picks first, trained as one run)."""

    family: str
    flags: tuple[str, ...]
    edit: str | None
    edit_dir: str
    family_edits: int = 1  # how many edits the family has

    def finished(self) -> bool:
        return is_finished(self.edit_dir)


def family_jobs(family: str, flags: list[str], stage_recipe) -> list[TrainJob]:
    """The edits of one family, one job each (a family of one edit, or of located heads, is one job)."""
    recipe = stage_recipe("train", flags)
    run_dir = output_dir_of(recipe)
    names = multi_edit_names(recipe)
    if names is None:
        return [TrainJob(family, tuple(flags), None, run_dir)]
    return [TrainJob(family, tuple(flags), name, os.path.join(run_dir, name), len(names)) for name in names]


def train_jobs(base_argv: list[str], jobs: list[TrainJob], timer=None, announce: bool = True) -> None:
    """Train this process's jobs, family by family: a family's whole set of edits as its own run (`locedit train`
    would make the same), part of it as a share (`train_share`). Under a launch the runs are made as by a process
    started alone: in this interpreter on CPUs, in one child process for all of them on GPUs."""
    if processes.count() > 1 and not processes.can_run_alone_here():
        return train_jobs_in_child(base_argv, jobs)
    with processes.alone():
        for family, flags, edits in group_jobs(jobs):
            argv = [*base_argv, *flags]
            recipe = parse_recipe(argv, prog="locedit train")
            with timer(f"train {family}") if timer else contextlib.nullcontext():
                if announce:
                    share = "" if edits is None else f" ({len(edits)} of its edits: {', '.join(edits)})"
                    print(f"\nlocedit study: {shlex.join(['locedit', 'train', *argv])}{share}", flush=True)
                if edits is None:
                    train_recipe(recipe)
                else:
                    train_share(recipe, edits)


def group_jobs(jobs: list[TrainJob]) -> list[tuple[str, tuple[str, ...], list[str] | None]]:
    """(family, flags, edits) of each run the jobs make, in order: edits None for a whole family."""
    groups: dict[tuple[str, ...], list[TrainJob]] = {}
    for job in jobs:
        groups.setdefault(job.flags, []).append(job)
    runs = []
    for flags, members in groups.items():
        whole = members[0].edit is None or len(members) == members[0].family_edits
        runs.append((members[0].family, flags, None if whole else [job.edit for job in members]))
    return runs


def train_jobs_in_child(base_argv: list[str], jobs: list[TrainJob]) -> None:
    """`train_jobs` in one child process that runs alone on this process's device (outside the launch's process
    group): every run of this process's share in one interpreter."""
    if not jobs:
        return
    payload = json.dumps({"base_argv": base_argv, "jobs": [dataclasses.asdict(job) for job in jobs]})
    command = [sys.executable, "-m", "locedit.pipelines.study", payload]
    child = subprocess.Popen(command, env=processes.solo_environment(), preexec_fn=processes.die_with_parent())
    returncode = child.wait()
    if returncode != 0:
        raise RecipeError(
            f"the training runs of process {processes.index()} failed (exit code {returncode}); their output is above"
        )


if __name__ == "__main__":  # train_jobs_in_child's child
    given = json.loads(sys.argv[1])
    jobs = [TrainJob(**{**job, "flags": tuple(job["flags"])}) for job in given["jobs"]]
    train_jobs(given["base_argv"], jobs)


def run_study(recipe_argv: list[str], options: StudyOptions) -> dict:
    """Run every stage of the study and write its report. Returns the report: rows, summary, timings."""
    timer = Timer()
    recipe = parse_recipe(recipe_argv, prog="locedit study")
    spec = check_study_recipe(recipe)
    study_dir = os.path.join("outputs", recipe.name, STUDY_DIR)
    base_argv = list(recipe_argv)

    def stage_recipe(command: str, flags: list[str]) -> Recipe:
        return parse_recipe(base_argv + flags, prog=f"locedit {command}")

    main = processes.is_main()  # under `accelerate launch`, every process works and the main one narrates

    def stage(command: str, flags: list[str], shown: list[str] | None = None) -> Recipe:
        if main:
            shown_command = shlex.join(["locedit", command, *(shown or []), *base_argv, *flags])
            print(f"\nlocedit study: {shown_command}", flush=True)
        return stage_recipe(command, flags)

    if main:
        print(f"locedit study: {recipe.name}: model {recipe.model.model_name_or_path}, data {recipe.edit.dataset}")
        print(f"locedit study: threads {threads.describe()}")
    if recipe.edit.dry_run:
        with contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO()):
            return _dry_run(recipe, options, spec, stage)

    # Every stage planned and the judges and corpus checked before the first stage runs, exactly as the dry run
    # does (its output kept back): a mistake in a late stage ends the study now, not after the earlier stages.
    def planned(command: str, flags: list[str], shown: list[str] | None = None) -> Recipe:
        return stage_recipe(command, [*flags, "--dry_run", "true"])

    with timer("model"):  # the model resolved and every stage planned
        with contextlib.redirect_stdout(io.StringIO()):
            _dry_run(recipe, options, spec, planned)
        with processes.main_first():  # one process builds what is built once (the toy model), the others find it
            resolve_model_path(recipe.model.model_name_or_path)  # pre-trains the toy model on first use
    with timer("probe"):
        if not recipe.probe.probe_results:  # a probe result given is the study's: its heads and ITI's probes
            probe_recipe(stage("probe", []))
    for name in options.heuristics:  # the other heuristics' scores, before training, every process doing its share
        with timer(name):
            locate_together(stage_recipe("train", heuristic_flags(spec, name)))

    edits: list[tuple[str, str]] = []  # (family, run directory) of every edit, in the table's order
    with timer("iti"):  # quick: the main process makes ITI's edits, the others wait for them
        iti_recipes = [stage("iti", [])]
        if options.random:  # the same random sets as the optimal edits' (same heads_seed), for Fig. 1a
            iti_recipes.append(stage("iti", random_heads_flags(spec, options)))
        if main:
            for iti_recipe in iti_recipes:
                make_iti_edits(iti_recipe)
        processes.wait_for_everyone()
        edits.append(("iti", iti_run_dir(iti_recipes[0])))
        if options.random:
            edits += [("iti_random", edit_dir) for edit_dir in expand_run_dirs([iti_run_dir(iti_recipes[1])])]

    families = family_flags(recipe, options, spec)
    run_dirs = [output_dir_of(stage_recipe("train", flags)) for _, flags in families]
    # One process times each family's run; under a launch the families are split among the processes, so the stage
    # is timed whole.
    alone = processes.count() == 1
    with contextlib.nullcontext() if alone else timer("train"):
        # The unit of work is one edit: every edit of every family is dealt to the processes, and each process trains
        # its share of a family as one multi-edit run (the edits are those one process makes, whatever the share).
        jobs = [job for (family, flags) in families for job in family_jobs(family, flags, stage_recipe)]
        mine = [job for _, job in processes.share(jobs) if not job.finished()]
        if not alone:
            free_device_memory()  # the device's memory goes to the training runs
        train_jobs(base_argv, mine, timer if alone else None, announce=main or not alone)
        processes.wait_for_everyone()
        if main:  # a family trained in shares reads as one finished run
            for (_, flags), run_dir in zip(families, run_dirs, strict=True):
                if not is_finished(run_dir):
                    complete_multi_edit_run(stage_recipe("train", flags))
        processes.wait_for_everyone()
    for (family, _), run_dir in zip(families, run_dirs, strict=True):
        edits += [(family, edit_dir) for edit_dir in expand_run_dirs([run_dir])]  # a multi-edit run: one per edit

    base_dir = os.path.join(study_dir, "base")
    with timer("eval"):
        eval_recipe = stage("eval", ["--eval_output_dir", base_dir], shown=["RUN_DIR...", "--base"])
        evaluate(eval_recipe, [run_dir for _, run_dir in edits], base=True)

    timings = timer.of_every_process()
    if not main:
        return {}
    with timer("report"):
        # The study's table and the paper's report read the same runs from their directories.
        runs = [read_run(Path(run_dir), family) for family, run_dir in [("base", base_dir), *edits]]
        metric = verdict_metric(recipe, runs)
        report = write_study_report(runs, recipe, study_dir, metric)
        report["verdict"] = write_paper_report(runs, recipe, study_dir, metric)
    report["timings"] = {**timings, "report": timer.stages["report"]}
    write_study_files(report, recipe, study_dir)
    track_study(report, recipe, study_dir, os.path.join(study_dir, REPORT_DIR))
    print(f"\n{report['table']}\n\n{report['summary_table']}\n\n{format_timings(report['timings'])}", flush=True)
    print("\n" + "\n".join(f"- {sentence}" for sentence in report["verdict"]["sentences"]), flush=True)
    print(
        f"\nlocedit study: wrote {study_dir}/study.md, study.json and study.png; the paper's figures, table and "
        f"verdict in {study_dir}/{REPORT_DIR}/",
        flush=True,
    )
    return report


def _dry_run(recipe: Recipe, options: StudyOptions, spec: HeadSpec, stage) -> dict:
    """Check every stage's recipe and print its plan (the flags carry --dry_run true to each): probe, ITI, each
    family's training, and the evaluation's settings, judges and corpus (its runs do not exist yet)."""
    if not recipe.probe.probe_results:
        probe_recipe(stage("probe", []))
    make_iti_edits(stage("iti", []))
    if options.random:
        make_iti_edits(stage("iti", random_heads_flags(spec, options)))
    for _, flags in family_flags(recipe, options, spec):
        train_recipe(stage("train", flags))
    eval_recipe = stage("eval", [])  # the judges load (config, or one endpoint request) and the corpus reads
    check_settings(eval_recipe.eval, preference_data(eval_recipe))
    print(
        "\nlocedit study: dry run: every stage's recipe is checked, and the judges and corpus; eval and the report "
        "need the runs",
        flush=True,
    )
    return {"dry_run": True}


def heuristic_flags(spec: HeadSpec, name: str) -> list[str]:
    """The head flags of another localization heuristic's K best heads (K of the recipe's `probe:K`)."""
    return ["--heads", f"{name}:{spec.count}"]


def random_heads_flags(spec: HeadSpec, options: StudyOptions) -> list[str]:
    """The head flags of the `--study_random` random sets of K heads (K of the recipe's `probe:K`)."""
    return ["--heads", f"random:{spec.count}", "--heads_draws", str(options.random)]


def verdict_metric(recipe: Recipe, runs: list[Run] = ()) -> str:
    """The recipe's study_metric; else True*Info, which needs both judges; with a truth judge alone the verdict runs
    on True, with none on MC2. Where no evaluated run has that score but they have the preference metric
    (preference-style data, whose `auto` judges are none), on the share of held-out pairs whose chosen completion
    the model prefers."""
    if recipe.study.study_metric:
        return recipe.study.study_metric
    judged = {aspect: getattr(recipe.eval, f"eval_judge_{aspect}") not in ("", "none") for aspect in ("truth", "info")}
    metric = "true_info" if all(judged.values()) else ("true" if judged["truth"] else "mc2")
    has = {key for run in runs for key, value in run.metrics.items() if value is not None}
    return PREFERENCE_MAIN if runs and metric not in has and PREFERENCE_MAIN in has else metric


def write_paper_report(runs: list[Run], recipe: Recipe, study_dir: str, metric: str) -> dict:
    """`locedit report` of the study's runs in `study/report/`: the paper's figures, table and verdict (tracked
    with the study's own, `track_study`)."""
    return write_report(
        runs, os.path.join(study_dir, REPORT_DIR), "none", metric=metric, breakage=Breakage.of(recipe.eval)
    )
