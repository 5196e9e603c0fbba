"""Step time of the head-masked edit against plain PEFT LoRA rank 1 on the same output projections, in the same
trainer (TRL's DPOTrainer with IPO). Goal: the edit at most 5% slower.

    python benchmarks/edit_vs_lora.py            # 4-layer Llama, hidden 256, on this machine
    python benchmarks/edit_vs_lora.py --small    # CI-sized
"""

from __future__ import annotations

import argparse
import tempfile

from common import CPU, SMALL, StepTimer, load, model_dir, preference_data, training_args
from peft import LoraConfig
from trl import DPOTrainer

from locedit import AttentionLayout, HeadEditConfig, resolve_heads


def step_time(path: str, peft_config, steps: int) -> float:
    model, tokenizer = load(path)
    timer = StepTimer()
    trainer = DPOTrainer(
        model=model,
        args=training_args(tempfile.mkdtemp(), steps, train_sampling_strategy="random"),  # TRL's own trainer
        train_dataset=preference_data(),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )
    trainer.train()
    return timer.median()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized model and few steps")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    shape = SMALL if args.small else CPU
    steps = args.steps or (4 if args.small else 30)
    path = model_dir(shape)

    model, _ = load(path)
    layout = AttentionLayout.from_model(model)
    projections = layout.projection_names()
    edit = HeadEditConfig.for_heads(layout, resolve_heads("all", layout))
    lora = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=projections, init_lora_weights=True)
    # Alternate the two so drift in machine load hits both alike.
    edit_times, lora_times = [], []
    for _ in range(1 if args.small else 2):
        edit_times.append(step_time(path, edit, steps))
        lora_times.append(step_time(path, lora, steps))
    edit_time, lora_time = min(edit_times), min(lora_times)
    print(f"model: {shape.describe()}, all {layout.num_layers * layout.num_heads} heads, {steps} steps of batch 8")
    print(f"head-masked rank-1 edit : {edit_time * 1000:8.2f} ms/step")
    print(f"PEFT LoRA rank 1        : {lora_time * 1000:8.2f} ms/step")
    print(f"ratio edit / LoRA       : {edit_time / lora_time:8.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
