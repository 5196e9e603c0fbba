"""A training recipe, end to end: plan, (probe,) train, write the run directory, and evaluate when asked."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os

from .. import processes
from ..core.recipe import Recipe
from ..core.tracking import run_tracking
from ..evaluation import check_settings, evaluate_after_training, preference_data
from ..heads import HeadSpec
from ..models.loading import load_model_and_tokenizer
from ..plan import RunPlan, make_plan
from ..rundir import clear_finished, is_finished, read_metrics, run_lock, write_metrics, write_run_description
from ..training import plan_edits, train_edits
from .locate import locate_heads


def train_recipe(recipe: Recipe) -> dict | RunPlan:
    """Plan, then (unless dry_run) train the edit and write the run directory. Returns the plan or the metrics."""

    edit_args, model_args, training_args = recipe.edit, recipe.model, recipe.training
    plan = make_plan(recipe)
    is_main = processes.state().is_main_process
    if is_main:
        print(plan.describe(model_args, edit_args, training_args), flush=True)
    # eval_after_train: the judges and the corpus are checked now (in every process, so all stop alike), not after
    # hours of training; the main process evaluates.
    eval_resources = check_settings(recipe.eval, preference_data(recipe)) if recipe.eval.eval_after_train else None
    if edit_args.dry_run:
        return plan

    training_args.output_dir = plan.output_dir
    if plan.finished:
        # The same command again: the run is done (its metrics.json is there); training again would overwrite it.
        if is_main:
            print(f"locedit: '{plan.output_dir}' holds this run, finished; nothing to train", flush=True)
        metrics = read_metrics(plan.output_dir)
    else:
        # The main process holds the run directory: a second run into it refuses while this one lives.
        with run_lock(plan.output_dir) if is_main else contextlib.nullcontext():
            metrics = _train(recipe, plan, is_main)
    if eval_resources is not None:
        # eval_after_train: evaluate the edits just written once the training model is freed, the edits shared
        # among the processes of a launch (one each, for a multi-edit run) once the main one has written them.
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        processes.wait_for_everyone()
        evaluate_after_training(recipe, [plan.output_dir], eval_resources)
    processes.end_launch()
    return metrics


def _train(recipe: Recipe, plan: RunPlan, is_main: bool) -> dict:
    """Load the model, (probe,) write the run description, train and write the results."""
    edit_args, model_args, training_args = recipe.edit, recipe.model, recipe.training
    with run_tracking(training_args, edit_args.wandb_project, plan.spec.family, announce=is_main):
        model = tokenizer = None
        if plan.heads is None:
            # probe:K / importance:K with no saved scores yet: score the heads on the loaded model, then train at
            # those it ranks first.
            model, tokenizer = load_model_and_tokenizer(plan.model_path, model_args, training_args.trust_remote_code)
            locate_heads(plan, recipe, model, tokenizer)
            if is_main:
                print(f"  heads        {plan.heads_line()}", flush=True)
        if is_main:
            clear_finished(plan.output_dir)  # a run going on (more steps) is unfinished until it ends
            write_run_description(
                plan.output_dir, recipe, plan.heads, plan.layout, plan.splits, plan.located_dirs, spec=plan.spec
            )
        if model is None:
            model, tokenizer = load_model_and_tokenizer(plan.model_path, model_args, training_args.trust_remote_code)
        return train_edits(recipe, plan, model, tokenizer)


SHARES_DIR = "shares"


def share_dir(run_dir: str, edits: list[str]) -> str:
    """Where a share of a multi-edit run's edits keeps its own trainer state and checkpoints: one directory per set
    of edits, so that a run resumes only the share it was."""
    digest = hashlib.sha1("\n".join(sorted(edits)).encode()).hexdigest()[:10]
    return os.path.join(run_dir, SHARES_DIR, f"{len(edits)}-edits-{digest}")


def train_share(recipe: Recipe, edits: list[str]) -> dict:
    """Train some edits of a multi-edit recipe (names of its edit directories) as one multi-edit run of their own:
    a study's share of a family on one process. The edits are written where the recipe's run writes them; its run
    directory lists them once every share has ended (`complete_multi_edit_run`)."""
    plan = make_plan(recipe)
    run_dir = share_dir(plan.output_dir, edits)
    recipe.training.output_dir = run_dir
    with run_lock(run_dir):
        model, tokenizer = load_model_and_tokenizer(plan.model_path, recipe.model, recipe.training.trust_remote_code)
        return train_edits(recipe, plan, model, tokenizer, edits=edits, run_dir=run_dir)


def multi_edit_names(recipe: Recipe) -> list[str] | None:
    """The names of a multi-edit recipe's edit directories, in order; None for a recipe of one edit, or of edits
    whose heads a locator picks first (they train as one run)."""
    spec = HeadSpec.of(recipe.edit)
    if not spec.is_multi_edit or spec.locator:
        return None
    plan = make_plan(recipe)
    return [os.path.basename(run.output_dir) for run in plan_edits(recipe, plan)]


def complete_multi_edit_run(recipe: Recipe) -> bool:
    """Once every edit of a multi-edit recipe is finished (trained in shares), its run directory as one run writes
    it: the description and a metrics.json listing the edits, so that the run reads as finished. Returns whether
    the run is finished."""
    plan = make_plan(recipe)
    if plan.finished:
        return True
    runs = plan_edits(recipe, plan)
    if not all(is_finished(run.output_dir) for run in runs):
        return False
    write_run_description(
        plan.output_dir, recipe, runs[0].heads, plan.layout, plan.splits, plan.located_dirs, spec=plan.spec
    )
    shares = os.path.join(plan.output_dir, SHARES_DIR)
    write_metrics(
        plan.output_dir,
        {
            "edits": [os.path.basename(run.output_dir) for run in runs],
            "shares": sorted(os.listdir(shares)) if os.path.isdir(shares) else [],
            "data_rows_skipped": plan.data_rows_skipped,
        },
    )
    return True
