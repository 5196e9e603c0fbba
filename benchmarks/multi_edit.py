"""K edits trained in one run against K separate runs, with a check that the results are equal.

Goal on a GPU: 16 head sets in at most 3x the time of one run; on 2 CPU cores, still faster than K separate runs.

    python benchmarks/multi_edit.py --edits 16          # 16 random sets of 4 heads, 3 interleaved rounds, medians
    python benchmarks/multi_edit.py --small             # CI-sized
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from common import CPU, SMALL, model_dir, timed
from safetensors.torch import load_file

from locedit.config import parse_recipe
from locedit.rundir import expand_run_dirs
from locedit.train import main as train


def run(flags: list[str]) -> dict:
    return train(parse_recipe(["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *flags]))


def edit_difference(edit_dir: str, other_dir: str) -> dict[str, float]:
    """How far apart two saved edits are: the largest absolute difference of their tensors, the largest relative
    one (a tensor's largest absolute difference over its largest absolute value in `other_dir`), and the norm of
    all differences over the norm of `other_dir`'s tensors."""
    ours = load_file(f"{edit_dir}/adapter_model.safetensors")
    theirs = load_file(f"{other_dir}/adapter_model.safetensors")
    differences = {k: float((ours[k] - theirs[k]).abs().max()) for k in theirs}
    return {
        "max_abs_diff": max(differences.values()),
        "max_rel_diff": max(d / max(float(theirs[k].abs().max()), 1e-30) for k, d in differences.items()),
        "max_abs_value": max(float(t.abs().max()) for t in theirs.values()),
        "rel_norm_diff": float(
            sum((ours[k] - theirs[k]).pow(2).sum() for k in theirs).sqrt()
            / max(float(sum(t.pow(2).sum() for t in theirs.values()).sqrt()), 1e-30)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized model, 2 edits, few steps")
    parser.add_argument("--edits", type=int, default=16)
    parser.add_argument("--heads_per_edit", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="rounds of both sides (default 3; 1 with --small)")
    args = parser.parse_args()
    shape, edits = (SMALL, 2) if args.small else (CPU, args.edits)
    steps = args.steps or (3 if args.small else 20)
    args.rounds = args.rounds or (1 if args.small else 3)
    root = tempfile.mkdtemp(prefix="locedit-bench-multi-")
    common = [
        "--model_name_or_path",
        model_dir(shape, root),
        "--dataset",
        "synthetic:120",
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1.0e-2",
        "--max_grad_norm",
        "1.0",
        "--heads",
        f"random:{args.heads_per_edit}",
        "--seed",
        "0",
    ]
    os.environ["TQDM_DISABLE"] = "1"

    # One untimed run first: the process's one-time costs (lazy imports, first calls) fall on neither side.
    run([*common, "--max_steps", "1", "--output_dir", os.path.join(root, "warm-up")])
    multi_times, separate_times, worst = [], [], 0.0
    for index in range(args.rounds):

        def one_run(index=index) -> float:
            multi_dir = os.path.join(root, f"multi-{index}")
            return timed(lambda: run([*common, "--heads_draws", str(edits), "--output_dir", multi_dir]))[1]

        def separate_runs(index=index) -> float:
            seconds = 0.0
            for seed in range(edits):
                out = os.path.join(root, f"separate-{index}-{seed}")
                flags = [*common, "--heads_seed", str(seed), "--output_dir", out]
                seconds += timed(lambda flags=flags: run(flags))[1]
            return seconds

        # Interleaved, the order alternating between rounds.
        if index % 2 == 0:
            multi_times.append(one_run())
            separate_times.append(separate_runs())
        else:
            separate_times.append(separate_runs())
            multi_times.append(one_run())
        edit_dirs = expand_run_dirs([os.path.join(root, f"multi-{index}")])  # the multi-edit run lists its edits
        for seed in range(edits):
            difference = edit_difference(edit_dirs[seed], os.path.join(root, f"separate-{index}-{seed}"))
            worst = max(worst, difference["max_abs_diff"])
    multi_time, separate_time = statistics.median(multi_times), statistics.median(separate_times)
    speedups = [s / m for s, m in zip(separate_times, multi_times, strict=True)]
    print(f"model: {shape.describe()}, {edits} edits of {args.heads_per_edit} random heads, {steps} steps")
    print(f"rounds: {args.rounds} (medians; each round one run of {edits} edits and {edits} separate runs)")
    print(f"{edits} edits in one run   : {multi_time:8.2f} s (includes loading the model once)")
    print(f"{edits} separate runs      : {separate_time:8.2f} s")
    print(
        f"speed-up                 : {statistics.median(speedups):8.2f}x (per round: "
        + ", ".join(f"{x:.2f}x" for x in speedups)
        + ")"
    )
    print(
        f"one run of {edits} edits takes {multi_time / (separate_time / edits):.2f}x the time of one single-edit run"
    )
    print(f"largest parameter difference, one run vs separate runs: {worst:.2e}")
    if worst > 1e-4 or not torch.isfinite(torch.tensor(worst)):
        raise SystemExit("the edits trained in one run differ from their separate runs")


if __name__ == "__main__":
    main()
