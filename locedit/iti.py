"""ITI's edit (Li et al. 2023; paper eq. 2.5-2.6) as a locedit edit, so it is loaded and evaluated like a trained one.

    locedit iti recipes/probe_heads_16.yaml --iti_alpha 15
    python -m locedit.iti recipes/random_heads_16.yaml --heads_seed 3 --probe_results outputs/probe_heads_16/probe

For each selected head h, ITI adds alpha * theta_h, theta_h = sigma_h * u_h (u the head's mass-mean direction,
sigma the standard deviation of its activations along u; `locedit.probe`), to the head's output at every position,
generated tokens included:

    r' = r + W (o + alpha theta) = r + W o + W (alpha theta)

That is a constant edit o' = o + m * b with b = alpha theta on the selected heads (`edit_strength="constant"`):
unmerged it adds b to the projection's input; merged it becomes the projection's bias W (alpha theta), free at
inference. (Setting the bias to alpha theta without the W projection, as one public implementation did, is a
different edit.) The run directory is laid out like a trained run's: adapter, heads.json, splits.json, recipe.yaml
and metrics.json (method, alpha, heads), so "ITI at these heads with alpha" and "the optimal edit at these heads"
load and evaluate alike.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import replace

import torch
from peft import PeftModel
from torch import nn

from .edit import HeadEditConfig, add_edit, edit_layers
from .heads import AttentionLayout, format_heads, heads_by_layer, resolve_heads
from .multi import expand_head_specs
from .recipe import Recipe, run_command


def iti_vectors(result, heads: list[tuple[int, int]], alpha: float) -> dict[int, torch.Tensor]:
    """Per edited layer, the (heads * head_dim,) vector alpha * sigma_h * u_h on each selected head h, 0 elsewhere."""
    vectors = {}
    for layer, layer_heads in heads_by_layer(heads).items():
        vector = torch.zeros(result.num_heads, result.head_dim)
        for head in layer_heads:
            vector[head] = alpha * result.theta(layer, head).float()
        vectors[layer] = vector.reshape(-1)
    return vectors


def add_iti_edit(
    model: nn.Module, result, heads: list[tuple[int, int]], alpha: float, adapter_name: str = "default"
) -> PeftModel:
    """Wrap a model with ITI's edit at `heads` with strength `alpha`: a constant locedit edit (load, enable,
    disable, save and merge like any other)."""
    layout = AttentionLayout.from_model(model)
    result.check_fits(layout, head_dim=layout.head_dim(model))
    config = HeadEditConfig.for_heads(layout, heads, edit_strength="constant")
    edited = add_edit(model, config, adapter_name=adapter_name)
    vectors = iti_vectors(result, heads, alpha)
    for layer, module in edit_layers(edited).items():
        weight = module.lora_B[adapter_name].weight
        weight.data.copy_(vectors[layer].to(device=weight.device, dtype=weight.dtype)[None])
    return edited


def iti_output_dir(recipe: Recipe) -> str:
    """outputs/<recipe>/iti-<heads>-alpha<alpha>: one directory per head set and strength."""
    from .train import heads_slug

    return os.path.join("outputs", recipe.name, f"iti-{heads_slug(recipe.edit)}-alpha{recipe.probe.iti_alpha:g}")


def _draws(recipe: Recipe, output_dir: str, layout) -> list[tuple[Recipe, str]]:
    """One (recipe, output_dir) per head set: `heads_draws` / `single:K` give several, each in its own directory."""
    edit_args = recipe.edit
    draws = expand_head_specs(edit_args.heads, edit_args.heads_seed, edit_args.heads_draws, layout)
    if len(draws) == 1:
        return [(recipe, output_dir)]
    runs = []
    for spec, seed in draws:
        single = copy.copy(recipe)
        single.edit = replace(edit_args, heads=spec, heads_seed=seed, heads_draws=1)
        runs.append((single, os.path.join(output_dir, os.path.basename(iti_output_dir(single)))))
    return runs


def describe(plan, recipe: Recipe, runs: list[tuple[Recipe, str]]) -> str:
    probe = plan.probe_result.path if plan.probe_result is not None else f"{plan.probe_dir} (probe stage runs first)"
    if len(runs) == 1:
        heads = [f"  heads        {plan.heads_line(recipe.edit)}"]
    else:  # several draws of a random spec: each draw's heads (no probe scores needed)
        heads = [
            f"  heads        {run.edit.heads} seed {run.edit.heads_seed} -> "
            f"{format_heads(resolve_heads(run.edit.heads, plan.layout, seed=run.edit.heads_seed))}"
            for run, _ in runs
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
    lines += [f"  output_dir   {output_dir}" for _, output_dir in runs]
    return "\n".join(lines)


def main(recipe: Recipe):
    """Make ITI's edit at the recipe's heads and write its run directory (one per head set). Returns the plan in a
    dry run, else the run's metrics (for several head sets, the list of their run directories under "edits")."""
    from .train import (
        _write_json_atomic,
        load_model_and_tokenizer,
        make_plan,
        resolve_probe_heads,
        write_run_description,
    )

    recipe.edit.edit_strength = "constant"  # what ITI is; recorded as such in the run's recipe.yaml
    plan = make_plan(recipe, need_probe=True)
    args = recipe.training
    plan.output_dir = args.output_dir if args.output_dir_was_given else iti_output_dir(recipe)
    runs = _draws(recipe, plan.output_dir, plan.layout)
    print(describe(plan, recipe, runs), flush=True)
    if recipe.edit.dry_run:
        return plan

    model, tokenizer = load_model_and_tokenizer(plan.model_path, recipe.model, args.trust_remote_code)
    if plan.probe_result is None:
        resolve_probe_heads(plan, recipe, model, tokenizer)
        print(f"  heads        {plan.heads_line(recipe.edit)}", flush=True)
    result, alpha = plan.probe_result, recipe.probe.iti_alpha
    metrics = {}
    for run_recipe, output_dir in runs:
        heads = plan.heads
        if run_recipe is not recipe or heads is None:
            spec, seed = run_recipe.edit.heads, run_recipe.edit.heads_seed
            heads = resolve_heads(spec, plan.layout, seed=seed, probe_scores=result.val_accuracy.tolist())
        edited = add_iti_edit(model, result, heads, alpha)
        run_plan = replace(plan, heads=heads, edit_config=edited.peft_config["default"], output_dir=output_dir)
        write_run_description(run_plan, run_recipe)
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
        _write_json_atomic(os.path.join(output_dir, "metrics.json"), metrics)  # last: marks the run finished
        model = edited.unload()  # the base model again, for the next head set
        print(f"  saved        {output_dir}", flush=True)
    if len(runs) > 1:
        # As a multi-edit training run: the top directory lists its edits, so `locedit eval DIR` evaluates them all.
        metrics = {"method": "iti", "iti_alpha": alpha, "edits": [output_dir for _, output_dir in runs]}
        _write_json_atomic(os.path.join(plan.output_dir, "metrics.json"), metrics)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m locedit.iti RECIPE [--key value ...]`: a user's mistake prints one line and exits 2."""
    return run_command(main, argv, prog="python -m locedit.iti")


__all__ = ["add_iti_edit", "iti_output_dir", "iti_vectors"]


if __name__ == "__main__":
    sys.exit(cli())
