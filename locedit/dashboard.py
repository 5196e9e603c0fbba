"""`locedit dashboard WHAT`: the tracked runs of a study, a recipe or a project on trackio's dashboard, served here.

    locedit dashboard outputs/toy/study          # the study's project, where its tracking.json says it is
    locedit dashboard recipes/toy.yaml           # the recipe's project (locedit-toy) in TRACKIO_DIR
    locedit dashboard locedit-toy --port 7861    # a project by name, in TRACKIO_DIR

Serves trackio's own dashboard on 127.0.0.1 (another address only when --host names it), prints its address in one
line and runs until Ctrl-C. Nothing is shared: no public link, whatever GRADIO_SHARE says.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

from .core.errors import DamagedFileError, RecipeError, run_cli
from .core.recipe import OneLineParser
from .core.tracking import PROJECT_NAME, TRACKING_FILE, trackers_of, trackio_dir

__all__ = ["cli", "dashboard", "main", "make_parser", "find_project"]

RECIPE_SUFFIXES = (".yaml", ".yml")
FIRST_PORT = 7860  # where trackio starts looking for a free port


def make_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="locedit dashboard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what", metavar="WHAT", help="a study directory (with its tracking.json), a recipe file, or a project name"
    )
    parser.add_argument(
        "--port", type=int, default=None, help=f"the port; default the first free one from {FIRST_PORT}"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to serve on; 0.0.0.0 serves every network of this machine"
    )
    parser.add_argument("--no_browser", action="store_true", help="only print the address, open no browser")
    return parser


def find_project(what: str) -> tuple[str, Path, str]:
    """The trackio project WHAT names, the directory that should hold it, and what named it (for a message)."""
    path = Path(what)
    if path.is_dir():
        return study_project(path)
    if path.is_file() or path.suffix in RECIPE_SUFFIXES:
        project, named_by = project_of_recipe(path)
        return project, trackio_dir(), named_by
    if not PROJECT_NAME.fullmatch(what):
        raise RecipeError(
            f"{what!r} does not exist, and is not a project name (letters, digits, '-' and '_'): give a study "
            f"directory (`locedit study` with report_to trackio writes its {TRACKING_FILE}), a recipe file, or a "
            "trackio project name"
        )
    return what, trackio_dir(), ""


def study_project(study_dir: Path) -> tuple[str, Path, str]:
    """The project and trackio directory a study's tracking.json names (`locedit.reporting.study.track_study`)."""
    file = study_dir / TRACKING_FILE
    if not file.is_file():
        raise RecipeError(
            f"{str(study_dir)!r} has no {TRACKING_FILE}, so no tracked study: give a study directory "
            "(outputs/RECIPE/study), a recipe file or a project name; run `locedit study` with report_to trackio "
            "first"
        )
    try:
        where = json.loads(file.read_text(encoding="utf-8"))
        project, trackers = str(where["project"]), trackers_of(where["trackers"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedFileError(f"{file} cannot be read ({err!r}): run `locedit study` again to write it") from None
    if "trackio" not in trackers:
        raise RecipeError(
            f"the study in {str(study_dir)!r} was tracked on {'W&B' if trackers else 'no tracker'} only (project "
            f"{project}), not on trackio: see it on W&B (`wandb sync` uploads runs logged offline), or run "
            "`locedit study` with report_to trackio"
        )
    # The directory the study logged to, whatever TRACKIO_DIR says now.
    return project, Path(where.get("trackio_dir") or trackio_dir()), f"the {TRACKING_FILE} of {study_dir}"


def project_of_recipe(path: Path) -> tuple[str, str]:
    """A recipe's tracking project, and what to say if it has none yet."""
    from .config import parse_recipe

    recipe = parse_recipe([str(path)])
    if "trackio" in trackers_of(recipe.training.report_to):
        return recipe.edit.wandb_project, f"recipe {path}; run it first"
    return recipe.edit.wandb_project, f"recipe {path}, which reports to {recipe.training.report_to}, not trackio"


def check_project(project: str, directory: Path, named_by: str = "") -> None:
    """Nothing when trackio keeps a database of `project` in `directory`; else one line naming the projects there."""
    from trackio.sqlite_storage import DB_EXT, SQLiteStorage

    # trackio's own file name for the project, looked for in `directory` itself (trackio's listing looks in the
    # directory it was imported for).
    if (directory / SQLiteStorage.get_project_db_filename(project)).is_file():
        return
    found = sorted(path.stem for path in directory.glob(f"*{DB_EXT}")) if directory.is_dir() else []
    there = f"projects there: {', '.join(found)}" if found else "it holds no trackio projects"
    source = f" (named by {named_by})" if named_by else ""
    raise RecipeError(
        f"no trackio project {project!r}{source} in {str(directory)!r}; {there}. Set TRACKIO_DIR to where the runs "
        "were logged, or log them first (report_to trackio)"
    )


def dashboard(args: argparse.Namespace) -> None:
    """Serve the dashboard of args.what until Ctrl-C (or SIGTERM)."""
    if args.port is not None and not 1 <= args.port <= 65535:
        raise RecipeError(f"--port {args.port} is not a port: give 1 to 65535, or leave it out")
    project, directory, named_by = find_project(args.what)
    # trackio reads TRACKIO_DIR once, when it is first imported: set before anything imports it.
    os.environ["TRACKIO_DIR"] = str(directory)
    check_project(project, directory, named_by)
    import trackio
    from trackio.utils import TRACKIO_DIR

    if Path(TRACKIO_DIR).resolve() != directory.resolve():
        raise RecipeError(
            f"trackio was imported in this process for {str(TRACKIO_DIR)!r} before the dashboard of "
            f"{str(directory)!r} was asked for: run `locedit dashboard` in a process of its own"
        )
    try:
        # trackio's banner (colours, and a URL with the write token) is replaced by the one line below.
        with contextlib.redirect_stdout(io.StringIO()):
            app, url, _, _ = trackio.show(
                project=project,
                open_browser=not args.no_browser,
                block_thread=False,
                host=args.host,
                server_port=args.port,
                share=False,
            )
    except OSError:
        # trackio's message names its own settings; what a user of this command can change is --port or --host.
        raise RecipeError(
            f"cannot serve on {args.host}:{args.port or f'{FIRST_PORT}+'}: the port is in use, or the address is not "
            "one of this machine's; choose another --port (or leave it out for the first free one) or --host"
        ) from None
    print(
        f"locedit dashboard: {url.rstrip('/')}/?project={project} (project {project} in {directory}; Ctrl-C stops it)"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM as run_cli raises it: the way a dashboard ends, nothing to resume.
        print("locedit dashboard: stopped", file=sys.stderr)
    finally:
        app.close()


def main(argv: list[str] | None = None) -> int:
    """`locedit dashboard WHAT [--port N] [--host H] [--no_browser]`: a user's mistake prints one line, returns 2."""
    return run_cli(lambda: dashboard(make_parser().parse_args(argv)))


cli = main


if __name__ == "__main__":
    sys.exit(main())
