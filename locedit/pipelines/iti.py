"""ITI's edit from a recipe: the heads it selects (probe:K, random sets, ...) made into run directories.

    locedit iti recipes/probe_heads_16.yaml --iti_alpha 15
    python -m locedit.iti recipes/random_heads_16.yaml --heads_seed 3 --probe_results outputs/probe_heads_16/probe

Each head set's run directory is laid out like a trained run's (adapter, heads.json, splits.json, recipe.yaml and
metrics.json with method, alpha and heads), so ITI and the optimal edit at the same heads evaluate alike.
"""

from __future__ import annotations

import os

from ..core.recipe import Recipe
from ..core.tracking import Table, tracked_run
from ..edit import add_iti_edit
from ..heads import HeadSpec, draw_recipe, format_heads
from ..locate.probes import PROBE_JSON
from ..models.loading import load_model_and_tokenizer
from ..plan import make_plan
from ..rundir import (
    METRICS,
    clear_finished,
    is_finished,
    iti_output_dir,
    read_metrics,
    run_lock,
    write_metrics,
    write_run_description,
)
from .locate import locate_heads


def iti_run_dir(recipe: Recipe, spec: HeadSpec | None = None) -> str:
    """outputs/<recipe>/iti-<heads>-alpha<alpha>: one directory per head set and strength (`spec`: the recipe's
    head spec, when the caller holds it)."""
    return iti_output_dir(recipe.edit, recipe.probe.iti_alpha, recipe.name, spec)


def _draws(recipe: Recipe, spec: HeadSpec, output_dir: str, layout) -> list[tuple[Recipe, HeadSpec, str]]:
    """One (recipe, spec, output_dir) per head set: `heads_draws` / `single:K` give several, each in its own
    directory."""
    draws = spec.edits(layout)
    if len(draws) == 1:
        return [(recipe, spec, output_dir)]
    runs = []
    for draw in draws:
        single = draw_recipe(recipe, draw)
        runs.append((single, draw, os.path.join(output_dir, os.path.basename(iti_run_dir(recipe, draw)))))
    return runs


def _made_from(output_dir: str, probe_dir: str) -> bool:
    """Whether `output_dir` holds an ITI edit finished after the probe result in `probe_dir` was written."""
    if not is_finished(output_dir):
        return False
    return os.path.getmtime(os.path.join(output_dir, METRICS)) >= os.path.getmtime(os.path.join(probe_dir, PROBE_JSON))


def describe(plan, recipe: Recipe, runs: list[tuple[Recipe, HeadSpec, str]]) -> str:
    probe = plan.probe_result.path if plan.probe_result is not None else f"{plan.probe_dir} (probe stage runs first)"
    if len(runs) == 1:
        heads = [f"  heads        {plan.heads_line()}"]
    else:  # several draws of a random spec: each draw's heads (no probe scores needed)
        heads = [
            f"  heads        {draw} seed {draw.seed} -> {format_heads(draw.resolve(plan.layout))}"
            for _, draw, _ in runs
        ]
    lines = [
        "locedit iti",
        f"  model        {recipe.model.model_name_or_path} ({plan.layout.model_type}, {plan.layout.shape}, "
        f"head_dim {plan.head_dim})",
        *heads,
        f"  edit         alpha {recipe.probe.iti_alpha:g} * sigma * u at each head (a constant edit; merges into a "
        "bias)",
        f"  probe        {probe}",
        f"  data         {plan.data_line(recipe.edit)}",
    ]
    lines += [f"  output_dir   {output_dir}" for _, _, output_dir in runs]
    return "\n".join(lines)


def make_iti_edits(recipe: Recipe):
    """Make ITI's edit at the recipe's heads and write its run directory (one per head set). Returns the plan in a
    dry run, else the run's metrics (for several head sets, the list of their run directories under "edits")."""
    recipe.edit.edit_strength = "constant"  # what ITI is; recorded as such in the run's recipe.yaml
    args = recipe.training
    output_dir = args.output_dir if args.output_dir_was_given else iti_run_dir(recipe)
    plan = make_plan(recipe, need_probe=True, output_dir=output_dir)
    runs = _draws(recipe, plan.spec, plan.output_dir, plan.layout)
    print(describe(plan, recipe, runs), flush=True)
    if recipe.edit.dry_run:
        return plan

    result = plan.probe_result
    if result is not None and all(_made_from(output_dir, result.path) for _, _, output_dir in runs):
        # The same command again (a study started again): the edits are made from this probe result already.
        print(f"locedit: '{plan.output_dir}' holds these ITI edits, made from this probe result; left as they are")
        return read_metrics(plan.output_dir)
    with run_lock(plan.output_dir):
        clear_finished(plan.output_dir)
        model, tokenizer = load_model_and_tokenizer(plan.model_path, recipe.model, args.trust_remote_code)
        if plan.missing:
            locate_heads(plan, recipe, model, tokenizer)
            print(f"  heads        {plan.heads_line()}", flush=True)
        result, alpha = plan.probe_result, recipe.probe.iti_alpha
        metrics, made = {}, []
        for run_recipe, draw, output_dir in runs:
            heads = plan.heads if draw is plan.spec else draw.resolve(plan.layout)
            edited = add_iti_edit(model, result, heads, alpha)
            clear_finished(output_dir)  # a rewrite stopped half way must not look finished
            write_run_description(
                output_dir, run_recipe, heads, plan.layout, plan.splits, plan.located_dirs, spec=draw
            )
            edited.save_pretrained(output_dir)
            metrics = {
                "method": "iti",
                "iti_alpha": alpha,
                "heads": [list(h) for h in heads],
                "heads_spec": format_heads(heads),
                "probe_results": result.path,
                "probe_val_accuracy": [round(float(result.val_accuracy[layer, head]), 6) for layer, head in heads],
                "theta_norm": [round(float(result.sigma[layer, head]), 6) for layer, head in heads],  # ||sigma u||
            }
            write_metrics(output_dir, metrics)  # last: marks the run finished
            made.append((os.path.basename(output_dir), metrics))
            model = edited.unload()  # the base model again, for the next head set
            print(f"  saved        {output_dir}", flush=True)
        if len(runs) > 1:
            # As a multi-edit training run: the top directory lists its edits; `locedit eval DIR` evaluates them all.
            metrics = {"method": "iti", "iti_alpha": alpha, "edits": [os.path.basename(d) for _, _, d in runs]}
            write_metrics(plan.output_dir, metrics)
    track_iti_edits(recipe, plan, made)
    return metrics


def track_iti_edits(recipe: Recipe, plan, made: list[tuple[str, dict]]) -> None:
    """The ITI edits just made as a tracked run named after their directory (report_to): one row per edit, its
    heads, their probe accuracies and the norm of each head's shift."""
    columns = ["edit", "heads", "iti_alpha", "probe_val_accuracy", "theta_norm"]
    listed = lambda values: ", ".join(f"{value:.4g}" for value in values)  # noqa: E731  (one cell per edit)
    rows = [
        [name, m["heads_spec"], m["iti_alpha"], listed(m["probe_val_accuracy"]), listed(m["theta_norm"])]
        for name, m in made
    ]
    name, family = os.path.basename(plan.output_dir), plan.spec.family
    config = {"model": recipe.model.model_name_or_path, "probe_results": plan.probe_result.path}
    with tracked_run(recipe.training.report_to, recipe.edit.wandb_project, name, family, "iti", config) as run:
        if run is not None:
            run.log({"iti/edits": Table(columns, rows)})
