"""Scoring the heads on the loaded model when the plan found no saved scores (`probe:K`, `importance:K`, ITI's
probes): the plan only plans; this runs the locators it asked for."""

from __future__ import annotations

from ..core.recipe import Recipe
from ..locate import LOCATORS
from ..plan import RunPlan


def locate_heads(plan: RunPlan, recipe: Recipe, model, tokenizer) -> None:
    """Run each locator the plan still misses on the loaded model (once, on the main process first), then resolve
    the heads from its scores."""
    from .. import processes

    for locator in plan.missing:
        with processes.state().main_process_first():
            result = LOCATORS[locator].run(recipe, plan.model_path, plan.layout, model, tokenizer)
        directory = getattr(result, "path", None) or plan.located_dirs[locator]
        plan.use_result(locator, result, directory, recipe)
