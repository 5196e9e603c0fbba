"""One recipe for every stage: the argument sets and the parser.

`train`, `probe`, `iti`, `eval` and `study` all read the same recipe file with the same parser, so one YAML describes
a whole experiment and an unknown key is an error for every command alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import TrlParser

from .args import EditArguments, EvalArguments, LocEditConfig, ModelArguments, ProbeArguments, StudyArguments
from .errors import RecipeError


class RecipeParser(TrlParser):
    """TrlParser whose argument errors (a bad value, an unknown flag) are one RecipeError line, not a usage dump."""

    def error(self, message: str):
        raise RecipeError(message)


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
    training: LocEditConfig
    study: StudyArguments = field(default_factory=StudyArguments)
    name: str = "cli"


def make_parser(prog: str = "locedit") -> TrlParser:
    # No abbreviations: argparse would otherwise take a typo such as --learning_rat for --learning_rate.
    dataclass_types = (EditArguments, ModelArguments, ProbeArguments, EvalArguments, LocEditConfig, StudyArguments)
    return RecipeParser(dataclass_types, prog=prog, allow_abbrev=False)


def config_argv(argv: list[str]) -> list[str]:
    """A leading positional `.yaml` is taken as `--config`, so `python -m locedit.train recipes/x.yaml` works."""
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        return ["--config", *argv]
    return list(argv)


def parse_dataclasses(parser: TrlParser, argv: list[str]) -> tuple:
    """TrlParser's recipe file + flags parse; its errors become one RecipeError line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return parser.parse_args_and_config(argv)
    except ValueError as err:
        raise RecipeError(str(err).splitlines()[0]) from None


def parse_recipe(argv: list[str] | None = None, prog: str = "locedit") -> Recipe:
    """Parse a recipe file and CLI flags (flags override the file)."""
    argv = config_argv(list(sys.argv[1:] if argv is None else argv))
    name = "cli"
    if "--config" in argv:
        index = argv.index("--config") + 1
        config_path = argv[index] if index < len(argv) else ""
        if not os.path.isfile(config_path):
            raise RecipeError(f"recipe file '{config_path}' does not exist")
        name = Path(config_path).stem
        _check_recipe_keys(config_path, prog)
    edit, model, probe, evaluation, training, study = parse_dataclasses(make_parser(prog), argv)
    return Recipe(edit=edit, model=model, probe=probe, eval=evaluation, training=training, study=study, name=name)


def _check_recipe_keys(config_path: str, prog: str) -> None:
    """Unknown recipe keys are an error naming them (TrlParser's own message is a list dump)."""
    try:
        with open(config_path) as f:
            recipe = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe '{config_path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe '{config_path}' must be a YAML mapping of keys to values")
    known = {action.dest for action in make_parser(prog)._actions} | {"env"}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(
            f"unknown recipe key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in '{config_path}' "
            f"(see {prog} --help)"
        )
