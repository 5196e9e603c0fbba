"""`locedit train RECIPE`: train the optimal edit at a set of attention heads with IPO.

    accelerate launch -m locedit.train recipes/single_head.yaml
    python -m locedit.train recipes/tiny.yaml --heads L0H1 --learning_rate 2.0e-3
    python -m locedit.train recipes/all_heads.yaml --dry_run true

Every check that can fail on a user's mistake (recipe keys, head spec, data file, model layout) runs before any
weights are loaded, and ends the run with one line on stderr.
"""

from __future__ import annotations

import sys

from .core.errors import run_cli
from .core.flags import precheck
from .core.recipe import Recipe
from .pipelines.usage import answer_help

__all__ = ["cli", "main"]

PROG = "locedit train"


def main(recipe: Recipe):
    """Plan, then (unless dry_run) train the edit and write the run directory. Returns the plan or the metrics."""
    from .pipelines.train import train_recipe

    return train_recipe(recipe)


def cli(argv: list[str] | None = None) -> int:
    """`python -m locedit.train RECIPE [--key value ...]`: a user's mistake prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run():
        if answer_help("train", argv):  # its own flags by purpose; --help-all: every field
            return 0
        precheck(argv, PROG)  # a missing recipe, a mistyped flag or key: one line before TRL loads
        # The libraries load here, inside run_cli, after it has quieted their notices.
        from .config import parse_recipe

        return main(parse_recipe(argv, prog=PROG))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
