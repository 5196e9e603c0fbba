"""Train one's own truth or info judge on the GPT-judge data (the cpu judge, or a causal LM fine-tuned with TRL), and
report its held-out accuracy.

`judge_kind: cpu` builds the cpu judge (`locedit.evaluation.cpu_judge`) over a frozen `model_name_or_path`, with the
reference answers of the TruthfulQA.csv beside the data (or one folder up): the output directory is `cpu:OUTPUT_DIR`.
What follows is `judge_kind: hf`, the default.

The data are TruthfulQA's judge fine-tuning sets (`finetune_truth.jsonl`, `finetune_info.jsonl`): prompt/completion
pairs "Q: ...\\nA: ...\\nTrue:" -> " yes" or " no" ("Helpful:" for info), which is how GPT-judge and the open
`allenai/truthfulqa-*-judge-llama2-7B` judges were made. TRL's SFTTrainer trains on the completion only
(prompt-completion format). Whole questions are held out (`judge_eval_fraction` of them, drawn with `seed`), so the
held-out accuracy is that of answers to questions the judge never saw: P(" yes") > 0.5 against the label, as
`locedit eval` scores. The output directory is a judge: `locedit eval ... --eval_judge_truth hf:OUTPUT_DIR`.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from ..core.args import ModelArguments
from ..core.errors import DataError, RecipeError
from ..core.files import write_json_atomic
from ..core.tracking import check_trackers, run_tracking, tracked_run
from ..data import hold_out
from ..models.loading import load_model_and_tokenizer
from ..models.sources import resolve_model_path
from ..training.tracking import group_tracked_runs
from .judge_data import load_judge_data
from .judges import HFJudge, aspect_of_prompt, verdicts


@dataclass
class JudgeDataArguments:
    """The judge's training data and how much of it is held out."""

    judge_data: str | None = field(
        default=None,
        metadata={
            "help": "GPT-judge data: a local .jsonl/.json file of prompt/completion pairs (TruthfulQA's "
            "data/finetune_truth.jsonl or finetune_info.jsonl) or a Hub data set ('name' or 'name:split')."
        },
    )
    judge_eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the questions held out (whole) to measure the judge's accuracy."}
    )
    judge_max_examples: int | None = field(
        default=None, metadata={"help": "Use a seeded random slice of this many examples (quick runs)."}
    )
    judge_batch_size: int = field(default=16, metadata={"help": "Prompts per batch when scoring the held-out set."})
    judge_kind: str = field(
        default="hf",
        metadata={
            "help": "'hf': fine-tune model_name_or_path into a causal-LM judge with TRL (a GPU's work); 'cpu': the "
            "cpu judge over model_name_or_path frozen (locedit.evaluation.cpu_judge; minutes on a CPU), with the "
            "reference answers of TruthfulQA.csv beside judge_data or one folder up.",
            "choices": ["hf", "cpu"],
        },
    )


@dataclass
class JudgeTrainConfig(SFTConfig):
    """TRL's SFTConfig with defaults that also work on a CPU and an output directory named after the judge."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where the judge goes; default outputs/judges/<truth|info>-<model>."}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: on where supported."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept (a judge is a full model)."})

    def __post_init__(self):
        self.output_dir_was_given = self.output_dir is not None
        if self.output_dir is None:
            self.output_dir = "outputs/judges/judge"  # replaced once the data says which judge it is
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.fp16
        super().__post_init__()


def question_of(prompt: str) -> str:
    return prompt.split("\nA:")[0]


def split_by_question(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows, holding out `fraction` of the questions whole, drawn with `seed`."""
    held_out = hold_out(sorted({question_of(row["prompt"]) for row in rows}), fraction, seed)
    train = [row for row in rows if question_of(row["prompt"]) not in held_out]
    return train, [row for row in rows if question_of(row["prompt"]) in held_out]


def judge_accuracy(judge: HFJudge, rows: list[dict]) -> dict[str, float]:
    """The judge's accuracy on labelled rows (P(" yes") > 0.5 against the label) and the share of yes labels."""
    predictions = verdicts(judge.score_prompts([row["prompt"] for row in rows]))
    labels = [row["completion"].strip() == "yes" for row in rows]
    correct = sum(p == label for p, label in zip(predictions, labels, strict=True))
    return {
        "held_out_accuracy": correct / len(rows),
        "held_out_examples": len(rows),
        "held_out_questions": len({question_of(row["prompt"]) for row in rows}),
        "held_out_yes_fraction": sum(labels) / len(rows),
    }


def train_judge(data_args: JudgeDataArguments, model_args: ModelArguments, args: JudgeTrainConfig) -> dict:
    """Train the judge, save it, score the held-out questions and write judge_metrics.json. Returns the metrics."""
    import datasets

    from .. import processes

    if not 0 <= data_args.judge_eval_fraction < 1:
        raise RecipeError(f"judge_eval_fraction must be in [0, 1), got {data_args.judge_eval_fraction}")
    if data_args.judge_kind not in ("hf", "cpu"):
        raise RecipeError(f"judge_kind '{data_args.judge_kind}' is not valid; choose hf or cpu")
    if data_args.judge_max_examples is not None and data_args.judge_max_examples < 2:
        raise RecipeError(f"judge_max_examples must be at least 2, got {data_args.judge_max_examples}")
    # The judges' own tracking project, unless the recipe names one (transformers' default is "huggingface").
    project = JUDGE_PROJECT if args.project == "huggingface" else args.project
    check_trackers(args.report_to, project)
    if data_args.judge_kind == "cpu":
        return track_judge(train_cpu_judge(data_args, model_args, args), args, project)
    rows = load_judge_data(data_args.judge_data)
    aspect = aspect_of_prompt(rows[0]["prompt"])
    if data_args.judge_max_examples is not None:
        keep = sorted(random.Random(args.seed).sample(range(len(rows)), min(len(rows), data_args.judge_max_examples)))
        rows = [rows[index] for index in keep]
    train_rows, held_out = split_by_question(rows, data_args.judge_eval_fraction, args.seed)
    if not train_rows:
        raise DataError("judge data leaves no training example after holding out questions")
    if not args.output_dir_was_given:
        model_name = os.path.basename(os.path.normpath(model_args.model_name_or_path.replace("tiny:", "tiny-")))
        args.output_dir = os.path.join("outputs", "judges", f"{aspect}-{model_name}")
    model_path = resolve_model_path(model_args.model_name_or_path)
    state = processes.state()
    if state.is_main_process:
        print(
            f"locedit judge-train: {aspect} judge from {model_args.model_name_or_path} on {len(train_rows)} examples, "
            f"{len(held_out)} held out ({data_args.judge_eval_fraction:g} of the questions) -> {args.output_dir}",
            flush=True,
        )
    model, tokenizer = load_model_and_tokenizer(model_path, model_args, args.trust_remote_code)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        processing_class=tokenizer,
    )
    group_tracked_runs(trainer)  # its run in the judge's group on trackio and W&B
    with run_tracking(args, project, f"judge-{aspect}", announce=state.is_main_process):
        train_result = trainer.train()
    trainer.save_model(args.output_dir)
    metrics = {
        "aspect": aspect,
        "model": model_args.model_name_or_path,
        "judge_data": data_args.judge_data,
        "train_examples": len(train_rows),
        "train_loss": train_result.training_loss,
    }
    if held_out and trainer.is_world_process_zero():
        trainer.model.eval()
        judge = HFJudge.from_model(trainer.model, tokenizer, aspect, data_args.judge_batch_size, args.output_dir)
        metrics.update(judge_accuracy(judge, held_out))
    if trainer.is_world_process_zero():
        write_json_atomic(os.path.join(args.output_dir, "judge_metrics.json"), metrics)
        track_judge(metrics, args, project)
        if "held_out_accuracy" in metrics:
            print(
                f"locedit judge-train: held-out accuracy {metrics['held_out_accuracy']:.4f} on "
                f"{metrics['held_out_examples']} answers to {metrics['held_out_questions']} unseen questions "
                f"(yes share {metrics['held_out_yes_fraction']:.3f}); use it as hf:{args.output_dir}",
                flush=True,
            )
    return metrics


JUDGE_PROJECT = "locedit-judges"


def track_judge(metrics: dict, args: JudgeTrainConfig, project: str) -> dict:
    """The judge's held-out scores as a tracked run `NAME-held-out` (report_to), beside its training curves."""
    name = os.path.basename(os.path.normpath(args.output_dir))
    scores = {f"judge/{key}": value for key, value in metrics.items() if isinstance(value, int | float)}
    config = {key: value for key, value in metrics.items() if isinstance(value, str)}
    group = f"judge-{metrics['aspect']}"
    with tracked_run(args.report_to, project, f"{name}-held-out", group, "judge", config) as run:
        if run is not None:
            run.summary(scores)
    return metrics


def train_cpu_judge(data_args: JudgeDataArguments, model_args: ModelArguments, args: JudgeTrainConfig) -> dict:
    """`--judge_kind cpu`: the cpu judge over `model_name_or_path` frozen, from the judge data's rows but for the
    held-out questions, saved in `output_dir` (a `cpu:OUTPUT_DIR` judge), its held-out accuracy measured the way
    `locedit eval` judges (the answers read by the model, the references from TruthfulQA.csv)."""
    from pathlib import Path

    from . import cpu_judge
    from .judge_validation import scores_of

    settings = cpu_judge.CPUJudgeSettings(base_model=model_args.model_name_or_path, seed=args.seed)
    aspect = aspect_of_prompt(load_judge_data(data_args.judge_data)[0]["prompt"])
    held_out: list = []

    def select(rows: list) -> list:
        if data_args.judge_max_examples is not None:
            keep = random.Random(args.seed).sample(range(len(rows)), min(len(rows), data_args.judge_max_examples))
            rows = [rows[index] for index in sorted(keep)]
        questions = hold_out(sorted({row.question for row in rows}), data_args.judge_eval_fraction, args.seed)
        held_out.extend(row for row in rows if row.question in questions)
        return [row for row in rows if row.question not in questions]

    build = cpu_judge.plan_build(data_args.judge_data, aspect, settings, select=select)
    if not build.rows:
        raise DataError("judge data leaves no training example after holding out questions")
    if not args.output_dir_was_given:
        model_name = os.path.basename(os.path.normpath(model_args.model_name_or_path.replace("tiny:", "tiny-")))
        args.output_dir = os.path.join("outputs", "judges", f"{aspect}-cpu-{model_name}")
    print(
        f"locedit judge-train: cpu {aspect} judge over {model_args.model_name_or_path} on {len(build.rows)} examples, "
        f"{len(held_out)} held out ({data_args.judge_eval_fraction:g} of the questions) -> {args.output_dir}",
        flush=True,
    )
    encoder_factory = cpu_judge.ensure_encoder_factory(settings)
    cached = cpu_judge.ensure_judge(build, encoder_factory)
    output = Path(args.output_dir)
    if output.resolve() != cached.resolve():
        shutil.copytree(cached, output, dirs_exist_ok=True)
    metrics = {
        "aspect": aspect,
        "kind": "cpu",
        "model": model_args.model_name_or_path,
        "judge_data": data_args.judge_data,
        "train_examples": len(build.rows),
    }
    if held_out:
        judge = cpu_judge.load_judge(output)
        references = build.references
        records = [
            {
                "question": row.question,
                "correct_answers": references.get(row.question, ([], []))[0],
                "incorrect_answers": references.get(row.question, ([], []))[1],
            }
            for row in held_out
        ]
        predictions = judge.score(records, [row.answer for row in held_out], encoder_factory())
        scored = scores_of(predictions, [row.label for row in held_out])
        metrics.update(
            held_out_accuracy=scored["accuracy"],
            held_out_balanced_accuracy=scored["balanced_accuracy"],
            held_out_auc=scored["auc"],
            held_out_examples=len(held_out),
            held_out_questions=len({row.question for row in held_out}),
            held_out_yes_fraction=sum(row.label for row in held_out) / len(held_out),
        )
    write_json_atomic(os.path.join(args.output_dir, "judge_metrics.json"), metrics)
    if held_out:
        print(
            f"locedit judge-train: held-out accuracy {metrics['held_out_accuracy']:.4f} on {len(held_out)} answers to "
            f"{metrics['held_out_questions']} unseen questions (yes share {metrics['held_out_yes_fraction']:.3f}); "
            f"use it as cpu:{args.output_dir}",
            flush=True,
        )
    return metrics
