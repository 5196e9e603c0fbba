"""Scoring the heads on the loaded model when the plan found no saved scores (`probe:K`, `importance:K`, ITI's
probes): the plan only plans; this runs the locators it asked for."""

from __future__ import annotations

import inspect

from ..core.recipe import Recipe
from ..locate import LOCATORS
from ..plan import RunPlan, make_plan


def locate_heads(plan: RunPlan, recipe: Recipe, model, tokenizer) -> None:
    """Run each locator the plan still misses on the loaded model (once, on the main process first), then resolve
    the heads from its scores."""
    from .. import processes

    for locator in plan.missing:
        with processes.state().main_process_first():
            result = LOCATORS[locator].run(recipe, plan.model_path, plan.layout, model, tokenizer)
        directory = getattr(result, "path", None) or plan.located_dirs[locator]
        plan.use_result(locator, result, directory, recipe)


def locate_together(recipe: Recipe) -> None:
    """Every locator the recipe's plan still misses, run by every process of a launch at once: each does its share
    where the locator spreads its work (`together`), else the main process runs it and the others wait."""
    from .. import processes

    plan = make_plan(recipe)
    for locator in plan.missing:
        run = LOCATORS[locator].run
        if "together" in inspect.signature(run).parameters:
            run(recipe, plan.model_path, plan.layout, None, None, together=True)
        else:
            with processes.main_first():
                run(recipe, plan.model_path, plan.layout, None, None)
