"""What the toy world adds to locedit's registries: its data set, model, judge, corpus and study hooks.

Imported through the `locedit.plugins` entry point (pyproject.toml), never by the core.
"""

from __future__ import annotations

from ..core.errors import RecipeError
from ..core.recipe import register_study_check
from ..data.sources import register_data_source
from ..evaluation.corpus import register_corpus
from ..models.sources import register_model_source
from ..reporting.study import register_study_metric
from ..rundir import read_evaluation
from .judge import ToyJudge  # noqa: F401 - importing it registers the `toy` judge kind
from .world import TOY_PREFIX, ToySpecError, is_toy_spec, make_world, parse_toy_spec, toy_questions


def check_one_world(recipe) -> None:
    """A toy model, toy data, toy judges and a toy corpus in one study must all name the same world."""
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


def misconception_truth(output_dir: str, dataset: str) -> float | None:
    """On the toy world: the fraction of the test questions with a planted misconception that are answered truly."""
    if not is_toy_spec(dataset):
        return None
    planted = {q["question"] for q in make_world(parse_toy_spec(dataset)).misconception_questions()}
    _, records = read_evaluation(output_dir)
    judged = [r["truthful"] for r in records if r["question"] in planted and "truthful" in r]
    return sum(judged) / len(judged) if judged else None


def resolve_toy_model(spec: str) -> str:
    """The toy model's folder (the shipped model, or pre-trained, on first use): torch and transformers load when a
    model is asked for."""
    from .model import resolve_toy_model as resolve

    return resolve(spec)


def register() -> None:
    # The world has its own seed: the data set's seed only splits its questions.
    register_data_source(TOY_PREFIX, lambda spec, seed: toy_questions(spec), toy_questions)
    register_model_source(TOY_PREFIX, resolve_toy_model)
    register_corpus(TOY_PREFIX, lambda spec: make_world(parse_toy_spec(spec)).statements)
    register_study_check(check_one_world)
    register_study_metric("true_misconceptions", "True (misconceptions)", misconception_truth)
