"""Training a recipe's edits: one edit with LocEditTrainer, or many in one pass with the EditBank."""

from __future__ import annotations

import os

from ..core.files import staged_directory
from ..core.recipe import Recipe
from ..plan import RunPlan
from ..rundir import write_metrics
from .multi import train_multi_edit
from .trainer import LocEditTrainer, train_and_validate, training_inputs


def train_edits(recipe: Recipe, plan: RunPlan, model, tokenizer, **share) -> dict:
    """Train the plan's edit (or edits) on the loaded model and write the run directory; returns the metrics.
    `share` (`edits`, `run_dir`): some edits of a multi-edit plan, as `train_multi_edit` takes them."""
    if plan.spec.is_multi_edit:
        return train_multi_edit(recipe, plan, model, tokenizer, **share)
    trainer = LocEditTrainer(
        model=model,
        **training_inputs(plan, recipe.training),
        processing_class=tokenizer,
        peft_config=plan.edit_config,
    )
    metrics = {**train_and_validate(trainer, plan.output_dir), "data_rows_skipped": plan.data_rows_skipped}
    # The edit and the trainer's state staged, then moved into place: a write that fails midway (a full disk) cuts
    # no file of the run directory short, and the same command resumes from the last checkpoint.
    with staged_directory(plan.output_dir, writes=trainer.is_world_process_zero()) as staging:
        trainer.save_model(staging)
        if trainer.is_world_process_zero():
            trainer.state.save_to_json(os.path.join(staging, "trainer_state.json"))  # as Trainer.save_state does
    if trainer.is_world_process_zero():
        write_metrics(plan.output_dir, metrics)  # last: marks the run finished
    return metrics
