"""Running an evaluation: each model's generations, MC1/MC2 and corpus scores, judged at once by the judges that run
no model (`similarity`, `toy`) and its files written then (`locedit.rundir.write_evaluation`; with `report_to`
trackio or wandb, a tracked run per model); the model-based judges (`hf`, `openai`) instead run once for all models at
the end, each loaded once, and the models' files are written after them. Every phase shows progress and its wall time
(`timings` in the metrics returned, and eval/timings.json).

Per model:

- greedy generations (batched, left-padded, at most `eval_max_new_tokens` tokens, cut at the next `Q:`) of the
  training prompt template, optionally after ITI's instruction and TruthfulQA's QA primer (`eval_prompt`); a trained
  edit is merged into the weights for generation (unquantised weights), so it costs nothing per token;
- True, Info and True*Info from the truth and info judges (`locedit.evaluation.judges`), overall and per category;
  with the `similarity` truth judge also the mean of each of TruthfulQA's BLEU/ROUGE numbers (`bleu_acc`, ...);
- MC1 and MC2 from the answers' log-probs: with TruthfulQA's `multiple_choice` targets (`eval_mc_targets`), MC1
  compares the mc1 choice labelled 1 with those labelled 0 and MC2 the mc2 choices labelled 1 with those labelled 0,
  each choice as it is (lm-eval's `truthfulqa_mc1` / `truthfulqa_mc2`); otherwise MC1 compares the best answer with
  the incorrect answers, MC2 the correct answers with the incorrect ones, each closed with a period (ITI);
- KL(original || edited) of the next-token distribution and the cross-entropy on `eval_corpus` (ITI's 100
  OpenWebText documents cut at 128 tokens by default), the original being the same model with the edit disabled;
- the fields of the metrics registered with a `per_question` function (`locedit.evaluation.metric_registry`), from
  each judged answer. The summary holds every registered metric the records give.

Preference-style data (prompt/chosen/rejected) has no questions and no reference answers to judge against, so its
held-out prompts are generated for as they are (and judged only by judges the recipe names), and its held-out pairs
are scored as TRL scores them (`locedit.evaluation.preference`): whether the model prefers chosen, TRL's reward
accuracy, reward margin and IPO loss for an edit, and MC1/MC2 with each prompt's chosen completions as the correct
choices; KL and CE are measured on each held-out prompt too.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import fields

from .. import processes
from ..core import threads
from ..core.args import EvalArguments
from ..core.files import read_json, write_json_atomic
from ..core.recipe import Recipe
from ..core.tracking import Table, tracked_run
from ..edit import load_edit
from ..models.loading import batches, load_model_and_tokenizer, place_for_inference
from ..rundir import read_evaluation, run_lock, training_divergence, write_evaluation
from .breakage import Breakage, judge_rule
from .judges import Judge, verdicts
from .metric_registry import add_per_question_values, all_metrics, per_question_fields
from .metrics import mc1, mc2, per_category, summarise
from .plan import PAIRS_MC_SOURCE, EvalPlan, EvalResources, Target, plan_evaluation
from .preference import PAIR_FIELDS, PROMPT_FIELDS, held_out_pairs, prompt_texts, score_pairs, turn_stops
from .prompts import build_prompt, close_answer
from .scoring import answer_logprobs, can_merge, corpus_scores, document_scores, generate_answers, merged
from .style import style_controlled


def _target_questions(plan: EvalPlan, target: Target) -> list[dict]:
    by_id = plan.questions[target.source]
    return [record for qid in target.question_ids for record in by_id.get(qid, [])]


def evaluate_model(model, tokenizer, questions: list[dict], target: Target, args: EvalArguments, corpus, **kw):
    """Generations, MC1/MC2 and corpus scores of one model (a PEFT model for an edit); no judging."""
    edited = target.run_dir is not None
    prompts = [  # with chat_template, in the tokenizer's chat template
        build_prompt(
            q["question"], target.prompt_template, args.eval_prompt, tokenizer if target.chat_template else None
        )
        for q in questions
    ]
    merge = edited and kw.get("merge", True)
    timings = kw["timings"] if kw.get("timings") is not None else {}  # seconds per phase, filled in here
    print(f"locedit eval: {target.name}: generating {len(prompts)} answers", flush=True)
    started = time.perf_counter()
    cut_off: list[bool] = []  # whether each answer ran to eval_max_new_tokens without ending
    with merged(model) if merge else contextlib.nullcontext():
        answers = generate_answers(
            model,
            tokenizer,
            prompts,
            args.eval_max_new_tokens,
            args.eval_batch_size,
            chat=target.chat_template,
            cut_off=cut_off,
            stops=turn_stops(prompts) if target.preference and not target.chat_template else (),
        )
    timings["generation"] = time.perf_counter() - started
    records = [
        {
            "question_id": int(q["question_id"]),
            "question": q["question"],
            "category": q["category"],
            "answer": answer,
            "cut_off": cut,
        }
        for q, answer, cut in zip(questions, answers, cut_off, strict=True)
    ]
    if target.preference:
        preference_scores(model, tokenizer, questions, records, target, args, edited, timings)
    elif args.eval_mc:
        # Each distinct choice of a question is scored once, as the completion after the question's prompt.
        sets = [mc_choices(q) for q in questions]
        choices = [list(dict.fromkeys([best, *right, *wrong1, *wrong2])) for best, wrong1, right, wrong2 in sets]
        pairs = [
            (prompt, target.completion_template.format(answer=choice))
            for prompt, distinct in zip(prompts, choices, strict=True)
            for choice in distinct
        ]
        print(f"locedit eval: {target.name}: MC on {len(pairs)} answers of {len(questions)} questions", flush=True)
        started = time.perf_counter()
        logprobs = iter(answer_logprobs(model, tokenizer, pairs, args.eval_batch_size, args.eval_mc_share_prompt))
        for record, (best, wrong1, right, wrong2), distinct in zip(records, sets, choices, strict=True):
            score = {choice: next(logprobs) for choice in distinct}
            record["mc1"] = mc1(score[best], [score[c] for c in wrong1])
            record["mc2"] = mc2([score[c] for c in right], [score[c] for c in wrong2])
            record["mc2_sc"] = record["mc2"] if style_controlled(right, wrong2) else None
        timings["mc"] = time.perf_counter() - started
    scores = {}
    if corpus is not None:
        print(f"locedit eval: {target.name}: {'KL/CE' if edited else 'CE'} on {len(corpus)} documents", flush=True)
        started = time.perf_counter()
        scores = corpus_scores(
            model, tokenizer, corpus, args.eval_corpus_max_tokens, args.eval_batch_size, edited=edited
        )
        timings["corpus"] = time.perf_counter() - started
    return records, scores


def preference_scores(model, tokenizer, questions, records, target: Target, args: EvalArguments, edited, timings):
    """Preference-style data: each held-out pair scored as TRL scores it (and MC1/MC2 from the same log-probs), and
    KL and CE on each held-out prompt, put into the prompts' records (`locedit.evaluation.preference`)."""
    reference = " and its base model" if edited else ""
    print(
        f"locedit eval: {target.name}: {held_out_pairs(questions)} held-out pairs of {len(questions)} prompts, "
        f"scored as TRL scores them, by the model{reference}",
        flush=True,
    )
    started = time.perf_counter()
    score_pairs(model, tokenizer, questions, records, target, args, edited)
    timings["pairs"] = time.perf_counter() - started
    measures = "KL/CE" if edited else "CE"
    print(f"locedit eval: {target.name}: {measures} on {len(questions)} held-out prompts", flush=True)
    started = time.perf_counter()
    texts = prompt_texts(questions, target, tokenizer)
    scored = document_scores(
        model, tokenizer, texts, args.eval_corpus_max_tokens, args.eval_batch_size, edited, "the held-out prompts"
    )
    for record, score in zip(records, scored, strict=True):
        record["ce_prompt"] = score["ce"] if score else None
        if edited:
            record["kl_prompt"] = score["kl"] if score else None
    timings["prompts"] = time.perf_counter() - started


def mc_choices(question: dict) -> tuple[str, list[str], list[str], list[str]]:
    """What MC1 and MC2 compare for one question record, as the answer texts scored: (MC1's correct choice, MC1's
    incorrect choices, MC2's correct choices, MC2's incorrect choices).

    With TruthfulQA's multiple_choice targets (`mc1_targets` / `mc2_targets` in the record, from eval_mc_targets):
    the first mc1 choice labelled 1 against the mc1 choices labelled 0, the mc2 choices labelled 1 against those
    labelled 0, each choice as it is (lm-eval's truthfulqa_mc1 / truthfulqa_mc2). Otherwise, from the data's own
    answers: the best answer against the incorrect answers, the correct answers against the incorrect answers, each
    closed with a period as TruthfulQA's `format_best` / `split_multi_answer` (and so ITI) write them."""
    if "mc1_targets" in question:
        mc1_targets, mc2_targets = question["mc1_targets"], question["mc2_targets"]

        def labelled(targets: dict, label: int) -> list[str]:
            return [c for c, one in zip(targets["choices"], targets["labels"], strict=True) if one == label]

        return (
            labelled(mc1_targets, 1)[0],
            labelled(mc1_targets, 0),
            labelled(mc2_targets, 1),
            labelled(mc2_targets, 0),
        )
    incorrect = [close_answer(answer) for answer in question["incorrect_answers"]]
    correct = [close_answer(answer) for answer in question["correct_answers"]]
    return close_answer(question["best_answer"]), incorrect, correct, incorrect


def judge_all(
    judges: dict[str, Judge | None], results: list[tuple[Target, list[dict], dict]], questions: list[list[dict]]
) -> None:
    """Score every model's answers with each judge in turn: each judge is loaded once, for all models.
    `questions[i]` are the question records (with the reference answers) of `results[i]`'s records, in order."""
    apply_judges(judges, results, questions)
    record_verdicts(results)


def is_model_based(judge: Judge) -> bool:
    """Whether a judge runs a model (`hf`, `openai`): loaded once, it scores every evaluated model's answers at the
    end; the others (`similarity`, the toy world's `toy`, ...) score each model's answers as soon as they exist."""
    return judge.model_based


def apply_judges(
    judges: dict[str, Judge | None], results: list[tuple[Target, list[dict], dict]], questions: list[list[dict]]
) -> None:
    """Each judge's scores of all of `results`' answers put into their records (no verdicts yet), the judge loaded
    once for all of them. Model-based judges show their own progress; the others judge in batches, with a bar."""
    label = f"{results[0][0].name}: " if len(results) == 1 else ""
    for aspect, judge in judges.items():
        if judge is None:
            continue
        asked = [q for records in questions for q in records]
        answers = [r["answer"] for _, records, _ in results for r in records]
        models = f" ({len(answers)} answers of {len(results)} models)" if len(results) > 1 else ""
        print(f"locedit eval: {label}judging {aspect} with {judge.spec}{models}", flush=True)
        judge.load()
        try:
            if is_model_based(judge):  # hf and openai judges show their own progress
                judged = judge.judge_answers(asked, answers)
            else:
                size, judged = judge.batch_size, []
                for start in batches(len(answers), size, f"judging {aspect}"):
                    judged += judge.judge_answers(asked[start : start + size], answers[start : start + size])
            judged = iter(judged)
            for _, records, _ in results:
                for record in records:
                    record.update(next(judged))
                    if judge.answer_rules:
                        apply_judge_rule(record, aspect)
        finally:
            judge.close()


def apply_judge_rule(record: dict, aspect: str) -> None:
    """TruthfulQA's verdict on a declining or degenerate answer (`breakage.judge_rule`) in place of the judge's
    score for `aspect`; the record says which rule decided (`judge_rule`) and keeps the judge's own score
    (`<aspect>_judge`)."""
    rule = judge_rule(record.get("answer") or "", bool(record.get("cut_off")))
    if rule is not None and aspect in rule[1]:
        record[f"{aspect}_judge"] = record[aspect]
        record[aspect] = rule[1][aspect]
        record["judge_rule"] = rule[0]


def record_verdicts(results: list[tuple[Target, list[dict], dict]]) -> None:
    """Each record's verdicts (truthful, informative) from the judges' scores in it."""
    for _, records, _ in results:
        for record in records:
            for aspect, verdict in (("truth", "truthful"), ("info", "informative")):
                if aspect in record:
                    record[verdict] = verdicts([record[aspect]])[0]


def metrics_of(
    plan: EvalPlan, target: Target, records: list[dict], scores: dict, args: EvalArguments, timings: dict | None = None
) -> dict:
    """One model's metrics: the summary, per category, which judges and MC choices, and the wall time per phase
    (`timings`, saved as eval/timings.json; metrics.json holds the rest)."""
    summary = summarise(records)
    mc_source = plan.mc_sources.get(target.source, "answers") if args.eval_mc else None
    # Preference-style data: how many held-out pairs, and the tau of an edit's rewards and IPO loss.
    pairs = {"pairs": sum(int(record.get("pairs") or 0) for record in records), "beta": target.beta}
    return {
        "model": plan.model_name,
        "edit": target.run_dir,
        "heads": target.heads.get("heads"),
        "head_spec": target.heads.get("spec"),
        **summary,
        **(pairs if target.preference else {}),
        **scores,
        "per_category": per_category(records),
        "judges": {aspect: (judge.spec if judge else None) for aspect, judge in plan.resources.judges.items()},
        "dataset": target.source[0],
        "data_layout": "preference" if target.preference else "question",
        "split_seed": target.source[3],
        "mc_source": mc_source,
        "timings": {phase: round(seconds, 3) for phase, seconds in (timings or {}).items()},
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


def report_evaluation(recipe: Recipe, target: Target, records: list[dict], metrics: dict) -> None:
    """One tracked run per evaluated model (trackio and/or W&B, as report_to says): the metrics, the break
    detector's verdict and its reasons as its summary, the generations as a table."""
    summary = _flatten(metrics)
    if metrics.get("broken_reasons"):
        summary["eval/broken_reasons"] = "; ".join(metrics["broken_reasons"])
    columns = ["question_id", "category", "question", "answer", "truth", "info"]
    columns += [name for name in per_question_fields() if records and name in records[0]]
    with tracked_run(
        recipe.training.report_to,
        recipe.edit.wandb_project,
        f"{target.name}-eval",
        group=target.heads.get("family", "base" if target.run_dir is None else None),
        job_type="eval",
        config={"model": metrics["model"], "edit": target.run_dir, "heads": target.heads, **metrics["settings"]},
    ) as run:
        if run is not None:
            run.summary(summary)
            run.log({"eval/generations": Table.of_records(records, columns)})


def run_evaluation(plan: EvalPlan, recipe: Recipe) -> list[dict]:
    """Load the base model once and evaluate every target on it; each model's files are written as soon as it is
    judged: right after its generations by judges that run no model, or after the model-based judges, which run once
    for all models at the end. Returns every target's metrics, in the plan's order.

    A target whose evaluation is there already (`Target.done`) is left as it is. Under `accelerate launch` the
    models are shared among the processes (`locedit.processes.share`): each process loads the base model and its
    judges once, evaluates its share and writes those models' files; the metrics come back to every process."""
    args = recipe.eval
    for target in plan.targets:
        if target.done and processes.is_main():
            print(
                f"locedit eval: {target.name}: evaluated already with these settings ({target.eval_dir}); left as it "
                "is (remove it to evaluate again)",
                flush=True,
            )
    mine = share_targets(plan.targets)
    with contextlib.ExitStack() as held:
        # Each evaluation directory is this process's until its files are written: a second eval into it refuses.
        for _, target in mine:
            held.enter_context(run_lock(target.eval_dir))
        made = dict(processes.gather([(p, (p, metrics)) for p, metrics in _run_evaluation(plan, recipe, args, mine)]))
    return [made[p] if p in made else read_evaluation(target.output_dir)[0] for p, target in enumerate(plan.targets)]


def share_targets(targets: list[Target]) -> list[tuple[int, Target]]:
    """This process's targets still to evaluate, with their positions in `targets`.

    Every target is dealt to one process by its position among all targets, done or not, and only then are the
    done ones dropped: the processes plan at different moments, and one that plans after another has finished a
    target sees it done. Dealing only the targets still to do would then deal them differently in each process,
    and two processes would take the same target."""
    return [(position, target) for position, target in processes.share(targets) if not target.done]


def _run_evaluation(
    plan: EvalPlan, recipe: Recipe, args: EvalArguments, mine: list[tuple[int, Target]]
) -> list[tuple[int, dict]]:
    """This process's share of the targets, evaluated: (position, metrics) of each."""
    import torch

    if not mine:
        return []
    fresh = [target for _, target in mine if not target.rejudge]
    if args.eval_mc and fresh and processes.is_main():
        for source in dict.fromkeys(target.source for target in fresh):
            print(f"locedit eval: {describe_mc_source(source[0], plan.mc_sources.get(source, 'answers'))}", flush=True)
    model = None
    if fresh:  # a target judged again from its saved generations needs no model
        model, tokenizer = load_model_and_tokenizer(plan.model_path, plan.model_args, plan.trust_remote_code)
        place_for_inference(model)
        model.eval()
    merge = args.eval_merge and can_merge(plan.model_args)
    judges = {aspect: judge for aspect, judge in plan.resources.judges.items() if judge is not None}
    at_once = {aspect: judge for aspect, judge in judges.items() if not is_model_based(judge)}
    at_end = {aspect: judge for aspect, judge in judges.items() if is_model_based(judge)}
    pending, all_metrics = [], []  # pending: (position, result, questions, timings) of models waiting for at_end
    for position, target in mine:
        questions = _target_questions(plan, target)
        timings: dict[str, float] = {}
        if target.rejudge:
            records, scores, timings = saved_generations(target)
        elif target.run_dir is None:
            records, scores = evaluate_model(
                model, tokenizer, questions, target, args, plan.resources.corpus, timings=timings
            )
        else:
            edited = load_edit(model, target.run_dir)
            edited.eval()
            try:
                records, scores = evaluate_model(
                    edited, tokenizer, questions, target, args, plan.resources.corpus, merge=merge, timings=timings
                )
            finally:
                model = edited.unload()  # the base model again, without the edit's layers
        result = (target, records, scores)
        if at_once:
            started = time.perf_counter()
            apply_judges(at_once, [result], [questions])
            timings["judging"] = time.perf_counter() - started
        print(f"locedit eval: {target.name}: {describe_timings(timings)}", flush=True)
        if at_end:
            pending.append((position, result, questions, timings))
        else:
            record_verdicts([result])
            all_metrics.append((position, _finish(plan, recipe, args, result, timings)))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if pending:
        started = time.perf_counter()
        judge_all(at_end, [result for _, result, _, _ in pending], [questions for _, _, questions, _ in pending])
        elapsed = time.perf_counter() - started
        print(f"locedit eval: judging {len(pending)} model(s) took {elapsed:.1f} s", flush=True)
        for position, result, _, timings in pending:
            timings["judging_all_models"] = elapsed  # the model-based judges' time for all models together
            all_metrics.append((position, _finish(plan, recipe, args, result, timings)))
    return all_metrics


# What an evaluation's records hold of the evaluated model itself (evaluate_model); the rest comes from the judges
# and the per-question metrics, and is made again when the saved generations are judged again.
GENERATION_FIELDS = (
    *("question_id", "question", "category", "answer", "cut_off", "mc1", "mc2", "mc2_sc"),
    *PAIR_FIELDS,
    *PROMPT_FIELDS,
)
# The corpus scores of metrics.json (corpus_scores).
CORPUS_SCORES = ("ce", "corpus_docs", "kl", "ce_original")


def saved_generations(target: Target) -> tuple[list[dict], dict, dict]:
    """An evaluation's saved generations, MC and corpus scores, as `evaluate_model` made them (records, scores), and
    the wall times of the phases that made them: what judging them again starts from."""
    earlier, records = read_evaluation(target.output_dir)
    records = [{key: record[key] for key in GENERATION_FIELDS if key in record} for record in records]
    scores = {key: earlier[key] for key in CORPUS_SCORES if key in earlier}
    saved = read_json(os.path.join(target.eval_dir, TIMINGS), fix="remove it (only wall times are lost)")
    timings = {key: value for key, value in saved.items() if key in ("generation", "mc", "pairs", "prompts", "corpus")}
    print(
        f"locedit eval: {target.name}: judging its {len(records)} saved answers again ({target.rejudge}); its "
        "generations, MC and corpus scores are kept",
        flush=True,
    )
    return records, scores, timings


def _finish(plan: EvalPlan, recipe: Recipe, args: EvalArguments, result: tuple, timings: dict) -> dict:
    """A judged model's metrics, its evaluation files (metrics.json last) and its tracked run. The wall times go to
    eval/timings.json, not metrics.json, whose content is a function of the settings alone (an evaluation run again
    writes the same file); the metrics returned and tracked carry them as `timings`."""
    target, records, scores = result
    add_per_question_values(records)  # the registered metrics computed from the judged answers
    metrics = metrics_of(plan, target, records, scores, args, timings)
    if target.run_dir is not None:
        # The break detector's verdict by this recipe's thresholds (the report and the study apply their own).
        reasons = Breakage.of(args).reasons(metrics, training_divergence(target.run_dir))
        metrics.update(broken=bool(reasons), broken_reasons=reasons)
        if reasons:
            print(f"locedit eval: warning: {target.name} is broken: {'; '.join(reasons)}", flush=True)
    os.makedirs(target.eval_dir, exist_ok=True)
    write_json_atomic(os.path.join(target.eval_dir, TIMINGS), metrics["timings"])
    write_evaluation(target.output_dir, records, {key: value for key, value in metrics.items() if key != "timings"})
    report_evaluation(recipe, target, records, metrics)
    print(f"locedit eval: {target.name}: {describe(metrics)} -> {target.eval_dir}", flush=True)
    return metrics


def describe_mc_source(dataset: str, mc_source: str) -> str:
    """Which answers MC1 and MC2 compare, in one line (printed once per evaluation)."""
    if mc_source == PAIRS_MC_SOURCE:
        return (
            f"MC1: each prompt's first chosen completion against its rejected ones; MC2: its chosen completions "
            f"against its rejected ones, from {dataset}, scored as TRL scores a pair (EOS appended)"
        )
    if mc_source == "answers":
        return (
            "MC1: Best Answer against Incorrect Answers; MC2: Correct Answers against Incorrect Answers, from "
            f"{dataset}, each closed with a period as ITI does"
        )
    return (
        "MC1: the first mc1_targets choice labelled 1 against those labelled 0; MC2: the mc2_targets choices "
        f"labelled 1 against those labelled 0, from {mc_source}, each choice as it is (lm-eval's truthfulqa_mc1/mc2)"
    )


TIMINGS = "timings.json"  # eval/timings.json: the wall time of each phase, in seconds
PHASES = {
    "generation": "generation",
    "mc": "MC",
    "pairs": "pairs",
    "prompts": "prompts",
    "corpus": "corpus",
    "judging": "judging",
}


def describe_timings(timings: dict) -> str:
    """e.g. "generation 12.3 s, MC 40.1 s, corpus 20.0 s": the wall time of each phase that ran."""
    # The seconds as eval/timings.json holds them (to the millisecond), so the line and the file agree.
    return ", ".join(f"{label} {round(timings[key], 3):.1f} s" for key, label in PHASES.items() if key in timings)


def describe(metrics: dict) -> str:
    """e.g. "True 0.5, Info 0.9, True*Info 0.45, MC1 0.3, MC2 0.4, KL 0.01, CE 3.2": the metrics of the tables."""
    shown = [metric for metric in all_metrics() if metric.table and metric.key in metrics]
    return ", ".join(f"{metric.label} {metrics[metric.key]:.4g}" for metric in shown)


def evaluate(recipe: Recipe, run_dirs: list[str] | tuple = (), base: bool = False) -> list[dict]:
    """Check everything, then evaluate the base model and/or the edits in `run_dirs`. Returns their metrics."""
    plan = plan_evaluation(recipe, list(run_dirs), base=base)
    if recipe.edit.dry_run:  # everything is checked (judges and corpus included); nothing is loaded or written
        print("\n".join(describe_plan(plan, recipe.eval)), flush=True)
        return []
    return run_evaluation(plan, recipe)


def describe_plan(plan: EvalPlan, args: EvalArguments) -> list[str]:
    """The dry run's lines: the models (runs) and their test questions, the judges, MC, the corpus and the break
    detector, all checked."""
    lines = [f"locedit eval: dry run: {plan.model_name}, {len(plan.targets)} model(s)"]
    lines.append(f"  threads: {threads.describe()}")
    for target in plan.targets:
        done = " (evaluated already with these settings: left as it is)" if target.done else ""
        if target.rejudge:
            done = f" (evaluated already; its saved answers are judged again: {target.rejudge})"
        asked = f"{len(_target_questions(plan, target))} test prompts" if target.preference else None
        asked = asked or f"{len(target.question_ids)} test questions"
        lines.append(f"  {target.name}: {asked} -> {target.eval_dir}{done}")
    judges = {aspect: judge.describe() if judge else "none" for aspect, judge in plan.resources.judges.items()}
    lines.append(f"  judges: truth {judges.get('truth', 'none')}, info {judges.get('info', 'none')} (checked)")
    for source in dict.fromkeys(target.source for target in plan.targets if target.preference):
        first = next(target for target in plan.targets if target.source == source)
        prompts = _target_questions(plan, first)
        lines.append(
            f"  preference-style data ({source[0]}): {held_out_pairs(prompts)} held-out pairs of {len(prompts)} "
            "prompts, scored as TRL scores them: prefers chosen, and for an edit reward accuracy, reward margin and "
            "IPO loss (the run's tau); KL/CE on the held-out prompts"
        )
    if args.eval_mc:
        for source in dict.fromkeys(target.source for target in plan.targets):
            lines.append(f"  {describe_mc_source(source[0], plan.mc_sources.get(source, 'answers'))}")
    corpus = plan.resources.corpus
    lines.append(
        f"  corpus: {args.eval_corpus}, {len(corpus)} documents cut at {args.eval_corpus_max_tokens} tokens (read)"
        if corpus is not None
        else "  corpus: none (no KL or CE)"
    )
    lines.append(f"  broken: {Breakage.of(args).describe()}")
    return lines


def evaluate_after_training(recipe: Recipe, run_dirs: list[str], resources: EvalResources) -> list[dict]:
    """`eval_after_train`: evaluate the edits a training run just wrote, with the judges checked before it began."""
    return run_evaluation(plan_evaluation(recipe, run_dirs, resources=resources), recipe)
