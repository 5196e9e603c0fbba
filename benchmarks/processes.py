"""Weak scaling of the study: N processes of an `accelerate launch` with one thread each against one process with one
thread, the same work and the same files: wall time of the whole command and of each stage, and whether the study's
tables are identical.

    python benchmarks/processes.py                          # the toy study as recipes/toy.yaml has it, 1 vs 2
    python benchmarks/processes.py --rounds 3               # medians of 3 rounds, the order alternating
    python benchmarks/processes.py --recipe recipes/smollm2.yaml   # the quick SmolLM2 study (hours on 2 cores)
    python benchmarks/processes.py --small                  # 2 random sets and 2 single heads (CI)

Each command runs in a fresh directory with the model already cached (built before the first timing; the reference
data, judges and caches of the recipe's first run are warmed by an untimed run first, as a user's second study
finds them; --small builds only the toy model first, as it checks results, not speed). On a machine without a GPU
the N processes are `accelerate launch --multi_gpu --num_processes N` (torchrun's gloo processes). Every process,
the one and the N, has one thread (OMP_NUM_THREADS=1): the N use N cores where the one uses one, which is what
scaling out means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# How each stage uses the processes of a launch.
SPREAD = {
    "model": "every process plans every stage (no)",
    "probe": "activations by example shares (the fit on the main process)",
    "iti": "main process",
    "train": "edits dealt to the processes, each trains its share as one multi-edit run",
    "eval": "models dealt to the processes",
    "report": "main process",
}


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def study_command(processes: int, recipe: str, flags: list[str]) -> list[str]:
    study = ["-m", "locedit.study", recipe, *flags]
    if processes == 1:
        return [sys.executable, *study]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", free_port()]
    # `--multi_gpu` starts N processes on GPUs, and N CPU processes (gloo) on a machine without one (`--cpu` would
    # start a single process).
    return [*launch, "--multi_gpu", *study]


def run_study(processes: int, recipe: str, flags: list[str], root: Path, env: dict) -> tuple[float, dict]:
    """Wall seconds of the whole command, and the study's report (study.json) without its timings."""
    if processes == 1:  # one GPU where there are several (transformers' single process would take them all)
        env = {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    cwd = Path(tempfile.mkdtemp(prefix=f"p{processes}-", dir=root))
    (cwd / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    started = time.perf_counter()
    result = subprocess.run(study_command(processes, recipe, flags), cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"processes.py: the study with {processes} process(es) failed:\n{result.stderr[-3000:]}")
    report = json.loads(next((cwd / "outputs").glob("*/study/study.json")).read_text())
    shutil.rmtree(cwd, ignore_errors=True)
    return wall, report


def by_stage(timings: dict) -> dict[str, float]:
    """Wall seconds per stage, one process's training families summed into "train"."""
    stages: dict[str, float] = {}
    for name, entry in timings.items():
        key = "train" if name.startswith("train") else name
        stages[key] = stages.get(key, 0.0) + entry["wall_s"]
    return stages


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="locedit-processes-"))
    try:
        compare(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compare(root: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/toy.yaml")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="2 random sets and 2 single heads (CI)")
    parser.add_argument("flags", nargs="*", help="more recipe flags for every study (after --)")
    args = parser.parse_args()
    flags = [*(["--study_random", "2", "--study_single", "2"] if args.small else []), *args.flags]

    if (REPO.parent / "shared").is_dir():  # recipes name the reference data as ../shared/data
        (root / "shared").symlink_to(REPO.parent / "shared", target_is_directory=True)
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("LOCEDIT_CACHE", str(root / "cache"))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread per process, the one and the N alike
    if args.small:  # CI checks the results, not the speed: only the model is built before the first study
        warm = "import sys; from locedit.models.sources import resolve_model_path; resolve_model_path(sys.argv[1])"
        model = "toy" if args.recipe == "recipes/toy.yaml" else None
        if model:
            subprocess.run([sys.executable, "-c", warm, model], env=env, check=True, capture_output=True)
    else:  # the model built and the caches a second study finds (reference data, judges) filled, before any timing
        run_study(1, args.recipe, flags, root, env)

    counts = [1, args.processes]
    walls: dict[int, list[float]] = {p: [] for p in counts}
    stages: dict[int, list[dict]] = {p: [] for p in counts}
    reports: dict[int, dict] = {}
    for round_ in range(args.rounds):
        for processes in counts if round_ % 2 == 0 else counts[::-1]:
            wall, report = run_study(processes, args.recipe, flags, root, env)
            walls[processes].append(wall)
            stages[processes].append(by_stage(report["timings"]))
            reports[processes] = {key: value for key, value in report.items() if key != "timings"}
    same = reports[1] == reports[args.processes]

    one, many = statistics.median(walls[1]), statistics.median(walls[args.processes])
    names = list(stages[1][0])
    median = {p: {name: statistics.median(s.get(name, 0.0) for s in stages[p]) for name in names} for p in counts}
    total = sum(median[1].values())
    size = "--small" if args.small else args.recipe + (" " + " ".join(args.flags) if args.flags else "")
    print(f"study ({size}), 1 thread per process, {args.rounds} round(s), medians")
    print(f"| stage | 1 process (s) | {args.processes} processes (s) | speed-up | share of 1 process | spread |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        a, b = median[1][name], median[args.processes][name]
        ratio = f"{a / b:.2f}x" if b > 0 else "-"
        print(f"| {name} | {a:.1f} | {b:.1f} | {ratio} | {a / total:.0%} | {SPREAD.get(name, 'no')} |")
    print(
        f"whole command: 1 process {one:.1f} s, {args.processes} processes {many:.1f} s: speed-up {one / many:.2f}x "
        f"(rounds: {', '.join(f'{a / b:.2f}x' for a, b in zip(walls[1], walls[args.processes], strict=True))})"
    )
    print(f"study tables identical: {same}")
    if not same:
        sys.exit("processes.py: the study's tables differ between 1 and N processes")


if __name__ == "__main__":
    main()
