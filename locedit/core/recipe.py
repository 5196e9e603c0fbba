"""One recipe for every stage: its argument sets (the parser, which needs TRL, is `locedit.config.parse_recipe`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from .args import EditArguments, EvalArguments, ModelArguments, ProbeArguments, StudyArguments
from .errors import RecipeError


class OneLineParser(argparse.ArgumentParser):
    """argparse for the commands without a recipe (report, sweep, study's own flags): errors are one line."""

    def error(self, message: str):
        raise RecipeError(message)


@dataclass
class Recipe:
    """A parsed recipe: one argument set per concern, and the recipe's name (its file stem, or 'cli')."""

    edit: EditArguments
    model: ModelArguments
    probe: ProbeArguments
    eval: EvalArguments
    training: object  # locedit.config.LocEditConfig (TRL's DPOConfig with locedit's defaults)
    study: StudyArguments = field(default_factory=StudyArguments)
    name: str = "cli"


# Checks of a study recipe that plugins add (the toy world: model, data and judges name one world); `locedit study`
# runs them before any stage. Kept here, with the recipe, so that registering one imports no pipeline.
STUDY_CHECKS: list[Callable[[Recipe], None]] = []


def register_study_check(check: Callable[[Recipe], None]) -> None:
    STUDY_CHECKS.append(check)
