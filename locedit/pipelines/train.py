"""A training recipe, end to end: plan, (probe,) train, write the run directory, and evaluate when asked."""

from __future__ import annotations

import contextlib
import gc

from .. import processes
from ..core.recipe import Recipe
from ..core.tracking import wandb_tracking
from ..evaluation import check_settings, evaluate_after_training
from ..models.loading import load_model_and_tokenizer
from ..plan import RunPlan, make_plan
from ..rundir import clear_finished, read_metrics, run_lock, write_run_description
from ..training import train_edits
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
    eval_resources = check_settings(recipe.eval) if recipe.eval.eval_after_train else None
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
    return metrics


def _train(recipe: Recipe, plan: RunPlan, is_main: bool) -> dict:
    """Load the model, (probe,) write the run description, train and write the results."""
    edit_args, model_args, training_args = recipe.edit, recipe.model, recipe.training
    with wandb_tracking(training_args, edit_args.wandb_project, plan.spec.family, announce=is_main):
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
