"""Every process of an `accelerate launch`: probe, eval and the study run under 2 CPU processes (a gloo group) and
write exactly the files one process writes; an interrupted 2-process study resumed by 1 process gives the same table.

On a machine without a GPU, `accelerate launch --multi_gpu --num_processes 2` starts 2 processes (torchrun's);
`--cpu` would start one. The processes share the 2 cores here, so these tests are about results, not speed
(`benchmarks/processes.py` times them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from toy_reference import assert_same_study

from locedit.processes import LAUNCHER_VARIABLES
from locedit.toy.model import made_like_the_shipped_model

TINY, TINY_PROBE, TOY = "recipes/tiny.yaml", "recipes/tiny_probe.yaml", "recipes/toy.yaml"
NO_JUDGES = ["--eval_judge_truth", "none", "--eval_judge_info", "none", "--eval_corpus", "none"]
STUDY = [TOY, "--study_random", "2", "--study_single", "2"]


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def environment() -> dict[str, str]:
    # The commands must see no launch of their own (pytest under a launcher would hand its variables down).
    return {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}


def command(module: str, args: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", module, *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "--main_process_port", free_port(), "-m", module, *args]


def run(module: str, args: list[str], processes: int, cwd: Path) -> str:
    result = subprocess.run(
        command(module, args, processes), cwd=cwd, env=environment(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def work_dir(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "recipes").symlink_to(Path(__file__).resolve().parents[1] / "recipes", target_is_directory=True)
    return directory


def same_files(a: Path, b: Path, pattern: str) -> list[str]:
    """The files matching `pattern` below a, each equal to its namesake below b; returns their relative paths."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob(pattern))
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob(pattern))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def test_probe_with_two_processes_is_the_probe_of_one(tmp_path):
    results = {}
    for processes in (1, 2):
        cwd = work_dir(tmp_path, f"p{processes}")
        out = run("locedit.probe", [TINY_PROBE, "--probe_output_dir", "probe"], processes, cwd)
        assert out.count("locedit probe\n") == 1  # the main process speaks
        results[processes] = cwd / "probe"
    assert same_files(results[1], results[2], "*.json") == ["probe.json"]
    assert len(same_files(results[1], results[2], "*.safetensors")) == 2  # the activations and the probes


def test_iti_with_two_processes_probes_together_and_writes_what_one_writes(tmp_path):
    made = {}
    for processes in (1, 2):
        cwd = work_dir(tmp_path, f"i{processes}")
        run("locedit.iti", [TINY_PROBE, "--heads", "random:2", "--heads_draws", "2"], processes, cwd)
        made[processes] = cwd / "outputs"
    assert len(same_files(made[1], made[2], "adapter_model.safetensors")) == 2
    assert same_files(made[1], made[2], "probe.json") == ["tiny_probe/probe/probe.json"]


SLOW_FIRST_BUILD = """
import os, time
if os.environ.get("LOCAL_RANK") == "0" and os.environ.get("WORLD_SIZE", "1") != "1":
    import locedit.core.cache as cache
    build_cached = cache.build_cached
    def slow(target, build):
        return build_cached(target, lambda tmp: (time.sleep(5), build(tmp))[1])
    cache.build_cached = slow
"""


def test_two_processes_on_a_cold_cache_build_the_model_once_and_whole(tmp_path):
    """With a process group up, transformers saves a model's weights on the main process only: the first process
    builds what is cached, the others wait for it (a second copy would have no weights)."""
    cwd = work_dir(tmp_path, "cold")
    cache = tmp_path / "cache"
    # The first process builds slowly, so that the other surely finds the model unbuilt (a tiny model builds in a
    # second: the other process, started later by a loaded machine, found it built 1 time in 5, and had no wait to
    # report). Python runs `sitecustomize` at start-up, before locedit binds `build_cached`.
    slow = tmp_path / "slow_first_build"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_FIRST_BUILD)
    path = os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))
    env = {**environment(), "LOCEDIT_CACHE": str(cache), "PYTHONPATH": path}
    args = [TINY_PROBE, "--probe_output_dir", "probe"]
    result = subprocess.run(
        command("locedit.probe", args, 2), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "waiting for the launch's first process to build" in result.stderr
    (model,) = (cache / "tiny").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model))
    assert (cwd / "probe" / "probe.json").is_file()


def test_eval_with_two_processes_shares_the_models_and_writes_what_one_writes(tmp_path):
    trained = work_dir(tmp_path, "trained")
    # Three edits in one multi-edit run, and a single edit: four edited models and the base model.
    fast = ["--max_steps", "4", "--report_to", "none"]
    multi = ["--heads", "random:2", "--heads_draws", "3", "--output_dir", "multi"]
    run("locedit.train", [TINY, *fast, *multi], 1, trained)
    run("locedit.train", [TINY, *fast, "--heads", "L0H1", "--output_dir", "single"], 1, trained)
    edits = ["multi/" + name for name in sorted(os.listdir(trained / "multi")) if name.startswith("random")]
    assert len(edits) == 3
    evaluated = {}
    for processes in (1, 2):
        cwd = tmp_path / f"e{processes}"
        shutil.copytree(trained, cwd, symlinks=True)
        args = [TINY, *edits, "single", "--base", *NO_JUDGES, "--eval_output_dir", "base"]
        out = run("locedit.eval", args, processes, cwd)
        assert out.count("generating 24 answers") == 5
        evaluated[processes] = cwd
    assert len(same_files(evaluated[1], evaluated[2], "generations.jsonl")) == 5
    assert len(same_files(evaluated[1], evaluated[2], "metrics.json")) == 5 + 5  # runs' and their evaluations'

    # Evaluated again with the same settings, every model is left as it is.
    out = run("locedit.eval", [TINY, *edits, "single", "--base", *NO_JUDGES, "--eval_output_dir", "base"], 2, cwd)
    assert out.count("left as it is") == 5 and "generating" not in out


def test_eval_deals_each_target_to_one_process_whatever_each_process_saw_done(monkeypatch):
    """The processes of a launch plan at different moments: one that plans after another has finished a target sees
    it done. Each target must still be taken by one process only (two taking one ended in 'is in use by process N'
    in 2 of 3 two-process toy studies)."""
    from types import SimpleNamespace

    from locedit import processes
    from locedit.evaluation.run import share_targets

    monkeypatch.setenv("WORLD_SIZE", "2")
    seen_first = [SimpleNamespace(done=False) for _ in range(5)]  # planned before any evaluation was written
    seen_later = [SimpleNamespace(done=position == 0) for position in range(5)]  # after process 0 finished target 0
    taken = []
    for rank, view in ((0, seen_first), (1, seen_later)):
        monkeypatch.setattr(processes, "index", lambda rank=rank: rank)
        taken.append({position for position, _ in share_targets(view)})
    assert not taken[0] & taken[1]
    assert taken[0] | taken[1] == {0, 1, 2, 3, 4}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux's /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def study_table(cwd: Path) -> dict:
    report = json.loads((cwd / "outputs/toy/study/study.json").read_text())
    return {key: value for key, value in report.items() if key != "timings"}


def assert_same_table(cwd: Path, reference: Path) -> None:
    """The study of `cwd` is that of `reference`: its whole report exactly where the toy reference was made, its
    study.md's tables within another CPU's rounding elsewhere."""
    if made_like_the_shipped_model():
        assert study_table(cwd) == study_table(reference)
    assert_same_study(*((d / "outputs/toy/study/study.md").read_text() for d in (cwd, reference)))


def test_study_with_two_processes_is_the_study_of_one_and_resumes_with_one(tmp_path):
    one = work_dir(tmp_path, "one")
    run("locedit.study", STUDY, 1, one)

    two = work_dir(tmp_path, "two")
    out = run("locedit.study", STUDY, 2, two)
    assert out.count("locedit study: wrote") == 1  # the main process writes the report
    assert_same_table(two, one)
    # Bit for bit where the toy reference was made: a family split by edit trains each edit alone, in matmuls of
    # other shapes, which another CPU's BLAS can round otherwise (tests/toy_reference.py).
    if made_like_the_shipped_model():
        assert len(same_files(one / "outputs", two / "outputs", "adapter_model.safetensors")) >= 8
        assert len(same_files(one / "outputs", two / "outputs", "generations.jsonl")) >= 9
    # The families of several edits were split by edit: each process trained its share as a run of its own.
    assert len(list((two / "outputs/toy").glob("*/shares/*/metrics.json"))) == 4  # 2 random sets, 2 single heads
    assert not list((one / "outputs/toy").glob("*/shares"))  # one process trains each family as one run

    # Killed (SIGKILL: the launcher, its processes and their training runs, as when a node goes down) once a first
    # run directory is finished, then resumed by one process: the same table.
    resumed = work_dir(tmp_path, "resumed")
    launched = subprocess.Popen(
        command("locedit.study", STUDY, 2),
        cwd=resumed,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not list((resumed / "outputs/toy").glob("*/metrics.json")) and time.monotonic() < deadline:
        assert launched.poll() is None, "the study ended before it could be interrupted"
        time.sleep(0.2)
    for pid in [launched.pid, *descendants(launched.pid)]:  # the launcher, its processes and their training runs
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launched.wait()
    assert not (resumed / "outputs/toy/study/study.json").exists()
    run("locedit.study", STUDY, 1, resumed)
    assert_same_table(resumed, one)


def test_a_sweep_with_two_processes_shares_its_runs(tmp_path):
    from test_sweep import write_sweep

    sweep_file = write_sweep(tmp_path / "seeds.yaml")
    cwd = work_dir(tmp_path, "sweep")
    out = run("locedit.sweep", [str(sweep_file)], 2, cwd)
    assert out.count("] start ") == 3 and out.count("] finished ") == 3
    assert out.count("3 finished, 0 skipped (done before), 0 failed") == 1  # the main process sums up
    records = [json.loads(line) for line in (cwd / "outputs/sweeps/seeds/runs.jsonl").read_text().splitlines()]
    assert sorted(record["index"] for record in records) == [0, 1, 2]
    assert len(list((cwd / "outputs/tiny").glob("*/metrics.json"))) == 3


def test_a_share_trained_in_a_child_process_is_the_share_trained_here(tmp_path, monkeypatch):
    """On GPUs a process of a launch trains its share in one child process on its own GPU (transformers' single
    process would take every GPU): the child makes what this interpreter makes."""
    from locedit.config import parse_recipe
    from locedit.pipelines.study import family_jobs, train_jobs, train_jobs_in_child

    flags = ["--dataset", "synthetic:40", "--max_steps", "3", "--report_to", "none", "--save_strategy", "no"]
    family = ["--heads", "random:2", "--heads_draws", "2"]
    base = [TINY, *flags]
    runs = {}
    for where in ("here", "child"):
        cwd = work_dir(tmp_path, where)
        monkeypatch.chdir(cwd)
        jobs = family_jobs("random", family, lambda command, more: parse_recipe([*base, *more]))
        (train_jobs if where == "here" else train_jobs_in_child)(base, jobs[1:])
        runs[where] = cwd
    assert len(same_files(runs["here"] / "outputs", runs["child"] / "outputs", "adapter_model.safetensors")) == 1


def test_importance_with_two_processes_is_the_importance_of_one(tmp_path):
    """Gradient importance spread over a launch (each process its share of the batches, the sums added in batch
    order) writes the scores one process writes, bit for bit."""
    script = tmp_path / "locate.py"
    script.write_text(
        "import sys\n"
        "from locedit.config import parse_recipe\n"
        "from locedit.pipelines.locate import locate_together\n"
        "locate_together(parse_recipe(sys.argv[1:]))\n"
    )
    args = [TINY, "--dataset", "synthetic:40", "--heads", "importance:3", "--per_device_eval_batch_size", "4"]
    results = {}
    for processes in (1, 2):
        cwd = work_dir(tmp_path, f"p{processes}")
        cmd = [sys.executable, str(script), *args]
        if processes == 2:  # the launcher's command with the script in place of `-m MODULE`
            cmd = [*command("locedit.cli", [], 2)[:-2], str(script), *args]
        result = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("gradient importance of every head") == 1  # the main process says it
        results[processes] = json.loads((cwd / "outputs/tiny/importance/importance.json").read_text())
    assert results[1]["scores"] == results[2]["scores"]
