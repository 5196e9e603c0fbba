"""One recipe for every stage: its argument sets (the parser, which needs TRL, is `locedit.config.parse_recipe`)."""

from __future__ import annotations

import argparse
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
