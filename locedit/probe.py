"""`locedit probe RECIPE`: probe every head of the recipe's model on its training questions and save the result.

    locedit probe recipes/probe_heads_16.yaml
    python -m locedit.probe recipes/tiny_probe.yaml --probe_output_dir outputs/tiny_probe/probe

The result directory (`probe_output_dir`, default `outputs/<recipe>/probe`) holds probe.json, probe.safetensors,
heatmap.png and the cached activations (`locedit.locate`).
"""

from __future__ import annotations

import sys

from .core.errors import run_cli
from .core.recipe import Recipe, make_parser, parse_recipe
from .locate import ProbeResult, ProbeStage, probe_recipe

__all__ = ["main", "make_parser"]


def main(recipe: Recipe) -> ProbeResult | ProbeStage:
    """Probe every head of the recipe's model on its training questions and save the result."""
    return probe_recipe(recipe)


def cli(argv: list[str] | None = None) -> int:
    """`python -m locedit.probe RECIPE [--key value ...]`: a user's mistake prints one line and exits 2."""
    return run_cli(lambda: main(parse_recipe(argv, prog="python -m locedit.probe")))


if __name__ == "__main__":
    sys.exit(cli())
