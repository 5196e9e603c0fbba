"""What tracking costs a training step: the same edit trained with report_to none, trackio and W&B (offline).

Each run logs at every step (logging_steps 1, the most a recipe logs: the CPU recipes log every 5-10 steps), so the
figure is an upper bound of the share of a step that logging takes. A step is timed from the first step's start to
the last step's log (the Trainer logs after its step-end callbacks, so per-step timers would miss it), so the
trackers' start and finish, once per run, are left out. Rounds alternate the three; medians.

    python benchmarks/tracking.py                 # the CPU-sized model, 40 steps, 3 rounds
    python benchmarks/tracking.py --small         # CI-sized
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from common import CPU, SMALL, load, model_dir, preference_data, training_args
from transformers import TrainerCallback

from locedit import AttentionLayout, HeadEditConfig, resolve_heads
from locedit.training import LocEditTrainer

TRACKERS = ("none", "trackio", "wandb")


class LoggedSteps(TrainerCallback):
    """The time from the first step's start to the last logged step (after the trackers' own on_log)."""

    def __init__(self):
        self.start = self.end = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}):
            self.end = time.perf_counter()


def seconds_per_step(path: str, pairs, report_to: str, steps: int) -> float:
    model, tokenizer = load(path)
    layout = AttentionLayout.from_model(model)
    output_dir = tempfile.mkdtemp(prefix="locedit-bench-tracking-")
    settings = dict(logging_steps=1, report_to=report_to, run_name=os.path.basename(output_dir), project="bench")
    clock = LoggedSteps()
    trainer = LocEditTrainer(
        model=model,
        args=training_args(output_dir, steps, **settings),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=HeadEditConfig.for_heads(layout, resolve_heads("random:4", layout, seed=0)),
        callbacks=[clock],
    )
    trainer.train()
    trainer.close_pair_scorer()
    if report_to == "wandb":
        import wandb

        wandb.finish()
    return (clock.end - clock.start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized model, few steps, one round")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 40; 5 with --small)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the three (default 3; 1 with --small)")
    args = parser.parse_args()
    shape = SMALL if args.small else CPU
    steps = args.steps or (5 if args.small else 40)
    rounds = args.rounds or (1 if args.small else 3)
    scratch = tempfile.mkdtemp(prefix="locedit-bench-trackers-")
    # Both trackers write under the scratch directory: nothing reaches the user's dashboards or W&B account.
    os.environ["TRACKIO_DIR"] = os.path.join(scratch, "trackio")
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=scratch, WANDB_SILENT="true")
    path, pairs = model_dir(shape), preference_data()

    print(f"model: {shape.describe()}, random:4 edit, batch 8, {steps} steps logged at every step, {rounds} rounds")
    times: dict[str, list[float]] = {tracker: [] for tracker in TRACKERS}
    seconds_per_step(path, pairs, "none", 2)  # untimed: the first run pays for imports and caches
    for round_index in range(rounds):
        order = TRACKERS if round_index % 2 == 0 else TRACKERS[::-1]
        for tracker in order:
            times[tracker].append(seconds_per_step(path, pairs, tracker, steps))
    print("seconds per step, by round: " + "; ".join(f"{t} {[round(x, 3) for x in times[t]]}" for t in TRACKERS))
    base = statistics.median(times["none"])
    print(f"report_to none   : {1000 * base:7.1f} ms/step")
    for tracker in TRACKERS[1:]:
        median = statistics.median(times[tracker])
        share = (median - base) / median
        ratio = f"{median / base:.2f}x; logging {share:+.0%} of a step"
        print(f"report_to {tracker:<7}: {1000 * median:7.1f} ms/step ({ratio})")


if __name__ == "__main__":
    main()
