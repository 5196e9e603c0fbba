"""`locedit eval`: evaluate edits by what the edited model generates, and by how much they disturb it elsewhere.

    locedit eval RUN_DIR [RUN_DIR ...] [--key value ...]     # edits of one base model, the base loaded once
    locedit eval RUN_DIR ... --base                          # and the base model on the same test questions
    locedit eval RECIPE.yaml --base                          # the base model alone, on the recipe's split
    python -m locedit.eval ...                               # the same

Each edit is evaluated on the *test* questions of the split it was trained with, read from its run directory
(`splits.json`, `recipe.yaml`), so a training question can never be scored (`locedit.evaluation`). Outputs:
`RUN_DIR/eval/generations.jsonl` and `RUN_DIR/eval/metrics.json` (for the base model, `<dir>/base/eval/`), the
latter written last. Every mistake is one line on stderr (exit code 2), before any model weights are loaded.
"""

from __future__ import annotations

import os
import sys

from .core.errors import RecipeError, run_cli
from .core.flags import precheck
from .core.recipe import Recipe
from .pipelines.usage import answer_help

__all__ = ["cli", "main", "split_argv"]

PROG = "locedit eval"


def main(recipe: Recipe, run_dirs: list[str] | tuple = (), base: bool = False) -> list[dict]:
    """Check everything, then evaluate the base model and/or the edits in `run_dirs`. Returns their metrics."""
    from .evaluation import evaluate

    return evaluate(recipe, run_dirs, base=base)


def split_argv(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    """(run directories, --base, the recipe's own arguments) of `locedit eval`'s command line."""
    base = "--base" in argv
    argv = [arg for arg in argv if arg != "--base"]
    run_dirs, recipe_argv = [], []
    index = 0
    while index < len(argv) and not argv[index].startswith("-"):
        arg = argv[index]
        if arg.endswith((".yaml", ".yml")) and not os.path.isdir(arg):
            if recipe_argv:
                raise RecipeError(f"two recipes given ('{recipe_argv[0]}' and '{arg}'); give one")
            recipe_argv.append(arg)
        else:
            run_dirs.append(arg)
        index += 1
    return run_dirs, base, recipe_argv + argv[index:]


def cli(argv: list[str] | None = None) -> int:
    """`locedit eval ...`: a user's mistake prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> int | None:
        if answer_help("eval", argv):  # its own flags by purpose; --help-all: every field
            return 0
        # The libraries load here, inside run_cli, after it has quieted their notices.
        run_dirs, base, recipe_argv = split_argv(argv)
        precheck(recipe_argv, PROG)  # a missing recipe, a mistyped flag or key: one line before TRL loads
        from .config import parse_recipe

        main(parse_recipe(recipe_argv, prog=PROG), run_dirs, base=base)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
