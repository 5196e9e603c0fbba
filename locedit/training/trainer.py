"""IPO training of an edit: TRL's DPOTrainer, plus logging of where the edit lives.

The reference policy is the same model with the edit disabled (TRL does this when it is given `peft_config`), so
there is no second copy of the model and no copy of the adapter; with b = 0 at the start the edited model equals
the reference, so the first IPO loss is exactly 1 / (4 tau^2).
"""

from __future__ import annotations

import os
import re

from transformers import Trainer
from trl import DPOTrainer

from ..edit import HeadEditConfig, edit_head_norms, edit_norms
from .pair_logps import PairScoringMixin
from .reference import CachedReferenceMixin
from .tracking import group_tracked_runs


class LocEditTrainer(PairScoringMixin, CachedReferenceMixin, DPOTrainer):
    """DPOTrainer for a locedit edit. Takes the same arguments; `peft_config` must be a HeadEditConfig."""

    def __init__(self, *args, peft_config: HeadEditConfig, **kwargs):
        if not isinstance(peft_config, HeadEditConfig):
            raise TypeError(f"LocEditTrainer needs a HeadEditConfig, got {type(peft_config).__name__}")
        require_ipo(kwargs.get("args"))
        self.pair_scorer_first_layer = min(peft_config.edit_layers.values(), default=0)
        super().__init__(*args, peft_config=peft_config, **kwargs)
        self._install_pair_scorer()  # when no reference precompute installed it
        group_tracked_runs(self)  # the run in its head family's group on trackio and W&B

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (they carry "loss") also get the per-layer norms of a and of m * b, and per edited head.
        if "loss" in logs:
            model = self.accelerator.unwrap_model(self.model)
            logs = {**logs, **edit_norms(model), **edit_head_norms(model)}
        super().log(logs, start_time)


def require_ipo(args) -> None:
    loss_type = getattr(args, "loss_type", ["ipo"])
    if "ipo" not in ([loss_type] if isinstance(loss_type, str) else list(loss_type)):
        raise ValueError("locedit trains edits with the IPO objective; set loss_type: ipo")


def pairs_per_step(args) -> int:
    """Training pairs one optimizer step consumes, over all processes."""
    from .. import processes

    return args.per_device_train_batch_size * args.gradient_accumulation_steps * processes.state().num_processes


def training_inputs(plan, args) -> dict:
    """The trainer's `args`, `train_dataset` and `eval_dataset` (validation): the pairs' prompt, chosen and rejected
    columns, only as many as the run will use, so that no reference log-prob is computed for a pair the run never
    sees.

    - `pair_draw: question` (the default): the training pairs are laid out once, epoch by epoch over the training
      questions, each question once per epoch with a fresh pair of it (`locedit.data.draw_by_question`, seeded by
      data_seed or seed), and the run makes exactly one pass over them in that order: `num_train_epochs` epochs of
      questions, or the first max_steps x pairs-per-step of them with `max_steps`. The returned args are a copy with
      max_steps set to that pass and train_sampling_strategy 'sequential' (a trainer given its own dataset keeps the
      Trainer's shuffle).
    - `pair_draw: pair`: with `max_steps` shorter than an epoch, the run trains on a seeded draw of max_steps x
      pairs-per-step pairs (what a shuffled epoch would give it), else on epochs of all pairs.
    - The validation pairs are used only when `eval_strategy` is not 'no' (the pass at the end of training follows
      it too), and at most `max_eval_pairs` of them (a seeded draw).
    """
    import copy
    import math

    from .. import processes
    from ..data import draw_by_question

    columns = ["prompt", "chosen", "rejected"]
    every = plan.splits["train"]
    train = every.select_columns(columns)
    per_step = pairs_per_step(args)
    say = print if processes.state().is_main_process else (lambda *a, **k: None)
    if args.pair_draw == "question":
        question_ids = every["question_id"]
        questions = len(set(question_ids))
        rows = args.max_steps * per_step if args.max_steps > 0 else max(1, round(args.num_train_epochs * questions))
        seed = args.data_seed if args.data_seed is not None else args.seed
        train = train.select(draw_by_question(question_ids, rows, seed))
        args = copy.copy(args)  # the recipe's own args stay as the user wrote them
        args.max_steps = math.ceil(rows / per_step)  # one pass over the laid-out epochs, in their order
        if args.train_sampling_strategy == "random":
            args.train_sampling_strategy = "sequential"  # transformers' own SequentialSampler
        say(
            f"locedit: training on {rows} pairs, {rows / questions:.3g} epoch(s) of the {questions} training "
            f"questions ({len(every)} pairs): every question once per epoch, a fresh pair of it each epoch (seed "
            f"{seed}); {args.max_steps} steps of {per_step}",
            flush=True,
        )
    else:
        used = args.max_steps * per_step if args.max_steps > 0 else len(train)
        if used < len(train):
            train = train.shuffle(seed=args.seed).select(range(used))
            say(
                f"locedit: max_steps {args.max_steps} x {per_step} pairs per step: training on {used} of the "
                f"{len(every)} training pairs (a draw seeded by seed {args.seed})",
                flush=True,
            )
    validation = plan.splits["validation"].select_columns(columns)
    if len(validation) == 0 or _strategy(args.eval_strategy) == "no":
        return {"args": args, "train_dataset": train, "eval_dataset": None}
    if args.max_eval_pairs is not None and len(validation) > args.max_eval_pairs:
        validation = validation.shuffle(seed=args.seed).select(range(args.max_eval_pairs))
        say(f"locedit: validating on {args.max_eval_pairs} of the {len(plan.splits['validation'])} pairs", flush=True)
    return {"args": args, "train_dataset": train, "eval_dataset": validation}


def _strategy(value) -> str:
    return str(getattr(value, "value", value))


def speed_line(metrics: dict) -> str | None:
    """Seconds per step and tokens per second of a finished training (the Trainer's own measures)."""
    if not metrics.get("train_seconds_per_step"):
        return None
    line = f"locedit: training took {metrics['train_runtime']:.1f} s, {metrics['train_seconds_per_step']:.2f} s/step"
    if metrics.get("train_tokens_per_second"):
        line += f", {metrics['train_tokens_per_second']:.0f} tokens/s (not counting padding)"
    return line


def train_and_validate(trainer, output_dir: str) -> dict:
    """Train (resuming from the last checkpoint in output_dir, if any), then score the validation pairs. The frozen
    prefix that spilled to disk goes with the run, whatever ends it."""
    try:
        return _train_and_validate(trainer, output_dir)
    finally:
        trainer.close_pair_scorer()


def _train_and_validate(trainer, output_dir: str) -> dict:
    from .. import processes

    is_main = processes.state().is_main_process
    last_checkpoint = last_complete_checkpoint(output_dir, remove_incomplete=is_main)
    if last_checkpoint and is_main:
        print(f"locedit: resuming from {last_checkpoint}", flush=True)
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    metrics = {f"train_{k}" if not k.startswith("train_") else k: v for k, v in train_result.metrics.items()}
    if metrics.get("train_steps_per_second"):
        metrics["train_seconds_per_step"] = 1 / metrics["train_steps_per_second"]
    if metrics.get("train_num_input_tokens_seen") and metrics.get("train_runtime"):
        metrics["train_tokens_per_second"] = metrics["train_num_input_tokens_seen"] / metrics["train_runtime"]
    if is_main and speed_line(metrics):
        print(speed_line(metrics), flush=True)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    metrics.update(trainer.pair_scoring_metrics())
    # The IPO loss the edit reached on the pairs it trained on (the logged loss is one batch's, and noisy), on at
    # most max_eval_pairs of them (a seeded draw of the distinct pairs, said). Trainer.evaluate itself: the pairs are
    # prepared and scored already, and DPOTrainer.evaluate refuses a dataset after training unless the reference is
    # a PEFT adapter's (a multi-edit bank's is not).
    pairs, distinct = scored_training_pairs(trainer.train_dataset, trainer.args.max_eval_pairs, trainer.args.seed)
    scored = Trainer.evaluate(trainer, pairs, metric_key_prefix="train_pairs")
    # DPOTrainer logs its own measures of any evaluation as eval_*: here they are the training pairs'.
    metrics.update({re.sub(r"^eval_", "train_pairs_", key): value for key, value in scored.items()})
    metrics["train_pairs_scored"] = len(pairs)
    start = 1 / (4 * trainer.args.beta**2)  # IPO's loss of the unedited model (b = 0), exactly
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    reason = divergence(logged, metrics.get("train_pairs_loss"), start)
    metrics.update(train_loss_start=start, train_diverged=reason is not None, train_divergence=reason)
    if is_main:
        print(
            f"locedit: IPO loss on {len(pairs)} of the {distinct} distinct training pairs: "
            f"{metrics.get('train_pairs_loss', float('nan')):.4g} (it starts at 1/(4 tau^2) = {start:.4g})",
            flush=True,
        )
        if reason is not None:
            print(f"locedit: warning: the edit diverged: {reason}; it is broken (its evaluation says so)", flush=True)
    return metrics


# A training whose logged loss rose this many times in a row at its end is diverging (iid noise does so at random
# once in 6! = 720 windows).
RISING_LOGS = 5


def divergence(logged: list[float], reached: float | None, start: float) -> str | None:
    """Why a training diverged, or None: the IPO loss it reached on its training pairs (else its last logged losses:
    the mean of the last quarter) ends above where it started, 1/(4 tau^2); or its logged loss rose at each of its
    last RISING_LOGS logs."""
    tail = logged[-max(1, len(logged) // 4) :]
    end = reached if reached is not None else (sum(tail) / len(tail) if tail else None)
    if end is not None and end > start:
        return f"its IPO loss ended at {end:.4g}, above its start {start:.4g}"
    last = logged[-(RISING_LOGS + 1) :]
    if len(last) == RISING_LOGS + 1 and all(b > a for a, b in zip(last, last[1:], strict=False)):
        return f"its logged loss rose at each of its last {RISING_LOGS} logs ({', '.join(f'{v:.3g}' for v in last)})"
    return None


def scored_training_pairs(dataset, cap: int | None, seed: int):
    """The distinct pairs of a (tokenized) training set, at most `cap` of them (a seeded draw), and how many distinct
    pairs it has: a run over epochs of questions holds each pair once per epoch it was drawn in."""
    seen, keep = set(), []
    for index, row in enumerate(
        zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ):
        key = tuple(map(tuple, row))
        if key not in seen:
            seen.add(key)
            keep.append(index)
    distinct = len(keep)
    if cap is not None and distinct > cap:
        import random

        keep = sorted(random.Random(f"scored-pairs-{seed}").sample(keep, cap))
    return (dataset if len(keep) == len(dataset) else dataset.select(keep)), distinct


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
