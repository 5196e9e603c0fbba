"""W&B tracking: project, group and name of each run, offline without credentials, never a prompt.

Training runs log through the Trainer's W&B callback, which reads the project and group from the environment;
`wandb_tracking` sets them for one run only (a group the user set stays), and finishes the run when it ends, so
that several runs in one process (`locedit study`) are separate W&B runs in their own groups.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

OFFLINE_NOTICE = "locedit: no W&B credentials found; logging offline (sync later with `wandb sync`)"


def reports_to_wandb(report_to) -> bool:
    return "wandb" in (report_to or [])


def have_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def offline_without_credentials(announce: bool = True) -> None:
    """Without credentials (and no WANDB_MODE chosen) W&B logs offline, so it never asks for a login."""
    if os.environ.get("WANDB_MODE") is None and not have_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        if announce:
            print(OFFLINE_NOTICE, file=sys.stderr)


@contextlib.contextmanager
def wandb_tracking(args, project: str, group: str, announce: bool = True) -> Iterator[None]:
    """Track one training run (TrainingArguments `args`) in W&B `project` and `group` when `report_to` has wandb.

    The run is named after its output_dir unless `run_name` is set; when the block ends the W&B run is finished
    (the Trainer leaves it open) and the project and group locedit chose are taken back.
    """
    if not reports_to_wandb(args.report_to):
        yield
        return
    chosen = {name: os.environ.get(name) is None for name in ("WANDB_PROJECT", "WANDB_RUN_GROUP")}
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault("WANDB_RUN_GROUP", group)
    if args.run_name is None:
        args.run_name = os.path.basename(os.path.normpath(args.output_dir))
    offline_without_credentials(announce)
    try:
        yield
    finally:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        for name, ours in chosen.items():
            if ours:
                os.environ.pop(name, None)
