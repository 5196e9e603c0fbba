"""The toy study with 1 process against N processes of an `accelerate launch`, the same work and the same files:
wall time of the whole study and of each stage, and which share of the one-process study's wall time runs spread
over the processes (the rest runs on the main process alone, or once per process).

    python benchmarks/processes.py                    # the toy study as recipes/toy.yaml has it, 1 vs 2 processes
    python benchmarks/processes.py --rounds 3         # medians of 3 rounds, the order alternating
    python benchmarks/processes.py --small            # 1 random set and 1 single head (CI)

Each command runs in a fresh directory with the toy model already cached (pre-trained before the first timing).
On a machine without a GPU the N processes are `accelerate launch --multi_gpu --num_processes N` (torchrun's; each
process gets one thread, as torchrun sets it), and the one process has every core's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The stages whose work is shared among the processes, and how; the others run on the main process (ITI, the
# report) or once per process (the model's resolution and every stage's plan).
SPREAD = {
    "probe": "activations by batch shares (the fit on the main process)",
    "train": "training runs shared, each alone on its process's device",
    "eval": "models shared, each process with its own base model and judges",
}


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def study_command(processes: int, flags: list[str]) -> list[str]:
    study = ["-m", "locedit.study", "recipes/toy.yaml", *flags]
    if processes == 1:
        return [sys.executable, *study]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", free_port()]
    # `--multi_gpu` starts N processes on GPUs, and N CPU processes (gloo) on a machine without one (`--cpu` would
    # start a single process).
    return [*launch, "--multi_gpu", *study]


def run_study(processes: int, flags: list[str], root: Path, env: dict) -> tuple[float, dict]:
    """Wall seconds of the whole command, and the study's own timings (study.json) of each stage."""
    cwd = Path(tempfile.mkdtemp(prefix=f"p{processes}-", dir=root))
    (cwd / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    started = time.perf_counter()
    result = subprocess.run(study_command(processes, flags), cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"processes.py: the study with {processes} process(es) failed:\n{result.stderr[-3000:]}")
    report = json.loads((cwd / "outputs/toy/study/study.json").read_text())
    rows = {key: value for key, value in report.items() if key != "timings"}
    return wall, {"timings": report["timings"], "rows": rows}


def by_stage(timings: dict) -> dict[str, float]:
    """Wall seconds per stage, the training families summed into "train"."""
    stages: dict[str, float] = {}
    for name, entry in timings.items():
        key = "train" if name.startswith("train ") else name
        stages[key] = stages.get(key, 0.0) + entry["wall_s"]
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="1 random set and 1 single head (CI)")
    args = parser.parse_args()
    flags = ["--study_random", "1", "--study_single", "1"] if args.small else []

    root = Path(tempfile.mkdtemp(prefix="locedit-processes-"))
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("LOCEDIT_CACHE", str(root / "cache"))
    # The toy model pre-trained once, before any timing.
    warm = "from locedit.models.sources import resolve_model_path; resolve_model_path('toy')"
    subprocess.run([sys.executable, "-c", warm], env=env, check=True, capture_output=True)

    walls: dict[int, list[float]] = {1: [], args.processes: []}
    stages: dict[int, list[dict]] = {1: [], args.processes: []}
    tables = {}
    for round_ in range(args.rounds):
        order = [1, args.processes] if round_ % 2 == 0 else [args.processes, 1]
        for processes in order:
            wall, report = run_study(processes, flags, root, env)
            walls[processes].append(wall)
            stages[processes].append(by_stage(report["timings"]))
            tables[processes] = report["rows"]
    same = tables[1] == tables[args.processes]

    one, many = statistics.median(walls[1]), statistics.median(walls[args.processes])
    names = list(stages[1][0])
    median = {p: {name: statistics.median(s[name] for s in stages[p]) for name in names} for p in walls}
    total = sum(median[1].values())
    print(f"toy study ({'--small' if args.small else 'recipes/toy.yaml'}), {args.rounds} round(s), medians")
    print(f"| stage | 1 process (s) | {args.processes} processes (s) | ratio | share of 1 process | spread |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        a, b = median[1][name], median[args.processes][name]
        ratio = f"{a / b:.2f}x" if b > 0 else "-"
        print(f"| {name} | {a:.1f} | {b:.1f} | {ratio} | {a / total:.0%} | {SPREAD.get(name, 'no')} |")
    spread_share = sum(median[1][name] for name in names if name in SPREAD) / total
    print(f"whole command: 1 process {one:.1f} s, {args.processes} processes {many:.1f} s: speed-up {one / many:.2f}x")
    print(f"share of the 1-process stages' wall time in spread stages: {spread_share:.0%}")
    print(f"study tables identical: {same}")
    if not same:
        sys.exit("processes.py: the study tables differ between 1 and N processes")


if __name__ == "__main__":
    main()
