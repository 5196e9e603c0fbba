"""Faults around a run, injected for real: a full disk at each kind of write, SIGTERM at several points of train,
eval and the study (in one process and under a launch). Each is followed by the same command again, and the final
files are compared with an uninterrupted run's.

The full disk is a small tmpfs mounted in a mount namespace of the test's own (`unshare --map-root-user --mount`),
so nothing is mounted on the machine and nothing needs root; where the kernel refuses such namespaces the disk tests
are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_processes import work_dir
from test_reliability import FAST, default_interrupt, max_difference, wait_for
from toy_reference import without_timings

from locedit.core import cache, disk
from locedit.core.files import check_safetensors
from locedit.rundir import LOCK
from locedit.toy.model import made_like_the_shipped_model

REPO = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny.yaml"
NO_JUDGES = ["--eval_corpus", "none", "--eval_judge_truth", "none", "--eval_judge_info", "none"]
DISK_FULL = "locedit: error: the disk is full: writing '"


# ---------------------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------------------


def test_a_full_disk_is_recognised_in_each_librarys_words(monkeypatch, tmp_path):
    """Python's files say ENOSPC; safetensors quotes the OS error in its text; torch.save's writer only says that a
    stream position is off, which is a full disk when the disk it writes to is (nearly) full."""
    disk.writes_to(tmp_path)
    plain = OSError(28, "No space left on device", str(tmp_path / "metrics.json"))
    assert f"writing '{tmp_path / 'metrics.json'}' failed" in disk.disk_full_problem(plain)
    quoted = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk.disk_full_problem(quoted) is not None
    torch_writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert disk.disk_full_problem(torch_writer) is None  # room left: some other fault, its traceback stays
    monkeypatch.setattr(disk, "free_bytes", lambda path: 4096)
    problem = disk.disk_full_problem(torch_writer)
    assert problem is not None and "4.0 KB free there now" in problem
    assert disk.disk_full_problem(ValueError("a bug")) is None
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = plain
    assert disk.disk_full_problem(wrapped) is not None  # also when a library raised its own error from it


def _can_mount_a_small_disk() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a namespace here: {probe.stderr.strip()}"


_NO_SMALL_DISK = _can_mount_a_small_disk()
needs_small_disk = pytest.mark.skipif(_NO_SMALL_DISK is not None, reason=str(_NO_SMALL_DISK))

# Runs in the namespace, in one interpreter (the libraries import once): each step fills the small disk to leave
# `room` bytes (a filler file), runs a locedit command as the command line does, and records its exit code, its
# stderr and the files it left, and copies what `keep` names out of the tmpfs (to `kept/`, on the ordinary disk);
# `copy` copies a directory onto the tmpfs first, `env` sets environment variables.
DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, os, shutil, sys
    from locedit.cli import main

    disk, steps, report = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    filler = os.path.join(disk, "filler")
    results = []
    for step in steps:
        os.environ.update(step.get("env", {}))
        if step.get("copy"):
            shutil.copytree(step["copy"][0], os.path.join(disk, step["copy"][1]))
        if os.path.exists(filler):
            os.remove(filler)
        if step.get("room") is not None:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\\0" * max(0, free - step["room"]))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(step["argv"])
        left = sorted(os.path.relpath(os.path.join(d, n), disk) for d, _, ns in os.walk(disk) for n in ns)
        results.append({"code": code, "err": err.getvalue(), "files": [f for f in left if f != "filler"]})
        if step.get("keep"):
            shutil.copytree(os.path.join(disk, step["keep"][0]), os.path.join("kept", step["keep"][1]))
    with open(report, "w") as f:
        json.dump(results, f)
    """
)


def on_a_small_disk(steps: list[dict], work: Path, size: str = "32m") -> list[dict]:
    """Run `steps` (DRIVER's) with `work/disk` a tmpfs of `size` (gone with the namespace: what a test compares is
    copied out by `keep`: [path on the disk, name under work/kept])."""
    (work / "disk").mkdir(exist_ok=True)
    (work / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = f'mount -t tmpfs -o size={size} tmpfs disk && exec "{sys.executable}" driver.py disk "$0" report.json'
    process = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script, json.dumps(steps)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


def assert_disk_full_line(result: dict) -> None:
    lines = [line for line in result["err"].replace("\r", "\n").splitlines() if line.startswith("locedit: error:")]
    assert result["code"] == 1, result["err"][-3000:]
    assert "Traceback" not in result["err"], result["err"][-3000:]
    assert len(lines) == 1 and lines[0].startswith(DISK_FULL), lines
    assert "run the same command again to resume" in lines[0]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """An uninterrupted run of the tiny recipe on an ordinary disk (in a subprocess, as the ones it is compared to)."""
    root = tmp_path_factory.mktemp("whole")
    (root / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "locedit.cli", "train", TINY, *FAST, "--output_dir", "run"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return root / "run"


@needs_small_disk
def test_a_full_disk_while_training_is_one_line_and_the_same_command_resumes(whole_run, own_working_directory):
    """The disk fills at the run's start (its description), at a checkpoint, and at the end (the edit's files):
    each time one line naming where, no result file cut short, and, with room again, the same command ends at the
    edit of an uninterrupted run."""
    work = own_working_directory
    # What the run takes on a tmpfs (whole pages), and what its last writes (the edit's files at the top) take.
    pages = {p: -(-p.stat().st_size // 4096) * 4096 for p in whole_run.rglob("*") if p.is_file()}
    last = sum(size for p, size in pages.items() if p.parent == whole_run)
    rooms = {"start": 2048, "checkpoint": sum(pages.values()) // 3, "end": sum(pages.values()) - last // 2}
    steps = []
    for name, room in rooms.items():
        argv = ["train", TINY, *FAST, "--output_dir", f"disk/{name}"]
        steps.append({"room": room, "argv": argv, "keep": [name, f"{name}-full"]})
        steps.append({"room": None, "argv": argv, "keep": [name, name]})
    results = on_a_small_disk(steps, work)
    for index, name in enumerate(rooms):
        full, again = results[2 * index], results[2 * index + 1]
        assert_disk_full_line(full)
        # What the run directory holds after the fault: whole files only, no staging, no lock, not finished.
        left = work / "kept" / f"{name}-full"
        assert not (left / "metrics.json").exists() and not (left / LOCK).exists()
        for path in left.iterdir():
            assert ".tmp-" not in path.name and path.name != ".locedit-staging", path
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                check_safetensors(path, "")
        assert again["code"] == 0, again["err"][-3000:]
        assert max_difference(work / "kept" / name, whole_run) == 0


@needs_small_disk
def test_a_full_disk_while_building_a_cached_model_probing_or_evaluating_is_one_line_and_resumes(
    whole_run, own_working_directory
):
    """A cached model built on a full disk (LOCEDIT_CACHE there) leaves no entry behind, and is built whole with room
    again; an evaluation or a probe stopped by a full disk runs again to the files of one that had room."""
    work = own_working_directory
    train = ["train", TINY, *FAST, "--max_steps", "2", "--output_dir", "disk/cached"]
    steps = [
        {"env": {"LOCEDIT_CACHE": "disk/cache"}, "room": 64 * 1024, "argv": train, "keep": ["cache", "cache-full"]},
        {"room": None, "argv": train, "keep": ["cache", "cache"]},
        {
            "copy": [str(whole_run), "roomy"],
            "room": None,
            "argv": ["eval", "disk/roomy", *NO_JUDGES],
            "keep": ["roomy/eval", "roomy"],
        },
        {"copy": [str(whole_run), "full"], "room": 8 * 1024, "argv": ["eval", "disk/full", *NO_JUDGES]},
        {"room": None, "argv": ["eval", "disk/full", *NO_JUDGES], "keep": ["full/eval", "full"]},
    ]
    probe = ["probe", "recipes/tiny_probe.yaml", "--probe_output_dir"]
    steps += [
        {"room": None, "argv": [*probe, "disk/probe-roomy"], "keep": ["probe-roomy", "probe-roomy"]},
        {"room": 16 * 1024, "argv": [*probe, "disk/probe"]},
        {"room": None, "argv": [*probe, "disk/probe"], "keep": ["probe", "probe"]},
    ]
    results = on_a_small_disk(steps, work)
    assert_disk_full_line(results[0])
    # The build's temporary directory went with the fault: no entry, whole or not, was left in the cache.
    assert list((work / "kept" / "cache-full" / "tiny").iterdir()) == []
    assert results[1]["code"] == 0, results[1]["err"][-3000:]
    entries = list((work / "kept" / "cache" / "tiny").iterdir())
    assert len(entries) == 1 and (entries[0] / cache.MANIFEST).is_file() and cache.damage(entries[0]) is None
    assert results[2]["code"] == 0, results[2]["err"][-3000:]
    assert_disk_full_line(results[3])
    assert results[4]["code"] == 0, results[4]["err"][-3000:]
    ours, theirs = work / "kept" / "full", work / "kept" / "roomy"
    assert (ours / "generations.jsonl").read_text() == (theirs / "generations.jsonl").read_text()
    mine, other = (json.loads((d / "metrics.json").read_text()) for d in (ours, theirs))
    assert {k: v for k, v in mine.items() if k != "edit"} == {k: v for k, v in other.items() if k != "edit"}
    # A probe stopped by a full disk (its activations, the first large write) probes again to the same result.
    assert results[5]["code"] == 0, results[5]["err"][-3000:]
    assert_disk_full_line(results[6])
    assert results[7]["code"] == 0, results[7]["err"][-3000:]
    for name in ("probe.json", "probe.safetensors"):
        assert (work / "kept" / "probe" / name).read_bytes() == (work / "kept" / "probe-roomy" / name).read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM (what Slurm and Kubernetes send before they kill), under a launch and in the study
# ---------------------------------------------------------------------------------------------------------------------


def stopped_by_sigterm(command: list[str], cwd: Path, when, env: dict | None = None) -> str:
    """Run `command`, send it SIGTERM once `when()` holds, and return its stderr; it must end with 143 and one line."""
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(cwd / "stopped.out", "w") as out, open(cwd / "stopped.err", "w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        wait_for(when, timeout=300.0, process=process)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
        err.seek(0)
        said = err.read()
    assert code == 143, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert said.count("locedit: stopped by SIGTERM; run the same command again to resume") == 1, said[-3000:]
    return said


def test_a_launch_stopped_by_sigterm_resumes_to_the_same_edit(own_working_directory):
    """torchrun forwards SIGTERM to each process of the launch: each stops at once, the first says so, the run lock
    is released, and the same launch again ends at the edit of one process trained on the same batches."""
    from test_processes import command, environment

    work = own_working_directory
    argv = [TINY, *FAST, "--output_dir", "run"]
    said = stopped_by_sigterm(
        command("locedit.train", argv, 2), work, lambda: (work / "run" / "checkpoint-4").is_dir(), environment()
    )
    assert not (work / "run" / LOCK).exists() and not (work / "run" / "metrics.json").exists(), said[-2000:]
    again = subprocess.run(
        command("locedit.train", argv, 2),
        cwd=work,
        env={**environment(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from run/checkpoint-" in again.stdout
    # One process with both processes' batches: the same pairs per step, summed in another order.
    one = subprocess.run(
        [sys.executable, "-m", "locedit.cli", "train", *argv[:-1], "one", "--per_device_train_batch_size", "8"],
        cwd=work,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert max_difference(work / "run", work / "one") < 1e-5


def test_an_evaluation_stopped_by_sigterm_reruns_to_the_same_outputs(whole_run, own_working_directory):
    work = own_working_directory
    whole, run = work / "whole", work / "run"
    shutil.copytree(whole_run, whole)
    shutil.copytree(whole_run, run)
    evaluate = [sys.executable, "-m", "locedit.cli", "eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*evaluate, str(whole), *NO_JUDGES], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stopped_by_sigterm([*evaluate, str(run), *NO_JUDGES], work, lambda: (run / "eval" / LOCK).is_file())
    assert not (run / "eval" / LOCK).exists() and not (run / "eval" / "metrics.json").exists()
    again = subprocess.run([*evaluate, str(run), *NO_JUDGES], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "eval" / "generations.jsonl").read_text() == (whole / "eval" / "generations.jsonl").read_text()
    ours, theirs = (json.loads((d / "eval" / "metrics.json").read_text()) for d in (run, whole))
    assert {k: v for k, v in ours.items() if k != "edit"} == {k: v for k, v in theirs.items() if k != "edit"}


LANDS_IN_A_CALLBACK = """
import os, signal, sys, time, weakref
from locedit.core.errors import run_cli

class Thing:
    pass

def callback(ref):
    os.kill(os.getpid(), signal.{signal})  # handled at the callback's next instruction: inside it
    sum(range(1000))

def main():
    thing = Thing()
    watched = weakref.ref(thing, callback)
    del thing  # the callback runs
    for _ in range(100):
        time.sleep(0.05)
    print("ran to its end")

sys.exit(run_cli(main))
"""


@pytest.mark.parametrize(
    ("name", "code", "said"),
    [
        ("SIGTERM", 143, "locedit: stopped by SIGTERM; run the same command again to resume"),
        ("SIGINT", 130, "locedit: interrupted; run the same command again to resume"),
    ],
)
def test_a_signal_that_lands_in_a_weakref_callback_still_stops_the_command(name, code, said):
    """Python ignores an exception raised in a weakref callback or a `__del__`, the interrupt's too: a SIGTERM that
    landed in the garbage collection accelerate runs before each training let the toy study run to its end (exit 0;
    the fault test below, now and then). The signal is delivered again and the command stops, saying one line."""
    result = subprocess.run(
        [sys.executable, "-c", LANDS_IN_A_CALLBACK.format(signal=name)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=default_interrupt,  # Ctrl-C as in a terminal, also in a suite started in the background
    )
    assert (result.returncode, result.stdout, result.stderr.strip()) == (code, "", said)


def test_a_study_stopped_by_sigterm_resumes_at_the_stage_and_model_where_it_stopped(own_working_directory):
    """The toy study, stopped while it trains a family and again while it evaluates, then run to its end: what was
    finished is left as it is, and the study is README's (docs/toy_study; on another CPU, an uninterrupted one's)."""
    work = own_working_directory
    study = [sys.executable, "-m", "locedit.cli", "study", "recipes/toy.yaml"]
    toy = work / "outputs" / "toy"
    stopped_by_sigterm(study, work, lambda: bool(list(toy.glob("probe4-*/metrics.json"))))
    assert not list(toy.glob("*/" + LOCK)) and not (toy / "study" / "study.md").exists()
    first = (work / "stopped.out").read_text()
    stopped_by_sigterm(study, work, lambda: bool(list(toy.glob("*/eval/metrics.json"))))
    second = (work / "stopped.out").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    evaluated_before = len(list(toy.rglob("eval/metrics.json")))
    last = subprocess.run(study, cwd=work, env=env, capture_output=True, text=True, timeout=900).stdout
    # Each start takes up where the last stopped: a finished family is not trained again, nor an evaluated model
    # evaluated again.
    probe_family = "locedit study: locedit train recipes/toy.yaml --heads probe:4\n"
    assert probe_family in first and probe_family not in second
    assert "locedit: training took" in second and "locedit: training took" not in last
    evaluated = len(list(toy.rglob("eval/metrics.json")))  # the base model and 27 edits
    assert evaluated == 28 and evaluated_before >= 1
    assert last.count("left as it is") == evaluated_before
    assert last.count("generating 32 answers") == evaluated - evaluated_before
    if made_like_the_shipped_model():
        expected = (REPO / "docs" / "toy_study" / "study.md").read_text()  # README's study, bit for bit here
    else:  # on another CPU: the same study, uninterrupted, on this machine (tests/toy_reference.py)
        whole = work_dir(work, "uninterrupted")
        done = subprocess.run(study, cwd=whole, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        expected = (whole / "outputs" / "toy" / "study" / "study.md").read_text()
    assert without_timings((toy / "study" / "study.md").read_text()) == without_timings(expected)
