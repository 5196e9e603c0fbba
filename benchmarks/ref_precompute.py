"""Reference log-probs precomputed once (locedit's default) against computed at every step (a second forward pass
with the edit disabled). Both include the precompute pass, so the ratio is that of the whole training. The same
batches and reference values either way, so both train the same edit: the script checks that they do.

    python benchmarks/ref_precompute.py
    python benchmarks/ref_precompute.py --small
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from common import CPU, SMALL, load, model_dir, preference_data, timed, training_args

from locedit import AttentionLayout, HeadEditConfig, resolve_heads
from locedit.training import LocEditTrainer

# The largest difference allowed between the two edits (as multi_edit.py bounds its own): float32 rounding only.
TOLERANCE = 1e-4


def train_time(path: str, precompute: bool, steps: int, data) -> tuple[float, dict]:
    """(seconds of building the trainer and training, the trained parameters)."""
    model, tokenizer = load(path)
    layout = AttentionLayout.from_model(model)

    def build_and_train():
        trainer = LocEditTrainer(
            model=model,
            args=training_args(tempfile.mkdtemp(), steps, precompute_ref_log_probs=precompute),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=HeadEditConfig.for_heads(layout, resolve_heads("random:4", layout)),
        )
        trainer.train()
        return trainer

    trainer, seconds = timed(build_and_train)
    return seconds, {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    shape = SMALL if args.small else CPU
    # Two epochs of 120 synthetic questions (~110 steps of batch 8), as a run would do; --small: two epochs of 24
    # (94 pairs, 24 steps), so that each precomputed value is read again as in a run (4 steps of the 525 pairs read
    # none twice and timed a precompute pass over pairs never trained on: 0.45x).
    data = preference_data(24 if args.small else 120)
    steps = args.steps or (24 if args.small else 110)
    path = model_dir(shape)
    per_step, per_step_edit = train_time(path, precompute=False, steps=steps, data=data)
    precomputed, precomputed_edit = train_time(path, precompute=True, steps=steps, data=data)
    print(f"model: {shape.describe()}, {steps} steps of batch 8")
    print(f"reference computed each step : {per_step:8.2f} s")
    print(f"reference precomputed once   : {precomputed:8.2f} s")
    print(f"speed-up                     : {per_step / precomputed:8.2f}x")
    worst = max(float((precomputed_edit[k] - per_step_edit[k]).abs().max()) for k in per_step_edit)
    print(f"largest edit difference      : {worst:.2e}")
    if not worst <= TOLERANCE:  # NaN fails too
        sys.exit(f"ref_precompute.py: the edits trained with either reference differ by {worst:.2e} > {TOLERANCE}")


if __name__ == "__main__":
    main()
