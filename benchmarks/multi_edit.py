"""K edits trained in one run against K separate runs, with a check that the results are equal.

Goal on a GPU: 16 head sets in at most 3x the time of one run; on 2 CPU cores, still faster than K separate runs.

    python benchmarks/multi_edit.py --edits 16          # 16 random sets of 4 heads
    python benchmarks/multi_edit.py --small             # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from common import CPU, SMALL, model_dir, timed
from safetensors.torch import load_file

from locedit.core.recipe import parse_recipe
from locedit.train import main as train


def run(flags: list[str]) -> dict:
    return train(parse_recipe(["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *flags]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized model, 2 edits, few steps")
    parser.add_argument("--edits", type=int, default=16)
    parser.add_argument("--heads_per_edit", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    shape, edits = (SMALL, 2) if args.small else (CPU, args.edits)
    steps = args.steps or (3 if args.small else 20)
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

    multi_dir = os.path.join(root, "multi")
    _, multi_time = timed(lambda: run([*common, "--heads_draws", str(edits), "--output_dir", multi_dir]))
    edit_dirs = json.loads(Path(multi_dir, "metrics.json").read_text())["edits"]

    separate_time, worst = 0.0, 0.0
    for seed in range(edits):
        out = os.path.join(root, f"separate-{seed}")
        _, seconds = timed(lambda out=out, seed=seed: run([*common, "--heads_seed", str(seed), "--output_dir", out]))
        separate_time += seconds
        ours, theirs = (
            load_file(f"{edit_dirs[seed]}/adapter_model.safetensors"),
            load_file(f"{out}/adapter_model.safetensors"),
        )
        worst = max(worst, *(float((ours[k] - theirs[k]).abs().max()) for k in theirs))
    print(f"model: {shape.describe()}, {edits} edits of {args.heads_per_edit} random heads, {steps} steps")
    print(f"{edits} edits in one run   : {multi_time:8.2f} s (includes loading the model once)")
    print(f"{edits} separate runs      : {separate_time:8.2f} s")
    print(f"speed-up                 : {separate_time / multi_time:8.2f}x")
    print(
        f"one run of {edits} edits takes {multi_time / (separate_time / edits):.2f}x the time of one single-edit run"
    )
    print(f"largest parameter difference, one run vs separate runs: {worst:.2e}")
    if worst > 1e-4 or not torch.isfinite(torch.tensor(worst)):
        raise SystemExit("the edits trained in one run differ from their separate runs")


if __name__ == "__main__":
    main()
