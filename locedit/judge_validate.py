"""`locedit judge-validate`: how accurate the `cpu` judges are on TruthfulQA's own judge data, against baselines.

    locedit judge-validate --judge_data ../shared/data/truthfulqa                 # writes docs/judges/validation.json
    locedit judge-validate --judge_data ../shared/data/truthfulqa --validation_seeds 1 \\
        --validation_output outputs/judges/validation-seed1.json                  # another draw of the held-out sets

One record per judge (truth, info), protocol (`answers`: 10% of each question's answers held out; `questions`: 20%
of the questions held out), seed and method (`locedit.evaluation.judge_validation`). The frozen pass over the judge
data is cached, so a second seed costs only the fits.
"""

from __future__ import annotations

import sys

from .core.errors import run_cli

__all__ = ["cli", "main", "make_parser"]


def make_parser():
    from .config import RecipeParser
    from .evaluation.judge_validation import JudgeValidationArguments

    return RecipeParser((JudgeValidationArguments,), prog="locedit judge-validate", allow_abbrev=False)


def main(args, command: str = "") -> dict:
    """Validate the cpu judges and the baselines (JudgeValidationArguments); returns what was written, with
    `command` (the command line that asked for it) recorded in it."""
    from .core.errors import RecipeError
    from .evaluation.judge_validation import run_validation

    if not args.judge_data:
        raise RecipeError(
            "judge-validate needs --judge_data: a folder with TruthfulQA's judge data and TruthfulQA.csv"
        )
    return run_validation(args, command)


def cli(argv: list[str] | None = None) -> int:
    """`locedit judge-validate [--key value ...]`: a user's mistake prints one line and exits 2."""
    arguments = list(sys.argv[1:] if argv is None else argv)

    def run():
        from .config import config_argv, parse_dataclasses

        (args,) = parse_dataclasses(make_parser(), config_argv(arguments))
        return main(args, " ".join(["locedit", "judge-validate", *arguments]))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
