"""Running a W&B grid sweep file here, without W&B, one run at a time or one per GPU (`locedit sweep`).

The sweep files in `recipes/sweeps/` are ordinary W&B sweep files (`wandb sweep FILE`, then `wandb agent ID`). This
command expands the same grid and builds each run's command line with W&B's own agent code, so a run started here
is the run a W&B agent would start. Before anything runs, every run's arguments are parsed by the train entry
point (a typo fails in seconds, not after a night of runs). A run whose output_dir already holds finished results
(`metrics.json`) is skipped, so a stopped sweep resumes where it was; a run that fails is recorded with its error
and the sweep goes on.

    locedit sweep recipes/sweeps/lr_single_head.yaml                 # one run at a time (or one per GPU)
    locedit sweep recipes/sweeps/random_heads_16_draws.yaml --gpus 0,1,2,3
    locedit sweep recipes/sweeps/tau_all_heads.yaml --dry_run        # list the runs and what is already done
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import processes
from ..config import parse_recipe
from ..core.errors import USER_ERRORS, RecipeError
from ..core.files import read_json, write_json_atomic, write_text_atomic, yaml_problem
from ..core.tracking import Table, tracked_run
from ..rundir import expand_run_dirs, is_finished, output_dir_of, read_heads, read_metrics

PROGRAM = "locedit.train"


@dataclass
class SweepRun:
    """One run of a sweep: its hyperparameters, its command line and where its results go."""

    index: int
    params: dict
    command: list[str]
    output_dir: str

    @property
    def finished(self) -> bool:
        return is_finished(self.output_dir)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.output_dir))


def load_sweep(path: str) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(f"sweep file '{path}' does not exist")
    try:
        with open(path) as f:
            sweep = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"sweep file '{path}' is not valid YAML, at {yaml_problem(err)}") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise RecipeError(f"sweep file '{path}' needs a 'parameters' mapping (a W&B sweep file)")
    if sweep.get("method", "grid") != "grid":
        raise RecipeError(
            f"sweep file '{path}' uses method '{sweep['method']}'; locedit sweep runs grid sweeps "
            "(use `wandb sweep` and `wandb agent` for random or bayes search)"
        )
    if sweep.get("program", PROGRAM) != PROGRAM:
        raise RecipeError(f"sweep file '{path}' runs program '{sweep['program']}'; locedit sweep runs {PROGRAM}")
    return sweep


def grid(parameters: dict) -> list[dict]:
    """Every combination of the grid, in the order of the file (the last parameter varies fastest)."""
    names, choices = [], []
    for name, spec in parameters.items():
        if not isinstance(spec, dict) or not ({"value", "values"} & set(spec)):
            raise RecipeError(f"sweep parameter '{name}' needs 'value' or 'values' (grid search)")
        values = spec["values"] if "values" in spec else [spec["value"]]
        if not isinstance(values, list) or not values:
            given = "no values" if values == [] else f"values {values!r}"
            raise RecipeError(
                f"sweep parameter '{name}' has {given}: give a list of one or more values (or 'value: X' for one)"
            )
        names.append(name)
        choices.append(values)
    return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*choices)]


def command_line(sweep: dict, params: dict) -> list[str]:
    """The command a W&B agent would run for these parameters (W&B's own macro expansion)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    template = list(sweep.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"])
    macros = create_sweep_command_args({"args": {name: {"value": value} for name, value in params.items()}})
    macros.update(interpreter=[sys.executable], program=[sweep.get("program", PROGRAM)], env=[])
    command = []
    for token in create_sweep_command(template):
        token = str(token)
        if token.startswith("${") and token.endswith("}"):
            if token[2:-1] not in macros:
                raise RecipeError(f"sweep command macro '{token}' is not supported here")
            command += [str(part) for part in macros[token[2:-1]]]
        else:
            command.append(token)
    return command


def train_arguments(command: list[str]) -> list[str]:
    """The arguments that reach `locedit.train` in a command (after `-m locedit.train` or the program path)."""
    for index, token in enumerate(command):
        if token == PROGRAM or token.endswith("locedit/train.py"):
            return command[index + 1 :]
    raise RecipeError(f"sweep command {' '.join(command)} does not run {PROGRAM}")


def plan_sweep(path: str) -> list[SweepRun]:
    """Expand and check every run of a sweep file, without starting any."""
    sweep = load_sweep(path)
    runs, seen = [], {}
    for index, params in enumerate(grid(sweep["parameters"])):
        command = command_line(sweep, params)
        try:
            recipe = parse_recipe(train_arguments(command), prog="locedit train")
        except USER_ERRORS as err:
            raise RecipeError(f"run {index} of '{path}' ({params}): {err}") from None
        output_dir = output_dir_of(recipe)
        if output_dir in seen:
            raise RecipeError(
                f"runs {seen[output_dir]} and {index} of '{path}' would share output_dir '{output_dir}'; "
                "every run of a sweep needs its own"
            )
        seen[output_dir] = index
        runs.append(SweepRun(index, params, command, output_dir))
    return runs


def run_sweep(path: str, devices: list[str | None], log_dir: str) -> list[dict]:
    """Run every unfinished run of the sweep, one per device at a time. Returns a record per run.

    The runs are child processes that die with the sweep (a parent-death signal, on Linux), so a sweep killed even
    with SIGKILL leaves no run writing on; Ctrl-C stops the running runs and starts no new one. Under `accelerate
    launch` the runs are shared among the processes (`locedit.processes.share`), each running its runs one at a time
    on its own device; every process gets every record.
    """
    runs = plan_sweep(path)
    if processes.count() > 1:
        runs, devices = [run for _, run in processes.share(runs)], [None]  # None: this process's own device
    os.makedirs(log_dir, exist_ok=True)
    records: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    children: set[subprocess.Popen] = set()
    todo: queue.Queue = queue.Queue()
    for run in runs:
        if run.finished:
            records.append(_record(run, "skipped", note="output_dir holds finished results"))
            print(f"[{run.index + 1}/{len(runs)}] skip {run.name}: already finished", flush=True)
        else:
            todo.put(run)

    def worker(device: str | None) -> None:
        while not stop.is_set():
            try:
                run = todo.get_nowait()
            except queue.Empty:
                return
            # The run alone, outside any launch's process group; its log file follows it line by line.
            env = {**processes.solo_environment(), "PYTHONUNBUFFERED": "1"}
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            log_path = os.path.join(log_dir, f"{run.index:03d}-{run.name}.log")
            where = f" on GPU {device}" if device is not None else ""
            print(f"[{run.index + 1}/{len(runs)}] start {run.name}{where}", flush=True)
            start = time.time()
            with open(log_path, "w") as log:
                # Its own session: a Ctrl-C at the terminal reaches the sweep alone, which passes it on once.
                child = subprocess.Popen(
                    run.command,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=processes.die_with_parent(),
                )
                with lock:
                    children.add(child)
                returncode = child.wait()
                with lock:
                    children.discard(child)
            if stop.is_set():
                return  # interrupted: the run resumes when the sweep is started again
            seconds = time.time() - start
            if returncode == 0 and run.finished:
                record = _record(run, "finished", seconds=seconds, log=log_path)
            else:
                error = _last_error(log_path) or f"exit code {returncode}"
                record = _record(run, "failed", seconds=seconds, log=log_path, returncode=returncode, error=error)
            print(
                f"[{run.index + 1}/{len(runs)}] {record['status']} {run.name} ({seconds:.0f} s)"
                + (f": {record['error']}" if record["status"] == "failed" else ""),
                flush=True,
            )
            with lock:
                records.append(record)
                _append_jsonl(os.path.join(log_dir, "runs.jsonl"), record)

    threads = [threading.Thread(target=worker, args=(device,)) for device in devices]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        stop.set()
        with lock:
            running = list(children)
        for child in running:
            child.send_signal(signal.SIGINT)  # each run stops as after Ctrl-C: its checkpoints stay whole
        for thread in threads:
            thread.join()
        raise
    return processes.gather([(record["index"], record) for record in records])


def _record(run: SweepRun, status: str, **extra) -> dict:
    return {
        "index": run.index,
        "status": status,
        "params": run.params,
        "output_dir": run.output_dir,
        "command": run.command,
        **extra,
    }


def _last_error(log_path: str) -> str:
    """The line that says what went wrong: locedit's one-line error, else the last line of a traceback."""
    lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("locedit: error:"):
            return line
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:500]
    return lines[-1][:500] if lines else ""


def _append_jsonl(path: str, record: dict) -> None:
    """Add a record to runs.jsonl; the file is replaced whole, so a killed sweep never leaves a half line, under a
    lock, so that the processes of a launch never drop each other's records."""
    import fcntl

    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = Path(path).read_text() if os.path.isfile(path) else ""
        write_text_atomic(path, previous + json.dumps(record) + "\n")


def default_devices() -> list[str | None]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)] or [None]


def metric_value(run_dir: str, name: str) -> float | None:
    """A finished run's value of a sweep's metric: `eval/KEY` from its evaluation (eval_after_train), else its
    training metrics' `eval_KEY` (validation, as the Trainer logs `eval/loss`), else the training metrics' NAME."""
    key = name.split("/", 1)[1] if name.startswith("eval/") else name
    evaluation = os.path.join(run_dir, "eval", "metrics.json")
    if name.startswith("eval/") and os.path.isfile(evaluation):
        value = read_json(evaluation, "evaluate the run again").get(key)
        if value is not None:
            return value
    metrics = read_metrics(run_dir)
    value = metrics.get(f"eval_{key}" if name.startswith("eval/") else name)
    return value if isinstance(value, int | float) else None


def best_per_head_count(path: str, records: list[dict]) -> list[dict]:
    """For each number of edited heads, the finished run of the sweep whose edits reach the best mean value of its
    metric (`metric: name, goal` of the sweep file), with the parameters that made it: the best learning rate per
    head count of a learning-rate sweep. A run of several edits scores the mean over them."""
    sweep = load_sweep(path)
    metric = sweep.get("metric") or {}
    name, goal = metric.get("name"), metric.get("goal", "minimize")
    if not name:
        return []
    by_count: dict[int, list[dict]] = {}
    for record in records:
        if record["status"] not in ("finished", "skipped"):
            continue
        edits = expand_run_dirs([record["output_dir"]])
        values = [metric_value(edit, name) for edit in edits]
        if not values or any(value is None for value in values):
            continue
        count = len(read_heads(edits[0])["heads"])
        entry = {"head_count": count, "params": record["params"], "output_dir": record["output_dir"]}
        by_count.setdefault(count, []).append({**entry, "edits": len(edits), "value": sum(values) / len(values)})
    pick = max if goal == "maximize" else min
    return [
        {**pick(runs, key=lambda run: run["value"]), "metric": name, "goal": goal, "runs": len(runs)}
        for count, runs in sorted(by_count.items())
    ]


def report_sweep(path: str, records: list[dict], log_dir: str) -> list[dict]:
    """best.json in the log directory (each head count's best run, `best_per_head_count`) and, with the runs'
    report_to, a tracked run `SWEEP-sweep` whose table lists it. Returns the best runs."""
    best = best_per_head_count(path, records)
    write_json_atomic(os.path.join(log_dir, "best.json"), best)
    if not best:
        return best
    # The sweep's recipe (where its runs are tracked): every run's command parsed before the sweep started.
    recipe = parse_recipe(train_arguments(records[0]["command"]), prog="locedit train")
    params = sorted({key for run in best for key in run["params"]})
    columns = ["head_count", *params, best[0]["metric"], "runs", "output_dir"]
    rows = [
        [run["head_count"], *(run["params"].get(key) for key in params), run["value"], run["runs"], run["output_dir"]]
        for run in best
    ]
    name = f"{Path(path).stem}-sweep"
    with tracked_run(recipe.training.report_to, recipe.edit.wandb_project, name, "sweep", "sweep") as run:
        if run is not None:
            run.log({"sweep/best_per_head_count": Table(columns, rows)})
            run.summary({f"sweep/best/{entry['head_count']}_heads": entry["value"] for entry in best})
    return best
