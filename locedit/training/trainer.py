"""IPO training of an edit: TRL's DPOTrainer, plus logging of where the edit lives.

The reference policy is the same model with the edit disabled (TRL does this when it is given `peft_config`), so
there is no second copy of the model and no copy of the adapter; with b = 0 at the start the edited model equals
the reference, so the first IPO loss is exactly 1 / (4 tau^2).
"""

from __future__ import annotations

import os

from trl import DPOTrainer

from ..edit import HeadEditConfig, edit_norms


class LocEditTrainer(DPOTrainer):
    """DPOTrainer for a locedit edit. Takes the same arguments; `peft_config` must be a HeadEditConfig."""

    def __init__(self, *args, peft_config: HeadEditConfig, **kwargs):
        if not isinstance(peft_config, HeadEditConfig):
            raise TypeError(f"LocEditTrainer needs a HeadEditConfig, got {type(peft_config).__name__}")
        require_ipo(kwargs.get("args"))
        super().__init__(*args, peft_config=peft_config, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (they carry "loss") also get the per-layer norms of a and of m * b.
        if "loss" in logs:
            logs = {**logs, **edit_norms(self.accelerator.unwrap_model(self.model))}
        super().log(logs, start_time)


def require_ipo(args) -> None:
    loss_type = getattr(args, "loss_type", ["ipo"])
    if "ipo" not in ([loss_type] if isinstance(loss_type, str) else list(loss_type)):
        raise ValueError("locedit trains edits with the IPO objective; set loss_type: ipo")


def preference_datasets(plan) -> dict:
    """The trainer's train and eval (validation) datasets: the pairs' prompt, chosen and rejected columns."""
    columns = ["prompt", "chosen", "rejected"]
    validation = plan.splits["validation"]
    return {
        "train_dataset": plan.splits["train"].select_columns(columns),
        "eval_dataset": validation.select_columns(columns) if len(validation) else None,
    }


def train_and_validate(trainer, output_dir: str) -> dict:
    """Train (resuming from the last checkpoint in output_dir, if any), then score the validation pairs."""
    from accelerate import PartialState

    is_main = PartialState().is_main_process
    last_checkpoint = last_complete_checkpoint(output_dir, remove_incomplete=is_main)
    if last_checkpoint and is_main:
        print(f"locedit: resuming from {last_checkpoint}", flush=True)
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    metrics = {f"train_{k}" if not k.startswith("train_") else k: v for k, v in train_result.metrics.items()}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics


def last_complete_checkpoint(output_dir: str, remove_incomplete: bool = False) -> str | None:
    """The newest checkpoint in output_dir that was written to the end, else None.

    The Trainer writes a checkpoint's trainer_state.json last, so a checkpoint without a readable one (a run killed
    while writing it, or at the moment its directory was made) is incomplete: it is passed over, said so, and with
    `remove_incomplete` deleted, so that the run resumes from the one before.
    """
    import json
    import re
    import shutil
    import sys

    if not os.path.isdir(output_dir):
        return None
    checkpoints = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            checkpoints.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(checkpoints, reverse=True):
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                json.load(f)
            return path
        except (OSError, ValueError):
            if remove_incomplete:
                print(f"locedit: {path} is incomplete (a run stopped while writing it); removing it", file=sys.stderr)
                shutil.rmtree(path, ignore_errors=True)
    return None
