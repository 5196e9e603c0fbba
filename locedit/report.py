"""`locedit report RUN_DIR...`: the comparison the paper makes, from finished and evaluated runs.

    locedit report outputs/toy outputs/toy_all_heads --output_dir outputs/toy_report

Writes `results.csv` / `results.md`, the paper's figures and `verdict.md` / `verdict.json` to --output_dir
(`locedit.reporting`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.args import DEFAULT_MAX_DEGENERATE
from .core.errors import run_cli
from .core.recipe import OneLineParser
from .core.tracking import check_trackers

__all__ = ["cli", "main", "make_parser"]


def make_parser() -> OneLineParser:
    from .evaluation import MAIN
    from .reporting import scoring_metrics

    parser = OneLineParser(
        prog="locedit report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories, or directories holding them")
    parser.add_argument("--output_dir", default="outputs/report", help="where the table, figures and verdict go")
    parser.add_argument(
        "--report_to",
        default="none",
        choices=["none", "trackio", "wandb", "trackio,wandb"],
        help="track the report (table, figures, verdict) as a run named report on these dashboards",
    )
    parser.add_argument("--wandb_project", default="locedit-report", help="the tracking project (trackio and W&B)")
    parser.add_argument(
        "--metric",
        default=None,
        choices=scoring_metrics(),
        help=f"the score of each head set: its best value of this; default {MAIN}, or for runs on preference-style "
        "data that no judges scored, prefers_chosen",
    )
    parser.add_argument(
        "--max_kl", type=float, default=None, help="edits with KL above this are broken, left out of the verdict"
    )
    parser.add_argument(
        "--max_degenerate",
        type=float,
        default=DEFAULT_MAX_DEGENERATE,
        help="edits with a larger share of degenerate answers are broken (as are edits whose training diverged); "
        f"default {DEFAULT_MAX_DEGENERATE}",
    )
    return parser


def report(args: argparse.Namespace) -> dict:
    """Read the evaluated runs below args.run_dirs, write the report and print its table and verdict."""
    from .evaluation.breakage import Breakage
    from .reporting import default_metric, find_runs, write_report

    check_trackers(args.report_to, args.wandb_project)
    runs = find_runs(args.run_dirs)
    breakage = Breakage(args.max_kl, args.max_degenerate)
    metric = args.metric or default_metric(runs)
    result = write_report(runs, args.output_dir, args.report_to, args.wandb_project, metric, breakage)
    print(Path(args.output_dir, "results.md").read_text())
    print(Path(args.output_dir, "verdict.md").read_text())
    print(f"locedit report: {len(runs)} runs; table, figures and verdict in {args.output_dir}")
    return result


def main(argv: list[str] | None = None) -> int:
    """`locedit report RUN_DIR... [--output_dir DIR]`: a user's mistake prints one line and returns 2."""
    return run_cli(lambda: report(make_parser().parse_args(argv)))


cli = main


if __name__ == "__main__":
    sys.exit(main())
