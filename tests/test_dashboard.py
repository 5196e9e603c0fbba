"""`locedit dashboard`: a study's trackio project served on 127.0.0.1, its runs found through trackio's own HTTP API,
and one line for each input it cannot serve.

trackio fixes its directory when it is first imported, so the project is logged, and served, by subprocesses given
their own TRACKIO_DIR; the mistakes run in this process, as the other commands' do (test_messages).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_messages import one_error_line

from locedit.dashboard import main as dashboard

REPO = Path(__file__).resolve().parents[1]
PROJECT = "locedit-dash"
RUN = "toy-study"

# A study's run as `locedit.reporting.study.track_study` logs it (a table, an image, markdown, summary numbers),
# through locedit's own tracking layer, and the tracking.json it writes beside the study.
LOG_STUDY = f"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from locedit.core.tracking import Image, Markdown, Table, tracked_run, trackio_dir

fig, ax = plt.subplots(figsize=(3, 2))
ax.bar(["base", "probe"], [0.47, 0.84])
fig.savefig("study.png")
with tracked_run(["trackio"], "{PROJECT}", "{RUN}", group="study", job_type="study") as run:
    run.log({{
        "study/families": Table(["family", "True"], [["base model", 0.47], ["optimal at the probe heads", 0.84]]),
        "study/study": Image("study.png"),
        "study/verdict": Markdown("# Verdict\\n\\nThe probe heads are **not** special."),
    }})
    run.summary({{"study/best/base": 0.47, "study/best/probe": 0.84}})
where = {{"project": "{PROJECT}", "trackers": ["trackio"], "run": "{RUN}"}}
where["trackio_dir"] = str(trackio_dir().resolve())
open(sys.argv[1], "w").write(json.dumps(where, indent=2) + "\\n")
"""


def command_env(**overrides: str) -> dict:
    """This checkout first on the path (not whichever locedit is installed), Ctrl-C as in a terminal."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **overrides}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A study directory whose tracking.json names a real trackio project in a directory of its own."""
    root = tmp_path_factory.mktemp("tracked")
    study = root / "study"
    study.mkdir()
    subprocess.run(
        [sys.executable, "-c", LOG_STUDY, str(study / "tracking.json")],
        cwd=root,
        env=command_env(TRACKIO_DIR=str(root / "trackio")),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_line(process: subprocess.Popen, timeout: float = 60.0) -> str:
    """The first line the process prints, or a failure with its stderr if it ends or says nothing in time."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        process.kill()
        raise AssertionError(f"no line in {timeout} s: {process.communicate()[1][-2000:]}")
    line = process.stdout.readline()
    assert line, f"ended ({process.wait()}): {process.stderr.read()[-2000:]}"
    return line


def default_interrupt() -> None:
    """Ctrl-C as in a terminal: a suite started in the background ignores SIGINT, and its children would too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def api(port: int, name: str, **kwargs):
    """One call of trackio's HTTP API (POST /api/NAME, as its frontend calls it)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/{name}",
        data=json.dumps(kwargs).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]


def test_serves_the_study_project_on_localhost_until_stopped(study_dir, tmp_path):
    port = free_port()
    # Another TRACKIO_DIR than the study's: its tracking.json says where its project is.
    env = command_env(TRACKIO_DIR=str(tmp_path / "elsewhere"))
    argv = [sys.executable, "-m", "locedit.cli", "dashboard", str(study_dir), "--port", str(port), "--no_browser"]
    server = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_interrupt
    )
    try:
        line = first_line(server)
        url = f"http://127.0.0.1:{port}/?project={PROJECT}"
        assert line.startswith(f"locedit dashboard: {url} "), line
        with urllib.request.urlopen(url, timeout=30) as response:
            assert "<html" in response.read().decode().lower()
        assert PROJECT in api(port, "get_all_projects")
        runs = api(port, "get_runs_for_project", project=PROJECT)
        assert [run["name"] for run in runs] == [RUN]
        config = api(port, "get_run_configs", project=PROJECT)[runs[0]["id"]]
        assert (config["_Group"], config["job_type"]) == ("study", "study")
        logged = api(port, "get_metrics_for_run", project=PROJECT, run=RUN)
        assert {"study/families", "study/study", "study/verdict", "study/best/probe"} <= set(logged), logged

        # A second dashboard on the same port: one line, the first one still serving.
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        errors = [line for line in second.stderr.splitlines() if line.startswith("locedit: error:")]
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert len(errors) == 1 and f"cannot serve on 127.0.0.1:{port}" in errors[0], second.stderr
        assert api(port, "get_runs_for_project", project=PROJECT)

        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(timeout=30) == 0, server.stderr.read()
        assert "locedit dashboard: stopped" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def write_tracking(study: Path, **where) -> Path:
    study.mkdir(parents=True, exist_ok=True)
    (study / "tracking.json").write_text(json.dumps(where))
    return study


def test_a_directory_without_tracking_json_is_one_line(tmp_path, capsys):
    code = dashboard([str(tmp_path)])
    one_error_line(capsys, code, str(tmp_path), "has no tracking.json", "run `locedit study` with report_to trackio")


def test_a_study_tracked_on_wandb_only_is_one_line(tmp_path, capsys):
    study = write_tracking(tmp_path / "study", project="locedit-toy", trackers=["wandb"], run="toy-study")
    code = dashboard([str(study)])
    one_error_line(capsys, code, "tracked on W&B only", "locedit-toy", "wandb sync")


def test_a_project_missing_from_trackio_dir_names_the_projects_there(study_dir, tmp_path, capsys, monkeypatch):
    trackio_dir = json.loads((study_dir / "tracking.json").read_text())["trackio_dir"]
    monkeypatch.setenv("TRACKIO_DIR", trackio_dir)  # the command sets it for trackio: restored after the test
    code = dashboard(["locedit-nope"])
    one_error_line(capsys, code, "no trackio project 'locedit-nope'", trackio_dir, f"projects there: {PROJECT}")

    # A study whose trackio directory was not carried along with it.
    study = write_tracking(tmp_path / "study", project=PROJECT, trackers=["trackio"], trackio_dir=str(tmp_path / "t"))
    code = dashboard([str(study)])
    one_error_line(capsys, code, f"no trackio project '{PROJECT}'", "tracking.json", "it holds no trackio projects")


def test_a_recipe_names_its_project(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path))
    code = dashboard(["recipes/toy.yaml"])
    one_error_line(capsys, code, "no trackio project 'locedit-toy'", "recipe recipes/toy.yaml; run it first")


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["outputs/toy/study"], ["'outputs/toy/study' does not exist", "not a project name", "tracking.json"]),
        (["locedit-toy", "--port", "70000"], ["--port 70000", "1 to 65535"]),
    ],
)
def test_what_names_nothing_is_one_line(argv, needles, capsys):
    one_error_line(capsys, dashboard(argv), *needles)
