"""Planning an evaluation: which models, which test questions, where the results go; no weights are loaded.

Everything that can fail on a user's mistake (a run directory without a split, edits of different base models, a
judge that is not a causal LM, an unreachable or unauthorised endpoint, a missing corpus, MC targets that lack a
test question) is checked here; TruthfulQA's multiple_choice targets (`eval_mc_targets`) are loaded here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..core.args import EvalArguments, ModelArguments, result_settings
from ..core.errors import DamagedFileError, DataError, RecipeError
from ..core.files import check_safetensors
from ..core.recipe import Recipe
from ..data import data_layout, load_prompt_pairs, load_question_details, load_questions, validate_dataset_arg
from ..data.sources import MC_CONFIG, MC_FILE_EXTENSIONS, is_mc_targets_file, load_mc_targets, truthfulqa_hub_id
from ..models.layout import AttentionLayout
from ..models.loading import read_config
from ..rundir import (
    ADAPTER_WEIGHTS,
    METRICS,
    RETRAIN,
    eval_dir,
    expand_run_dirs,
    is_evaluated,
    read_adapter_config,
    read_evaluation,
    read_run_dir,
    settings_difference,
)
from .corpus import load_corpus
from .judges import ASPECTS, Judge, make_judge, resolve_judge_spec
from .prompts import PROMPT_PREFIXES, chat_tokenizer


@dataclass
class Target:
    """One model to evaluate: the base model (`run_dir` None) or one edit, with its test questions."""

    name: str
    run_dir: str | None
    output_dir: str  # the eval files go to output_dir/eval
    source: tuple  # (dataset, dataset_config, split_fractions, split_seed, group_by)
    question_ids: list[int]
    prompt_template: str
    completion_template: str
    heads: dict = field(default_factory=dict)
    chat_template: bool = False  # prompts in the tokenizer's chat template (the run's `chat_template`)
    done: bool = False  # its eval/ holds this very evaluation, finished after the edit: left as it is
    # Its eval/ holds this evaluation but for the judges (this says which changed): its saved generations, MC and
    # corpus scores are kept and judged again; None: evaluated afresh (or not at all, when done).
    rejudge: str | None = None
    # Preference-style data: its held-out pairs are scored as TRL scores them (`locedit.evaluation.preference`),
    # with the run's tau (`beta`, an edit's) and `max_length`; its prompts are used as they are.
    preference: bool = False
    beta: float | None = None
    max_length: int | None = None

    def __post_init__(self):
        if self.chat_template:  # an MC choice is the answer itself, right after the assistant header
            self.completion_template = "{answer}"

    def use_preference_data(self) -> None:
        """The data is preference-style: its prompts and completions are used as they are, as in training."""
        self.preference = True
        self.prompt_template, self.completion_template = "{question}", "{answer}"

    @property
    def eval_dir(self) -> str:
        return eval_dir(self.output_dir)


@dataclass
class EvalResources:
    """The checked judges and the loaded corpus: what does not depend on the model or the run directories."""

    judges: dict[str, Judge | None]
    corpus: list[str] | None


@dataclass
class EvalPlan:
    model_name: str
    model_path: str
    model_args: ModelArguments
    trust_remote_code: bool
    targets: list[Target]
    questions: dict[tuple, dict[int, list[dict]]]  # source -> question id -> question records
    resources: EvalResources
    # source -> where MC1/MC2's choices come from: "answers" (the data's own), "hub:ID" or "file:PATH" (TruthfulQA's
    # multiple_choice targets, put in each question record as mc1_targets / mc2_targets), "pairs" (preference-style
    # data: each prompt's chosen against its rejected completions); empty without eval_mc
    mc_sources: dict[tuple, str] = field(default_factory=dict)
    layouts: dict[tuple, str] = field(default_factory=dict)  # source -> "question" or "preference"


def check_settings(args: EvalArguments, preference: bool = False) -> EvalResources:
    """Validate the eval settings, check the judges (config only, or one endpoint request) and load the corpus.

    With `preference` (the data is preference-style), a judge left at `auto` is none: the judges judge TruthfulQA's
    truth and informativeness, which such data does not ask about; a judge the recipe names is used."""
    if args.eval_prompt not in PROMPT_PREFIXES:
        raise RecipeError(f"eval_prompt '{args.eval_prompt}' is not valid; choose one of {', '.join(PROMPT_PREFIXES)}")
    if args.eval_judge_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise RecipeError(f"eval_judge_dtype '{args.eval_judge_dtype}' is not valid")
    mc_spec = (args.eval_mc_targets or "answers").strip()
    if mc_spec.lower() not in MC_KEYWORDS and not is_mc_targets_file(mc_spec):
        raise RecipeError(
            f"eval_mc_targets '{args.eval_mc_targets}' is not valid; give auto, answers, none or a local "
            f"{'/'.join(MC_FILE_EXTENSIONS)} file in TruthfulQA's multiple_choice format"
        )
    judges = {}
    for aspect in ASPECTS:
        # `auto` is recorded as the judge it stands for on this machine (the settings say which judged).
        spec = getattr(args, f"eval_judge_{aspect}")
        auto = spec is not None and spec.strip().lower() == "auto"
        spec = "none" if preference and auto else resolve_judge_spec(spec, aspect)
        setattr(args, f"eval_judge_{aspect}", spec)
        judge = make_judge(
            spec, aspect, batch_size=args.eval_batch_size, dtype=args.eval_judge_dtype, judge_data=args.eval_judge_data
        )
        if judge is not None:
            judge.check()
        judges[aspect] = judge
    return EvalResources(judges=judges, corpus=load_corpus(args))


def _model_args_from(settings: dict) -> ModelArguments:
    names = {f.name for f in fields(ModelArguments)}
    return ModelArguments(**{key: value for key, value in settings.items() if key in names})


def _model_key(settings: dict) -> tuple[str, str]:
    return settings["model_name_or_path"], settings.get("model_revision", "main")


def _check_one_base_model(runs: list[tuple]) -> None:
    first_dir, first, _, _ = runs[0]
    for run_dir, settings, _, _ in runs[1:]:
        if _model_key(settings) != _model_key(first):
            (name, revision), (other, other_revision) = _model_key(first), _model_key(settings)
            raise RecipeError(
                f"edits of different base models cannot be evaluated together: '{first_dir}' edits "
                f"{name} ({revision}), '{run_dir}' edits {other} ({other_revision})"
            )


def _edit_target(run_dir: str, settings: dict, split: dict, heads: dict) -> Target:
    source = (
        split.get("dataset", settings.get("dataset")),
        split.get("dataset_config", settings.get("dataset_config")),
        tuple(split.get("split_fractions", settings.get("split_fractions"))),
        int(split.get("split_seed", settings.get("split_seed", 0))),
        settings.get("group_by"),
        settings.get("bad_rows", "refuse"),
    )
    return Target(
        name=os.path.basename(os.path.normpath(run_dir)),
        run_dir=run_dir,
        output_dir=run_dir,
        source=source,
        question_ids=sorted(int(i) for i in split["question_ids"]["test"]),
        prompt_template=settings.get("prompt_template", "Q: {question}\nA:"),
        completion_template=settings.get("completion_template", " {answer}"),
        heads=heads,
        chat_template=bool(settings.get("chat_template", False)),
        beta=settings.get("beta"),
        max_length=settings.get("max_length"),
    )


def _base_target(recipe: Recipe, targets: list[Target], run_dirs: list[str], test_ids: dict) -> Target:
    """The base model on the runs' test questions (which must be one split), or on the recipe's own split."""
    if targets:
        splits = {
            (t.source, tuple(t.question_ids), t.prompt_template, t.completion_template, t.chat_template)
            for t in targets
        }
        if len(splits) > 1:
            raise RecipeError(
                "the run directories use different question splits or templates; evaluate the base model with "
                "each split separately"
            )
        source, ids, prompt_template, completion_template, chat_template = splits.pop()
        default_dir = os.path.join(os.path.dirname(os.path.normpath(run_dirs[0])), "base")
    else:
        source = _recipe_source(recipe)
        ids = sorted(test_ids[source])
        prompt_template, completion_template = recipe.edit.prompt_template, recipe.edit.completion_template
        chat_template = recipe.edit.chat_template
        default_dir = os.path.join("outputs", recipe.name, "base")
    return Target(
        name="base",
        run_dir=None,
        output_dir=recipe.eval.eval_output_dir or default_dir,
        source=source,
        question_ids=list(ids),
        prompt_template=prompt_template,
        completion_template=completion_template,
        chat_template=chat_template,
    )


def plan_evaluation(
    recipe: Recipe, run_dirs: list[str], base: bool = False, resources: EvalResources | None = None
) -> EvalPlan:
    """Check everything and resolve the models, questions and output directories; loads no model weights."""
    run_dirs = expand_run_dirs(list(run_dirs))
    if not run_dirs and not base:
        raise RecipeError("nothing to evaluate: give run directories, --base, or both")
    runs = [(run_dir, *read_run_dir(run_dir)) for run_dir in run_dirs]
    if runs:
        _check_one_base_model(runs)
        first = runs[0][1]
        model_args = _model_args_from(first)
        trust_remote_code = bool(first.get("trust_remote_code", False))
    else:
        model_args, trust_remote_code = recipe.model, recipe.training.trust_remote_code
    targets = [_edit_target(run_dir, settings, split, heads) for run_dir, settings, split, heads in runs]

    sources = {target.source for target in targets} | ({_recipe_source(recipe)} if base and not runs else set())
    questions, test_ids, layouts = {}, {}, {}
    for source in sources:
        layouts[source] = source_layout(source)
        questions[source], test_ids[source] = _load_source(source, layouts[source])
    for target in targets:
        if layouts[target.source] == "preference":
            target.use_preference_data()
    for target in targets:
        if set(target.question_ids) != test_ids[target.source]:
            raise RecipeError(
                f"the test questions recorded in '{target.run_dir}/splits.json' differ from those that "
                f"{target.source[0]} gives now with the same split settings (has the data set changed?)"
            )
    if base:
        targets.insert(0, _base_target(recipe, targets, run_dirs, test_ids))
        if layouts[targets[0].source] == "preference":
            targets[0].use_preference_data()
    if recipe.eval.eval_max_questions is not None:
        for target in targets:
            target.question_ids = target.question_ids[: recipe.eval.eval_max_questions]

    model_path, config = read_config(model_args, trust_remote_code, weights=not recipe.edit.dry_run)
    # Read for the base model too: it is the edits' baseline, so a model locedit cannot edit is refused here.
    attention = AttentionLayout.from_config(config, model_args.model_name_or_path)
    for target in targets:
        if target.run_dir is not None:
            _check_edit_fits(target.run_dir, attention)
    if any(target.chat_template for target in targets):
        chat_tokenizer(model_path, model_args, trust_remote_code)  # one line if it has no chat template
    preference = all(layout == "preference" for layout in layouts.values())
    resources = resources if resources is not None else check_settings(recipe.eval, preference)
    mc_sources = _attach_mc_targets(recipe.eval, targets, questions) if recipe.eval.eval_mc else {}
    for target in targets:
        target.done = _check_earlier_evaluation(target, recipe.eval, model_args.model_name_or_path)
    return EvalPlan(
        model_name=model_args.model_name_or_path,
        model_path=model_path,
        model_args=model_args,
        trust_remote_code=trust_remote_code,
        targets=targets,
        questions=questions,
        resources=resources,
        mc_sources=mc_sources,
        layouts=layouts,
    )


def _recipe_source(recipe: Recipe) -> tuple:
    """The recipe's question split as a hashable source: (dataset, dataset_config, split_fractions, seed, group_by,
    bad_rows)."""
    return tuple(recipe.edit.split_source().values())


def source_layout(source: tuple) -> str:
    """Whether a source's data is "question"- or "preference"-style."""
    dataset, dataset_config, _, seed, _, _ = source
    validate_dataset_arg(dataset)
    return data_layout(dataset, dataset_config, seed)


def preference_data(recipe: Recipe) -> bool:
    """Whether the recipe's data is preference-style (prompt/chosen/rejected): what its evaluation can score."""
    return source_layout(_recipe_source(recipe)) == "preference"


def _load_source(source: tuple, layout: str | None = None) -> tuple[dict[int, list[dict]], set[int]]:
    """Question records (with category and best answer) by question id, and the ids of the test split. For
    preference-style data (`layout`), a record is a prompt with its pairs (`load_prompt_pairs`)."""
    dataset, dataset_config, fractions, seed, group_by, bad_rows = source
    validate_dataset_arg(dataset)
    if (layout or data_layout(dataset, dataset_config, seed)) == "preference":
        splits = load_prompt_pairs(dataset, dataset_config, fractions, seed, group_by, bad_rows)
        by_id: dict[int, list[dict]] = {}
        for records in splits.values():
            for record in records:
                by_id.setdefault(int(record["question_id"]), []).append(record)
        return by_id, {int(record["question_id"]) for record in splits["test"]}
    details = load_question_details(dataset, dataset_config, seed)
    splits = load_questions(dataset, dataset_config, fractions, seed, group_by, bad_rows)
    by_id: dict[int, list[dict]] = {}
    for split in splits.values():
        for record in split:
            record = {**record, **details.get(record["question"], {"category": "", "best_answer": ""})}
            if not record["best_answer"]:
                record["best_answer"] = record["correct_answers"][0]
            by_id.setdefault(int(record["question_id"]), []).append(record)
    return by_id, {int(i) for i in splits["test"]["question_id"]}


MC_KEYWORDS = ("auto", "answers", "none")
PAIRS_MC_SOURCE = "pairs"  # the mc_source of preference-style data: each prompt's chosen against its rejected


def mc_targets_spec(args: EvalArguments, source: tuple) -> str | None:
    """Where MC1/MC2's choices come from for the questions of `source`: a Hub id or a local file of TruthfulQA's
    multiple_choice targets, or None for the data's own best/correct/incorrect answers."""
    spec = (args.eval_mc_targets or "answers").strip()
    if spec.lower() in ("answers", "none"):
        return None
    if spec.lower() == "auto":  # the Hub TruthfulQA generation data: the multiple_choice config of the same id
        return truthfulqa_hub_id(source[0], source[1])
    return spec


def _attach_mc_targets(args: EvalArguments, targets: list[Target], questions: dict) -> dict[tuple, str]:
    """Put TruthfulQA's mc1_targets / mc2_targets into each evaluated question's record (matched by the stripped
    question text) where eval_mc_targets asks for them; returns each source's MC source for the metrics."""
    sources: dict[tuple, str] = {}
    loaded: dict[str, dict] = {}
    for target in targets:
        spec = mc_targets_spec(args, target.source)
        if target.preference:
            if spec is not None and is_mc_targets_file(spec):
                raise RecipeError(
                    f"eval_mc_targets '{spec}' is for question-style data; MC1/MC2 of preference-style data "
                    f"({target.source[0]}) compare each prompt's chosen and rejected completions: give "
                    "eval_mc_targets auto"
                )
            sources[target.source] = PAIRS_MC_SOURCE
            continue
        if spec is None:
            sources[target.source] = "answers"
            continue
        if spec not in loaded:
            loaded[spec] = load_mc_targets(spec)
        sources[target.source] = f"file:{spec}" if is_mc_targets_file(spec) else f"hub:{spec}:{MC_CONFIG}"
        records = [record for qid in target.question_ids for record in questions[target.source].get(qid, [])]
        missing = [record["question"].strip() for record in records if record["question"].strip() not in loaded[spec]]
        if missing:
            raise DataError(
                f"eval_mc_targets: {len(missing)} of the {len(records)} test questions are not in the multiple-choice "
                f"targets of {spec} (matched by question text), e.g. {missing[0]!r}; give eval_mc_targets: answers "
                "to score MC1/MC2 on the data's own answers"
            )
        for record in records:
            record.update(loaded[spec][record["question"].strip()])
    return sources


def _check_edit_fits(run_dir: str, layout) -> None:
    """The saved edit is a locedit edit made for a model of this shape (checked from the configs alone), whole, and
    finite (a diverged run's NaN, or an ITI edit made with a NaN strength, is refused before any model loads)."""
    import torch
    from safetensors.torch import load_file

    saved = read_adapter_config(run_dir)
    weights = os.path.join(run_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise RecipeError(f"the edit in '{run_dir}' has no {ADAPTER_WEIGHTS}; {RETRAIN}")
    check_safetensors(weights, RETRAIN)
    if not all(bool(torch.isfinite(tensor).all()) for tensor in load_file(weights).values()):
        raise DamagedFileError(f"the edit in '{run_dir}' holds NaN or infinite values (a broken run); {RETRAIN}")
    if "edit_layers" not in saved:
        raise RecipeError(f"'{run_dir}' holds a PEFT adapter that is not a locedit edit")
    if (saved.get("num_layers"), saved.get("num_heads")) != (layout.num_layers, layout.num_heads):
        raise RecipeError(
            f"the edit in '{run_dir}' was made for a model of {saved.get('num_layers')} layers x "
            f"{saved.get('num_heads')} heads, but its base model has {layout.shape}"
        )


# The eval settings that change an evaluation's results: a finished evaluation made with others is not overwritten,
# except that one made with other judges alone is judged again from its saved generations.
EVAL_RESULT_SETTINGS = result_settings(EvalArguments)
JUDGE_SETTINGS = ("eval_judge_truth", "eval_judge_info", "eval_judge_data", "eval_judge_dtype")


def _check_earlier_evaluation(target: Target, args: EvalArguments, model_name: str) -> bool:
    """Whether the target's eval/ holds this very evaluation, finished (same settings, model, data and questions,
    and, for an edit, made after the run last finished training): it is then left as it is, as a finished training
    run is. One made with other judges alone is, with `eval_rejudge`, marked to be judged again (`Target.rejudge`:
    its generations, MC and corpus scores are kept), else refused. One made with other settings is refused, never
    overwritten."""
    if not is_evaluated(target.output_dir):
        return False
    earlier, records = read_evaluation(target.output_dir)
    now = {f.name: getattr(args, f.name) for f in fields(EvalArguments)}
    before = earlier.get("settings") or {}
    generation = [key for key in EVAL_RESULT_SETTINGS if key not in JUDGE_SETTINGS]
    difference = settings_difference(before, now, generation)
    if difference:
        where = "--eval_output_dir another directory" if target.run_dir is None else "another run directory"
        raise RecipeError(
            f"'{target.eval_dir}' holds an evaluation made with other settings ({difference}); give {where} or "
            "remove that evaluation"
        )
    same = (
        earlier.get("model") == model_name
        and earlier.get("dataset") == target.source[0]
        and earlier.get("split_seed") == target.source[3]
        and sorted(int(record["question_id"]) for record in records) == sorted(target.question_ids)
    )
    if target.run_dir is not None and same:  # a run trained on after its evaluation has another edit now
        trained = os.path.join(target.run_dir, METRICS)
        evaluated = os.path.join(target.eval_dir, METRICS)
        same = not os.path.exists(trained) or os.path.getmtime(evaluated) >= os.path.getmtime(trained)
    judges = settings_difference({key: before.get(key) for key in JUDGE_SETTINGS}, now, JUDGE_SETTINGS)
    if same and judges:
        if not args.eval_rejudge:
            raise RecipeError(
                f"'{target.eval_dir}' holds an evaluation made with other judges ({judges}); give --eval_rejudge true "
                "to judge its saved answers again (nothing is generated again), or remove that evaluation"
            )
        target.rejudge = judges
        return False
    return same
