"""`locedit sweep SWEEP.yaml`: run a W&B grid sweep file here, without W&B, one run at a time or one per GPU.

    locedit sweep recipes/sweeps/lr_single_head.yaml                 # one run at a time (or one per GPU)
    locedit sweep recipes/sweeps/random_heads_16_draws.yaml --gpus 0,1,2,3
    locedit sweep recipes/sweeps/tau_all_heads.yaml --dry_run        # list the runs and what is already done
    accelerate launch --num_processes 8 -m locedit.sweep SWEEP.yaml  # the runs shared among 8 processes (GPUs)

Every run's arguments are parsed by the train entry point before anything runs; finished runs are skipped; a failed
run is recorded in `outputs/sweeps/<sweep>/runs.jsonl` and the sweep goes on (`locedit.pipelines.sweep`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .core.errors import RecipeError, run_cli
from .core.recipe import OneLineParser

__all__ = ["cli", "main", "make_parser"]


def make_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="locedit sweep",
        description=__doc__,
        epilog="a sweep's parameters are recipe keys: locedit train --help\n"
        "all training fields: locedit train --help-all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", help="a W&B grid sweep file, e.g. recipes/sweeps/lr_single_head.yaml")
    parser.add_argument(
        "--gpus",
        default=None,
        help="GPUs to use, one run each at a time (e.g. 0,1,2,3); default: every visible GPU, "
        "else one run at a time on the CPU",
    )
    parser.add_argument(
        "--log_dir", default=None, help="where run logs and runs.jsonl go; default outputs/sweeps/<sweep name>"
    )
    parser.add_argument("--dry_run", action="store_true", help="list the runs and whether each is finished")
    return parser


def sweep(args: argparse.Namespace) -> int:
    """List (dry run) or run the sweep; 1 when a run failed."""
    from . import processes
    from .pipelines.sweep import default_devices, plan_sweep, report_sweep, run_sweep

    if args.dry_run:
        runs = plan_sweep(args.sweep)
        for run in runs:
            state = "finished" if run.finished else "to run"
            print(f"{run.index:3d}  {state:8s}  {run.output_dir}  {run.params}")
        print(f"{len(runs)} runs, {sum(run.finished for run in runs)} finished")
        return 0
    if args.gpus and processes.count() > 1:
        raise RecipeError("--gpus does not go with accelerate launch: each process runs its share on its own device")
    devices = [d.strip() for d in args.gpus.split(",")] if args.gpus else default_devices()
    log_dir = args.log_dir or os.path.join("outputs", "sweeps", Path(args.sweep).stem)
    records = run_sweep(args.sweep, devices, log_dir)
    counts = {status: sum(r["status"] == status for r in records) for status in ("finished", "skipped", "failed")}
    if not processes.is_main():
        return 1 if counts["failed"] else 0
    print(
        f"sweep {args.sweep}: {counts['finished']} finished, {counts['skipped']} skipped (done before), "
        f"{counts['failed']} failed; logs in {log_dir}"
    )
    for best in report_sweep(args.sweep, records, log_dir):
        print(
            f"best at {best['head_count']} heads: {best['params']} ({best['metric']} {best['value']:.4g}, "
            f"of {best['runs']} runs; {best['output_dir']})"
        )
    return 1 if counts["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """`locedit sweep SWEEP.yaml [--gpus ...] [--dry_run]`: a user's mistake prints one line and returns 2."""
    return run_cli(lambda: sweep(make_parser().parse_args(argv)))


cli = main


if __name__ == "__main__":
    sys.exit(main())
