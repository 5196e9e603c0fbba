"""Running an evaluation: each model's generations, MC1/MC2 and corpus scores, then every judge once, then the
files of each model (`locedit.rundir.write_evaluation`) and, with `report_to: wandb`, a W&B run per model.

Per model:

- greedy generations (batched, left-padded, at most `eval_max_new_tokens` tokens, cut at the next `Q:`) of the
  training prompt template, optionally after ITI's instruction and TruthfulQA's QA primer (`eval_prompt`); a trained
  edit is merged into the weights for generation (unquantised weights), so it costs nothing per token;
- True, Info and True*Info from the truth and info judges (`locedit.evaluation.judges`), overall and per category;
  with the `similarity` truth judge also the mean of each of TruthfulQA's BLEU/ROUGE numbers (`bleu_acc`, ...);
- MC1 and MC2 from the answers' log-probs: MC1 compares the best answer with the incorrect answers, MC2 the correct
  answers with the incorrect ones (TruthfulQA's generation-format data, built into its MC tasks' choices);
- KL(original || edited) of the next-token distribution and the cross-entropy on `eval_corpus` (ITI's 100
  OpenWebText documents cut at 128 tokens by default), the original being the same model with the edit disabled.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import fields

from ..core.args import EvalArguments
from ..core.recipe import Recipe
from ..core.tracking import offline_without_credentials, reports_to_wandb
from ..edit import load_edit
from ..models.loading import load_model_and_tokenizer
from ..rundir import run_lock, write_evaluation
from .judges import Judge, verdicts
from .metrics import mc1, mc2, per_category, summarise
from .plan import EvalPlan, EvalResources, Target, plan_evaluation
from .prompts import build_prompt, close_answer
from .scoring import answer_logprobs, can_merge, corpus_scores, generate_answers, merged
from .similarity import FIELDS as SIMILARITY_FIELDS


def _target_questions(plan: EvalPlan, target: Target) -> list[dict]:
    by_id = plan.questions[target.source]
    return [record for qid in target.question_ids for record in by_id.get(qid, [])]


def evaluate_model(model, tokenizer, questions: list[dict], target: Target, args: EvalArguments, corpus, **kw):
    """Generations, MC1/MC2 and corpus scores of one model (a PEFT model for an edit); no judging."""
    edited = target.run_dir is not None
    prompts = [build_prompt(q["question"], target.prompt_template, args.eval_prompt) for q in questions]
    merge = edited and kw.get("merge", True)
    print(f"locedit eval: {target.name}: generating {len(prompts)} answers", flush=True)
    with merged(model) if merge else contextlib.nullcontext():
        answers = generate_answers(model, tokenizer, prompts, args.eval_max_new_tokens, args.eval_batch_size)
    records = [
        {
            "question_id": int(q["question_id"]),
            "question": q["question"],
            "category": q["category"],
            "answer": answer,
        }
        for q, answer in zip(questions, answers, strict=True)
    ]
    if args.eval_mc:
        # Each distinct answer of a question is scored once: MC1 uses the best answer vs the incorrect ones, MC2 the
        # correct vs the incorrect ones (TruthfulQA's generation data, as its MC tasks build their choices), each
        # with a final period as TruthfulQA and ITI write them.
        choices = [
            list(dict.fromkeys([q["best_answer"], *q["correct_answers"], *q["incorrect_answers"]])) for q in questions
        ]
        pairs = [
            (prompt, target.completion_template.format(answer=close_answer(answer)))
            for prompt, answers in zip(prompts, choices, strict=True)
            for answer in answers
        ]
        logprobs = iter(answer_logprobs(model, tokenizer, pairs, args.eval_batch_size))
        for q, record, answers in zip(questions, records, choices, strict=True):
            score = {answer: next(logprobs) for answer in answers}
            incorrect = [score[a] for a in q["incorrect_answers"]]
            record["mc1"] = mc1(score[q["best_answer"]], incorrect)
            record["mc2"] = mc2([score[a] for a in q["correct_answers"]], incorrect)
    scores = {}
    if corpus is not None:
        scores = corpus_scores(
            model, tokenizer, corpus, args.eval_corpus_max_tokens, args.eval_batch_size, edited=edited
        )
    return records, scores


def judge_all(
    judges: dict[str, Judge | None], results: list[tuple[Target, list[dict], dict]], questions: list[list[dict]]
) -> None:
    """Score every model's answers with each judge in turn: each judge is loaded once, for all models.
    `questions[i]` are the question records (with the reference answers) of `results[i]`'s records, in order."""
    for aspect, judge in judges.items():
        if judge is None:
            continue
        print(f"locedit eval: judging {aspect} with {judge.spec}", flush=True)
        judge.load()
        try:
            asked = [q for records in questions for q in records]
            answers = [r["answer"] for _, records, _ in results for r in records]
            judged = iter(judge.judge_answers(asked, answers))
            for _, records, _ in results:
                for record in records:
                    record.update(next(judged))
        finally:
            judge.close()
    for _, records, _ in results:
        for record in records:
            for aspect, verdict in (("truth", "truthful"), ("info", "informative")):
                if aspect in record:
                    record[verdict] = verdicts([record[aspect]])[0]


def metrics_of(plan: EvalPlan, target: Target, records: list[dict], scores: dict, args: EvalArguments) -> dict:
    summary = summarise(records)
    return {
        "model": plan.model_name,
        "edit": target.run_dir,
        "heads": target.heads.get("heads"),
        "head_spec": target.heads.get("spec"),
        **summary,
        **scores,
        "per_category": per_category(records),
        "judges": {aspect: (judge.spec if judge else None) for aspect, judge in plan.resources.judges.items()},
        "dataset": target.source[0],
        "split_seed": target.source[3],
        "settings": {f.name: getattr(args, f.name) for f in fields(EvalArguments)},
    }


def _flatten(metrics: dict, prefix: str = "eval/") -> dict:
    flat = {}
    for key, value in metrics.items():
        if key in ("settings", "judges"):
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float | str | bool) or value is None:
            flat[f"{prefix}{key}"] = value
    return flat


def report_to_wandb(recipe: Recipe, target: Target, records: list[dict], metrics: dict) -> None:
    """One W&B run per evaluated model: the metrics as its summary, the generations as a table."""
    if not reports_to_wandb(recipe.training.report_to):
        return
    import wandb

    offline_without_credentials()
    run = wandb.init(
        project=recipe.edit.wandb_project,
        name=f"{target.name}-eval",
        group=target.heads.get("family", "base" if target.run_dir is None else None),
        job_type="eval",
        config={"model": metrics["model"], "edit": target.run_dir, "heads": target.heads, **metrics["settings"]},
        reinit="finish_previous",
    )
    try:
        run.summary.update(_flatten(metrics))
        columns = ["question_id", "category", "question", "answer", "truth", "info", "mc1", "mc2"]
        columns += [key for key in SIMILARITY_FIELDS if records and key in records[0]]
        table = wandb.Table(columns=columns, data=[[record.get(c) for c in columns] for record in records])
        run.log({"eval/generations": table})
    finally:
        run.finish()


def run_evaluation(plan: EvalPlan, recipe: Recipe) -> list[dict]:
    """Load the base model once, evaluate every target on it, then judge all answers; write every output."""

    args = recipe.eval
    with contextlib.ExitStack() as held:
        # Each evaluation directory is this process's until its files are written: a second eval into it refuses.
        for target in plan.targets:
            held.enter_context(run_lock(target.eval_dir))
        return _run_evaluation(plan, recipe, args)


def _run_evaluation(plan: EvalPlan, recipe: Recipe, args: EvalArguments) -> list[dict]:
    import torch

    model, tokenizer = load_model_and_tokenizer(plan.model_path, plan.model_args, plan.trust_remote_code)
    if not getattr(model, "hf_device_map", None):
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    merge = args.eval_merge and can_merge(plan.model_args)
    results, asked = [], []
    for target in plan.targets:
        questions = _target_questions(plan, target)
        asked.append(questions)
        if target.run_dir is None:
            records, scores = evaluate_model(model, tokenizer, questions, target, args, plan.resources.corpus)
        else:
            edited = load_edit(model, target.run_dir)
            edited.eval()
            try:
                records, scores = evaluate_model(
                    edited, tokenizer, questions, target, args, plan.resources.corpus, merge=merge
                )
            finally:
                model = edited.unload()  # the base model again, without the edit's layers
        results.append((target, records, scores))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    judge_all(plan.resources.judges, results, asked)
    all_metrics = []
    for target, records, scores in results:
        metrics = metrics_of(plan, target, records, scores, args)
        write_evaluation(target.output_dir, records, metrics)
        report_to_wandb(recipe, target, records, metrics)
        print(f"locedit eval: {target.name}: {describe(metrics)} -> {target.eval_dir}", flush=True)
        all_metrics.append(metrics)
    return all_metrics


def describe(metrics: dict) -> str:
    names = [("true", "True"), ("info", "Info"), ("true_info", "True*Info"), ("mc1", "MC1"), ("mc2", "MC2")]
    names += [("bleu_acc", "BLEU acc"), ("rouge1_acc", "ROUGE-1 acc"), ("rougeL_acc", "ROUGE-L acc")]
    names += [("kl", "KL"), ("ce", "CE")]
    return ", ".join(f"{label} {metrics[key]:.4g}" for key, label in names if key in metrics)


def evaluate(recipe: Recipe, run_dirs: list[str] | tuple = (), base: bool = False) -> list[dict]:
    """Check everything, then evaluate the base model and/or the edits in `run_dirs`. Returns their metrics."""
    plan = plan_evaluation(recipe, list(run_dirs), base=base)
    if recipe.edit.dry_run:  # everything is checked (judges and corpus included); nothing is loaded or written
        print(f"locedit eval: dry run: {plan.model_name}, {len(plan.targets)} model(s)", flush=True)
        for target in plan.targets:
            print(f"  {target.name}: {len(target.question_ids)} test questions -> {target.eval_dir}", flush=True)
        return []
    return run_evaluation(plan, recipe)


def evaluate_after_training(recipe: Recipe, run_dirs: list[str], resources: EvalResources) -> list[dict]:
    """`eval_after_train`: evaluate the edits a training run just wrote, with the judges checked before it began."""
    return run_evaluation(plan_evaluation(recipe, run_dirs, resources=resources), recipe)
