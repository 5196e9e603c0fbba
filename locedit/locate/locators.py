"""The localization heuristics whose per-head scores head specs rank: one `Locator` per name of a score-driven
selector (`probe:K` -> "probe", `importance:K` -> "importance", `locedit.heads.top_k_selector`).

A locator finds a saved result without loading weights (planning), computes one on the loaded model when there is
none, and gives its (layers, heads) scores, higher meaning "more localized here". Adding a heuristic is one module
in this package and one `register_locator` call below (and its `top_k_selector` in `locedit.heads`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.recipe import Recipe
from ..models.layout import AttentionLayout
from .importance import find_importance_result, run_importance_stage
from .stage import find_probe_result, make_probe_stage, run_probe_stage


@dataclass(frozen=True)
class Locator:
    name: str
    score_name: str  # what its scores are, for plan lines: "probe validation accuracy"
    # (recipe, model_path, layout) -> (the saved result made from these settings or None, its directory)
    find: Callable[[Recipe, str, AttentionLayout], tuple[object | None, str]]
    # (recipe, model_path, layout, model, tokenizer) -> the result, computed (and saved) on the loaded model (None:
    # loaded here); `together=True`: every process of a launch calls it at once and each does its share
    run: Callable[..., object]
    scores: Callable[[object], list[list[float]]]  # the result's (layers, heads) scores


LOCATORS: dict[str, Locator] = {}


def register_locator(locator: Locator) -> None:
    LOCATORS[locator.name] = locator


def _run_probe(recipe: Recipe, model_path: str, layout: AttentionLayout, model, tokenizer, together: bool = False):
    return run_probe_stage(make_probe_stage(recipe, model_path, layout), recipe, model, tokenizer, together=together)


register_locator(
    Locator("probe", "probe validation accuracy", find_probe_result, _run_probe, lambda r: r.val_accuracy.tolist())
)
register_locator(
    Locator(
        "importance", "gradient importance", find_importance_result, run_importance_stage, lambda r: r.scores.tolist()
    )
)
