"""`locedit iti RECIPE`: ITI's edit (alpha * sigma * u at the selected heads) as a run directory.

locedit iti recipes/probe_heads_16.yaml --iti_alpha 15
python -m locedit.iti recipes/random_heads_16.yaml --heads_seed 3 --probe_results outputs/probe_heads_16/probe
"""

from __future__ import annotations

import sys

from .core.errors import run_cli
from .core.flags import precheck
from .core.recipe import Recipe
from .pipelines.usage import answer_help

__all__ = ["cli", "main"]

PROG = "locedit iti"


def main(recipe: Recipe):
    """Make ITI's edit at the recipe's heads and write its run directory (one per head set).

    Under `accelerate launch`, every process takes part in the probes when they are still missing (`locedit probe`),
    then the main process makes ITI's edits (seconds) while the others wait."""
    from . import processes
    from .locate import probe_recipe
    from .pipelines.iti import make_iti_edits

    if processes.count() == 1 or recipe.edit.dry_run:
        return make_iti_edits(recipe) if processes.is_main() else {}
    if not recipe.probe.probe_results:  # the recipe's own probes: a result already there is read, not made again
        probe_recipe(recipe)
    metrics = make_iti_edits(recipe) if processes.is_main() else {}
    processes.wait_for_everyone()
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m locedit.iti RECIPE [--key value ...]`: a user's mistake prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run():
        if answer_help("iti", argv):  # its own flags by purpose; --help-all: every field
            return 0
        precheck(argv, PROG)  # a missing recipe, a mistyped flag or key: one line before TRL loads
        # The libraries load here, inside run_cli, after it has quieted their notices.
        from .config import parse_recipe

        return main(parse_recipe(argv, prog=PROG))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
