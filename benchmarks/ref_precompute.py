"""Reference log-probs precomputed once (locedit's default) against computed at every step (a second forward pass
with the edit disabled). Both include the precompute pass, so the ratio is that of the whole training.

    python benchmarks/ref_precompute.py
    python benchmarks/ref_precompute.py --small
"""

from __future__ import annotations

import argparse
import tempfile

from common import CPU, SMALL, load, model_dir, preference_data, timed, training_args

from locedit import AttentionLayout, HeadEditConfig, resolve_heads
from locedit.training import LocEditTrainer


def train_time(path: str, precompute: bool, steps: int) -> float:
    model, tokenizer = load(path)
    layout = AttentionLayout.from_model(model)
    data = preference_data()

    def build_and_train():
        trainer = LocEditTrainer(
            model=model,
            args=training_args(tempfile.mkdtemp(), steps, precompute_ref_log_probs=precompute),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=HeadEditConfig.for_heads(layout, resolve_heads("random:4", layout)),
        )
        trainer.train()

    return timed(build_and_train)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    shape = SMALL if args.small else CPU
    # Two epochs of 120 synthetic questions (~110 steps of batch 8), as a run would do.
    steps = args.steps or (4 if args.small else 110)
    path = model_dir(shape)
    per_step = train_time(path, precompute=False, steps=steps)
    precomputed = train_time(path, precompute=True, steps=steps)
    print(f"model: {shape.describe()}, {steps} steps of batch 8")
    print(f"reference computed each step : {per_step:8.2f} s")
    print(f"reference precomputed once   : {precomputed:8.2f} s")
    print(f"speed-up                     : {per_step / precomputed:8.2f}x")


if __name__ == "__main__":
    main()
