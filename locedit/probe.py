"""`locedit probe RECIPE`: probe every head of the recipe's model on its training questions and save the result.

    locedit probe recipes/probe_heads_16.yaml
    python -m locedit.probe recipes/tiny_probe.yaml --probe_output_dir outputs/tiny_probe/probe

The result directory (`probe_output_dir`, default `outputs/<recipe>/probe`) holds probe.json, probe.safetensors,
heatmap.png and the cached activations (`locedit.locate`).
"""

from __future__ import annotations

import sys

from .core.errors import run_cli
from .core.flags import precheck
from .core.recipe import Recipe
from .pipelines.usage import answer_help

__all__ = ["cli", "main"]

PROG = "locedit probe"


def main(recipe: Recipe):
    """Probe every head of the recipe's model on its training questions and save the result (a ProbeResult; the
    ProbeStage in a dry run)."""
    from .locate import probe_recipe

    return probe_recipe(recipe)


def cli(argv: list[str] | None = None) -> int:
    """`python -m locedit.probe RECIPE [--key value ...]`: a user's mistake prints one line and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run():
        if answer_help("probe", argv):  # its own flags by purpose; --help-all: every field
            return 0
        precheck(argv, PROG)  # a missing recipe, a mistyped flag or key: one line before TRL loads
        # The libraries load here, inside run_cli, after it has quieted their notices.
        from .config import parse_recipe

        return main(parse_recipe(argv, prog=PROG))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
