"""Sweeps: the W&B sweep files parse, and `locedit sweep` resumes a stopped sweep to the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from locedit.core.errors import RecipeError
from locedit.pipelines.sweep import command_line, grid, load_sweep, plan_sweep, train_arguments

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_files_parse_and_their_commands_parse_with_the_train_parser(path, monkeypatch):
    sweep = load_sweep(str(path))
    command = sweep["command"]
    # W&B with accelerate: the command is split into tokens, the program run as a module, hyperparameters as flags.
    assert command[:2] == ["accelerate", "launch"] and command[command.index("-m") + 1] == "${program}"
    assert "${args}" in command
    runs = plan_sweep(str(path))
    assert len(runs) == len(grid(sweep["parameters"])) > 1
    assert len({run.output_dir for run in runs}) == len(runs)  # every run has its own output_dir
    for run in runs:
        assert all(f"--{name}={value}" in run.command for name, value in run.params.items())


def test_command_line_is_what_a_wandb_agent_runs():
    sweep = {
        "program": "locedit.train",
        "command": ["${env}", "${interpreter}", "-m", "${program}", "r.yaml", "${args}"],
    }
    command = command_line(sweep, {"beta": 0.2, "heads_seed": 3})
    assert command == [sys.executable, "-m", "locedit.train", "r.yaml", "--beta=0.2", "--heads_seed=3"]
    assert train_arguments(command) == ["r.yaml", "--beta=0.2", "--heads_seed=3"]


def test_bad_sweep_files_are_one_line_errors(tmp_path):
    cases = {
        "bayes.yaml": {"method": "bayes", "parameters": {"beta": {"min": 0.1, "max": 0.5}}},
        "other.yaml": {"program": "train.py", "parameters": {"beta": {"values": [0.1]}}},
        "typo.yaml": {
            "parameters": {"learning_rat": {"values": [0.1]}},
            "command": ["${interpreter}", "-m", "${program}", str(REPO / "recipes/tiny.yaml"), "${args}"],
        },
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(yaml.safe_dump(content))
        with pytest.raises(RecipeError) as info:
            plan_sweep(str(tmp_path / name))
        assert "\n" not in str(info.value)
    assert "learning_rat" in str(info.value)


def test_an_empty_list_of_values_or_broken_yaml_says_where(tmp_path):
    """A grid with an empty list of values ran nothing and said '0 runs'; a YAML error names its line and column."""
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"parameters": {"beta": {"values": []}, "heads_seed": {"value": 1}}}))
    with pytest.raises(RecipeError, match="sweep parameter 'beta' has no values: give a list of one or more values"):
        plan_sweep(str(empty))
    broken = tmp_path / "broken.yaml"
    broken.write_text("program: locedit.train\nparameters:\n  beta: {values: [0.1, 0.2\n")
    with pytest.raises(RecipeError, match=r"'.*broken.yaml' is not valid YAML, at line 4, column 1: expected ','"):
        plan_sweep(str(broken))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("beta: 0.1\nheads: [L0H1\n")
    from locedit.config import parse_recipe

    with pytest.raises(RecipeError, match=r"recipe '.*recipe.yaml' is not valid YAML, at line 3, column 1"):
        parse_recipe([str(recipe)])


def write_sweep(path: Path, extra_params: dict | None = None) -> Path:
    sweep = {
        "program": "locedit.train",
        "method": "grid",
        "parameters": {"heads": {"value": "random:1"}, "heads_seed": {"values": [0, 1, 2]}, **(extra_params or {})},
        "command": [
            "${interpreter}",
            "-m",
            "${program}",
            str(REPO / "recipes" / "tiny.yaml"),
            "--dataset",
            "synthetic:40",
            "--max_steps",
            "3",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "${args}",
        ],
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


def sweep(cwd: Path, sweep_file: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "locedit.sweep", str(sweep_file)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "tiny").iterdir())


def test_a_stopped_sweep_resumes_skipping_finished_runs_with_the_same_results(tmp_path):
    sweep_file = write_sweep(tmp_path / "seeds.yaml")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    assert sweep(whole, sweep_file).wait(timeout=600) == 0

    # Stop the second sweep as soon as its first run has finished (the whole process group, as Ctrl-C would).
    process = sweep(stopped, sweep_file, start_new_session=True)
    deadline = time.time() + 300
    while not list((stopped / "outputs").glob("tiny/*/metrics.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = list((stopped / "outputs").glob("tiny/*/metrics.json"))
    assert 1 <= len(finished_before) < 3

    again = sweep(stopped, sweep_file)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    assert output.count("skip ") == len(finished_before)
    assert f"{3 - len(finished_before)} finished, {len(finished_before)} skipped" in output
    assert [p.name for p in run_dirs(stopped)] == [p.name for p in run_dirs(whole)]
    for ours, theirs in zip(run_dirs(stopped), run_dirs(whole), strict=True):
        a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(theirs / "adapter_model.safetensors"))
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    # L0H9 parses as a flag but is outside the tiny model's 2 layers x 4 heads: the run itself fails.
    sweep_file = write_sweep(
        tmp_path / "bad.yaml", {"heads": {"values": ["L0H9", "L1H2"]}, "heads_seed": {"value": 0}}
    )
    process = sweep(tmp_path, sweep_file)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 1  # the sweep reports the failure in its exit code...
    assert "1 finished, 0 skipped (done before), 1 failed" in output  # ...after running the other run
    records = [json.loads(line) for line in (tmp_path / "outputs/sweeps/bad/runs.jsonl").read_text().splitlines()]
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["params"]["heads"] == "L0H9" and "out of range" in failed["error"]
    assert (tmp_path / failed["log"]).is_file()  # paths are relative to where the sweep ran, as output_dir is


def test_a_sweep_names_the_best_run_per_head_count_in_best_json_and_on_its_dashboard(tmp_path):
    """A learning-rate sweep at one and at two heads: each head count's best run by the sweep's metric (the lowest
    training loss here), with its learning rate, in best.json and as a table of a tracked run `SWEEP-sweep`."""
    from test_tracking import trackio_runs

    sweep_file = write_sweep(
        tmp_path / "lr.yaml",
        {"heads": {"values": ["L0H1", "L0H1,L1H2"]}, "learning_rate": {"values": [0.003, 0.03]}},
    )
    spec = yaml.safe_load(sweep_file.read_text())
    del spec["parameters"]["heads_seed"]
    spec["metric"] = {"name": "train_loss", "goal": "minimize"}
    command = spec["command"]
    command[command.index("--report_to") + 1 : command.index("--report_to") + 2] = ["trackio"]
    command[-1:-1] = ["--wandb_project", "locedit-sweep-test"]
    sweep_file.write_text(yaml.safe_dump(spec))
    process = sweep(tmp_path, sweep_file)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]

    losses = {}
    for run_dir in run_dirs(tmp_path):
        heads = len(json.loads((run_dir / "heads.json").read_text())["heads"])
        loss = json.loads((run_dir / "metrics.json").read_text())["train_loss"]
        losses.setdefault(heads, []).append((loss, run_dir))
    best = json.loads((tmp_path / "outputs/sweeps/lr/best.json").read_text())
    assert [entry["head_count"] for entry in best] == [1, 2]
    for entry in best:
        loss, run_dir = min(losses[entry["head_count"]])
        assert entry["value"] == loss and entry["runs"] == 2
        assert (tmp_path / entry["output_dir"]).resolve() == run_dir.resolve()
        assert f"best at {entry['head_count']} heads: {entry['params']}" in output
    table = next(
        log["sweep/best_per_head_count"]
        for log in trackio_runs("locedit-sweep-test")["lr-sweep"]["logs"]
        if "sweep/best_per_head_count" in log
    )
    assert [(row["head_count"], row["heads"], row["learning_rate"]) for row in table["_value"]] == [
        (entry["head_count"], entry["params"]["heads"], entry["params"]["learning_rate"]) for entry in best
    ]
