"""Tracking: every stage's runs on a local trackio dashboard and/or on W&B, the same keys in each.

One logging layer, two backends. A stage opens a `tracked_run` (project, run name, group, job type, config) and logs
scalars, `Table`s, `Image`s and `Markdown`; each tracker named in `report_to` receives the same keys, converted to
its own types (trackio's and wandb's Table, Image; Markdown is trackio's own and an HTML block on W&B). Training runs
log through transformers' callbacks instead (`report_to` on the Trainer); `run_tracking` gives them the same project,
name and group.

- trackio keeps each project in one SQLite file under TRACKIO_DIR (default $HF_HOME/trackio) and never sends
  anything unless the user names a Space (`trackio_space_id`).
- W&B logs offline without credentials, so it never asks for a login (`wandb sync` uploads later).

A tracker that cannot start (not installed, a project name it would change or refuse, a TRACKIO_DIR that cannot be
written) is one line as the recipe is read (`check_trackers`), before any work.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import RecipeError

TRACKERS = ("trackio", "wandb")
OFFLINE_NOTICE = "locedit: no W&B credentials found; logging offline (sync later with `wandb sync`)"
# One name both trackers keep as it is: trackio drops every other character from the file it writes (so `my.run`
# and `myrun` would share one project), W&B refuses some; trackio reserves names that begin with "registry-".
PROJECT_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Where the Trainer's callbacks find the group of a training run (locedit.training's callbacks give it to W&B and
# trackio: transformers' own pass none, and wandb reads the environment only once per process).
GROUP_ENV = "WANDB_RUN_GROUP"
# Where a study directory says which project and trackio directory its runs went to (`locedit dashboard` reads it).
TRACKING_FILE = "tracking.json"


def trackers_of(report_to) -> list[str]:
    """The trackers of a `report_to` value ("none", "trackio", "wandb", "all", or a list of them) locedit logs to."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [part.strip() for name in names for part in str(name).split(",")]
    if "all" in names:
        return list(TRACKERS)
    return [name for name in TRACKERS if name in names]


def reports_to_wandb(report_to) -> bool:
    return "wandb" in trackers_of(report_to)


def recipe_project(project: str | None, recipe_name: str) -> str:
    """The recipe's tracking project: `wandb_project` when given, else one project per recipe (`locedit-toy`), so
    that the runs of two recipes (each has an `all-heads` run) never share a run."""
    return project or f"locedit-{recipe_name}"


def trackio_dir() -> Path:
    """Where trackio keeps its projects, as trackio resolves it as it is imported (TRACKIO_DIR, else
    $HF_HOME/trackio)."""
    if os.environ.get("TRACKIO_DIR"):
        return Path(os.environ["TRACKIO_DIR"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "trackio"


def trackio_writes_to() -> Path:
    """Where this process's trackio writes: it reads the environment once, as it is imported."""
    if "trackio.utils" in sys.modules:
        return Path(sys.modules["trackio.utils"].TRACKIO_DIR)
    return trackio_dir()


def check_trackers(report_to, project: str) -> None:
    """One line, before any work, for a tracker of `report_to` that could not log this recipe's runs."""
    trackers = trackers_of(report_to)
    if not trackers:
        return
    if not PROJECT_NAME.fullmatch(project) or project.startswith("registry-"):
        raise RecipeError(
            f"wandb_project {project!r} is not a project name both trackers keep: use 1 to 128 letters, digits, "
            "'-' and '_' (not beginning with 'registry-')"
        )
    for tracker in trackers:
        # Found, not imported: trackio takes 0.6 s to import (one already imported is there, whatever its spec).
        if tracker not in sys.modules and importlib.util.find_spec(tracker) is None:
            raise RecipeError(
                f"report_to {tracker} needs the {tracker} package, which is not installed: pip install -e . installs "
                "it, or set --report_to none"
            )
    if "trackio" in trackers:
        where = trackio_writes_to()
        existing = next((path for path in (where, *where.parents) if path.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise RecipeError(
                f"trackio cannot write its projects to {str(where)!r} ({existing} cannot be written): set TRACKIO_DIR "
                "to a directory you can write, or --report_to none"
            )


def offline_without_credentials(announce: bool = True) -> None:
    """Without credentials (and no WANDB_MODE chosen) W&B logs offline, so it never asks for a login."""
    if os.environ.get("WANDB_MODE") is None and not have_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        if announce:
            print(OFFLINE_NOTICE, file=sys.stderr)


def have_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# What a stage logs besides numbers; each backend makes its tracker's own object of it.


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list]

    @classmethod
    def of_records(cls, records: list[dict], columns: list[str]) -> Table:
        return cls(list(columns), [[record.get(column) for column in columns] for record in records])


@dataclass(frozen=True)
class Image:
    path: str


@dataclass(frozen=True)
class Markdown:
    text: str


class _BackendRun:
    """One tracker's run (`self.run`): values logged as its own objects (`convert`)."""

    def convert(self, value):
        raise NotImplementedError

    def log(self, values: dict) -> None:
        self.run.log({key: self.convert(value) for key, value in values.items()})

    def finish(self) -> None:
        self.run.finish()


class _TrackioRun(_BackendRun):
    def __init__(self, project, name, group, job_type, config):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=project,
            name=name,
            group=group,
            config={**config, "job_type": job_type},
            resume="allow",  # as transformers' callback: the same run again (a resumed stage) continues it
            space_id=None,  # a Space only where the user names one (TRACKIO_SPACE_ID)
            embed=False,
        )

    def convert(self, value):
        if isinstance(value, Table):
            return self.trackio.Table(columns=value.columns, data=value.rows)
        if isinstance(value, Image):
            return self.trackio.Image(value.path)
        if isinstance(value, Markdown):
            return self.trackio.Markdown(value.text)
        return value

    def summary(self, values: dict) -> None:
        # trackio has no summary: the values are one logged step (strings too; the dashboard shows numbers).
        self.log(values)


class _WandbRun(_BackendRun):
    def __init__(self, project, name, group, job_type, config):
        import wandb

        offline_without_credentials()
        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=name, group=group, job_type=job_type, config=config, reinit="finish_previous"
        )

    def convert(self, value):
        if isinstance(value, Table):
            return self.wandb.Table(columns=value.columns, data=value.rows)
        if isinstance(value, Image):
            return self.wandb.Image(value.path)
        if isinstance(value, Markdown):
            return self.wandb.Html(f"<pre>{html.escape(value.text)}</pre>")
        return value

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)


BACKENDS = {"trackio": _TrackioRun, "wandb": _WandbRun}


class TrackedRun:
    """One run in each tracker: `log` a step of values (numbers, Table, Image, Markdown), `summary` a run's final
    numbers (W&B's summary; a logged step on trackio)."""

    def __init__(self, runs: list):
        self.runs = runs

    def log(self, values: dict) -> None:
        for run in self.runs:
            run.log(values)

    def summary(self, values: dict) -> None:
        for run in self.runs:
            run.summary(values)


@contextlib.contextmanager
def tracked_run(
    report_to, project: str, name: str, group: str | None = None, job_type: str = "", config: dict | None = None
) -> Iterator[TrackedRun | None]:
    """A run named `name` in `project` in every tracker of `report_to` (None when there are none), finished when the
    block ends."""
    runs = [
        BACKENDS[tracker](project, name, group, job_type, dict(config or {})) for tracker in trackers_of(report_to)
    ]
    try:
        yield TrackedRun(runs) if runs else None
    finally:
        for run in runs:
            run.finish()


@contextlib.contextmanager
def run_tracking(args, project: str, group: str, announce: bool = True) -> Iterator[None]:
    """Track one training run (TrainingArguments `args`, whose callbacks log it) in `project` and `group` in every
    tracker of its `report_to`: the run named after its output_dir unless `run_name` is set; trackio's project is
    the recipe's, its Space none unless the user named one."""
    trackers = trackers_of(args.report_to)
    if not trackers:
        yield
        return
    if args.run_name is None:
        args.run_name = os.path.basename(os.path.normpath(args.output_dir))
    args.project = project
    group_was_ours = os.environ.get(GROUP_ENV) is None
    os.environ.setdefault(GROUP_ENV, group)
    try:
        with wandb_tracking(args, project, group, announce) if "wandb" in trackers else contextlib.nullcontext():
            yield
    finally:
        if "trackio" in trackers:
            import trackio

            # The callback finishes its run when training ends, then opens it again for the validation's metrics
            # and leaves it open: finished here, so that its last steps are written before the next stage.
            if trackio.context_vars.current_run.get() is not None:
                trackio.finish()
        if group_was_ours:
            os.environ.pop(GROUP_ENV, None)


@contextlib.contextmanager
def wandb_tracking(args, project: str, group: str, announce: bool = True) -> Iterator[None]:
    """Track one training run (TrainingArguments `args`) in W&B `project` and `group` when `report_to` has wandb.

    W&B's callback reads the project and group from the environment: they are set for this run only (a group the
    user set stays), and the W&B run is finished when the block ends (the Trainer leaves it open), so that several
    runs in one process (`locedit study`) are separate W&B runs in their own groups.
    """
    if not reports_to_wandb(args.report_to):
        yield
        return
    chosen = {name: os.environ.get(name) is None for name in ("WANDB_PROJECT", GROUP_ENV)}
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault(GROUP_ENV, group)
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
