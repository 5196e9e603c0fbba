"""`locedit study RECIPE`: the paper's comparison in one command, each stage run as its own command would run it.

    locedit study recipes/toy.yaml                        # the toy world on a CPU, no download
    python -m locedit.study recipes/toy.yaml --study_single 4 --beta 0.3

From one recipe whose heads are `probe:K` (ITI's localization), in one process:

1. model   the recipe's base model (the toy model is copied to the cache on first use, or pre-trained);
2. probe   every head probed on the training questions (`locedit probe`);
3. iti     ITI's edit at the K probe heads and at the `--study_random` random sets of K heads (`locedit iti`);
4. train   the optimal (IPO) edit at the K probe heads, at `--study_random` random sets of K heads, at
           `--study_single` random single heads and at all heads (`locedit train` with other `--heads`). The recipe's
           learning rate is for K heads; all heads and single heads get it scaled as the paper's 1e-4 and 2e-3 are
           to its 5e-4 (`--study_lr_all`, `--study_lr_single` set them);
5. eval    the base model and every edit on the test questions (`locedit eval --base`);
6. report  the table of every model and a summary per family (printed, `study.md`, `study.json`) and a plot of
           True, Info and True*Info (`study.png`), in `outputs/<recipe>/study/`, with each stage's wall and CPU time;
           and `locedit report` of every run in `study/report/`: the paper's figures, the permutation p-value of the
           probe heads against the random sets (under ITI and optimal edits) and which head sets reach the all-heads
           optimum (paired bootstrap), printed as the verdict.

Each stage prints the command that reproduces it alone. Recipe flags after the recipe apply to every stage.
"""

from __future__ import annotations

import sys

from .core.errors import run_cli
from .core.flags import precheck
from .pipelines.usage import answer_help

__all__ = ["cli", "main"]

PROG = "locedit study"


def main(argv: list[str] | None = None) -> dict:
    """Run the study from command-line arguments: a recipe, recipe flags and `--study_*` flags."""
    from .pipelines.study import parse_options, run_study

    argv = list(sys.argv[1:] if argv is None else argv)
    options, recipe_argv = parse_options(argv)
    return run_study(recipe_argv, options)


def cli(argv: list[str] | None = None) -> int:
    """`locedit study RECIPE [--key value ...] [--study_random N] [--study_single N] [--study_lr_all LR]
    [--study_lr_single LR]`: a user's mistake prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run():
        if answer_help("study", argv):  # its own flags by purpose; --help-all: every field
            return 0
        precheck(argv, PROG)  # a missing recipe, a mistyped flag or key: one line before TRL loads
        return main(argv)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
