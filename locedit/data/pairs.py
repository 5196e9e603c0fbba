"""Preference pairs (prompt, chosen, rejected) for IPO/DPO, and the questions they come from, split by question.

Two layouts are understood (`locedit.data.sources` reads them):

- question-style: ``question``, ``correct_answers``, ``incorrect_answers``. Answers are lists, or strings separated
  by ``;`` as in the TruthfulQA CSV. Every correct answer is paired with every incorrect answer of its question.
- preference-style: ``prompt``, ``chosen``, ``rejected``, used as they are.

With ``chat_template`` the pairs are TRL's conversational data, which TRL's DPOTrainer renders with the tokenizer's
chat template: the prompt is one user turn, the question itself (``prompt_template`` and ``completion_template`` are
not used: the template supplies the roles), and chosen and rejected are one assistant turn each, the answer itself.
"""

from __future__ import annotations

import json
import logging
import random
import string
import warnings
from itertools import product

import datasets

from ..core.errors import DataError
from ..models.chat import assistant_turn, user_turn
from .sources import PREFERENCE_COLUMNS, column_names, detect_layout, load_rows, load_source
from .splits import SPLIT_NAMES, split_units, validate_split_fractions

logger = logging.getLogger(__name__)


class DataWarning(UserWarning):
    """Data was cleaned (empty answers dropped, questions skipped, ...); the message gives the counts."""


def _warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=2)


def _check_template(template: str, field: str, argument: str) -> None:
    """Requires `template` to use `{field}` and no other replacement field, so `.format` cannot fail later."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise DataError(f"{argument} {template!r} is not a valid format string: {error}") from None
    if fields != {field}:
        raise DataError(f"{argument} must contain {{{field}}} and no other field, got {template!r}")


def answer_list(value) -> list[str]:
    """Answers as stripped strings, empty ones included; a string is split on ';' as in the TruthfulQA CSV."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []  # an empty cell means "no answers", not one empty answer
    if isinstance(value, str):
        items = value.split(";")
    elif isinstance(value, list | tuple):
        items = value
    else:
        items = [value]
    return ["" if item is None else str(item).strip() for item in items]


def _group_key(value):
    # Lists (e.g. chat-format prompts) are not hashable, so they are grouped by their JSON text.
    return value if isinstance(value, str | int | float | bool | None) else json.dumps(value, sort_keys=True)


DEFAULT_PROMPT_TEMPLATE = "Q: {question}\nA:"
DEFAULT_COMPLETION_TEMPLATE = " {answer}"


def _user(content) -> list[dict]:
    return content if isinstance(content, list) else [user_turn(content)]


def _assistant(content) -> list[dict]:
    return content if isinstance(content, list) else [assistant_turn(content.strip())]


def _as_chat(pair: dict) -> dict:
    """A text pair as TRL's conversational data: the prompt a user turn, chosen and rejected assistant turns."""
    chat = {
        "prompt": _user(pair["prompt"]),
        "chosen": _assistant(pair["chosen"]),
        "rejected": _assistant(pair["rejected"]),
    }
    return {**pair, **chat}


def _question_pairs(
    rows: list[dict],
    dataset: str,
    group_by: str | None,
    prompt_template: str,
    completion_template: str,
    bad: dict[int, str],
) -> list[dict]:
    """Pairs every unique correct answer with every unique incorrect answer of each question (but the `bad` rows)."""
    keep_category = "category" in column_names(rows)
    unit_ids: dict = {}
    pairs = []
    empty_answers = questions_with_empty = duplicate_answers = 0
    skipped = no_question = no_correct = no_incorrect = 0
    identical_pairs = questions_with_identical = 0
    for index, row in enumerate(rows):
        question = str(row.get("question") or "").strip()
        # Ids are given before any question is skipped, so a question's id is its place in the source.
        unit_id = unit_ids.setdefault(_group_key(row.get(group_by) if group_by else question), len(unit_ids))
        if index in bad:
            continue
        correct = answer_list(row.get("correct_answers"))
        incorrect = answer_list(row.get("incorrect_answers"))
        empty = correct.count("") + incorrect.count("")
        empty_answers += empty
        questions_with_empty += empty > 0
        unique_correct = list(dict.fromkeys(answer for answer in correct if answer))
        unique_incorrect = list(dict.fromkeys(answer for answer in incorrect if answer))
        duplicate_answers += len(correct) + len(incorrect) - empty - len(unique_correct) - len(unique_incorrect)
        if not question or not unique_correct or not unique_incorrect:
            skipped += 1
            no_question += not question
            no_correct += not unique_correct
            no_incorrect += not unique_incorrect
            continue
        overlap = len(set(unique_correct) & set(unique_incorrect))
        identical_pairs += overlap
        questions_with_identical += overlap > 0
        prompt = prompt_template.format(question=question)
        for chosen, rejected in product(unique_correct, unique_incorrect):
            pair = {
                "prompt": prompt,
                "chosen": completion_template.format(answer=chosen),
                "rejected": completion_template.format(answer=rejected),
                "question_id": unit_id,
            }
            if keep_category:
                pair["category"] = str(row.get("category") or "")
            pairs.append(pair)

    if empty_answers:
        _warn(f"{dataset}: dropped {empty_answers} empty answer(s) in {questions_with_empty} question(s)")
    if duplicate_answers:
        logger.info("%s: removed %d repeated answer(s) within questions", dataset, duplicate_answers)
    if skipped:
        _warn(
            f"{dataset}: skipped {skipped} of {len(rows)} question(s) that cannot form a pair "
            f"({no_question} without question text, {no_correct} without a correct answer, "
            f"{no_incorrect} without an incorrect answer)"
        )
    if identical_pairs:
        # Harmless for IPO/DPO (zero gradient), so they are kept, but the data contradicts itself.
        _warn(
            f"{dataset}: kept {identical_pairs} pair(s) with identical chosen and rejected text, from "
            f"{questions_with_identical} question(s) that list an answer as both correct and incorrect"
        )
    return pairs


def _preference_pairs(rows: list[dict], group_by: str | None, bad: dict[int, str]) -> list[dict]:
    """Takes prompt/chosen/rejected rows as they are (but the `bad` rows); rows sharing a prompt (or `group_by`
    value) form one unit."""
    keep_category = "category" in column_names(rows)
    unit_ids: dict = {}
    pairs = []
    for index, row in enumerate(rows):
        unit_id = unit_ids.setdefault(_group_key(row.get(group_by or "prompt")), len(unit_ids))
        if index in bad:
            continue
        pair = {column: row[column] for column in PREFERENCE_COLUMNS}
        pair["question_id"] = unit_id
        if keep_category:
            pair["category"] = row.get("category")
        pairs.append(pair)
    return pairs


class PreferenceSplits(datasets.DatasetDict):
    """The train, validation and test pairs of `load_preference_splits`, and how many bad rows it left out."""

    skipped_rows: int = 0


def _cap_pairs(pairs: list[dict], max_pairs_per_question: int, seed: int) -> list[dict]:
    """Keeps a seeded random subset of at most `max_pairs_per_question` pairs per question, in source order."""
    # A separate stream from the split's, so changing the cap never changes which question lands where.
    rng = random.Random(f"pairs-{seed}")
    by_unit: dict[int, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_unit.setdefault(pair["question_id"], []).append(index)
    kept = []
    for indices in by_unit.values():
        kept.extend(indices if len(indices) <= max_pairs_per_question else rng.sample(indices, max_pairs_per_question))
    return [pairs[index] for index in sorted(kept)]


def draw_by_question(question_ids, rows: int, seed: int) -> list[int]:
    """Indices of `rows` pairs drawn question by question, for training: each round (an epoch over the questions)
    visits every question once, in a seeded order, and takes the next of its pairs in a seeded order of them, so
    every question is seen once per round, with a fresh pair each round until its pairs are used up (then they come
    round again). The first len(set(question_ids)) rows cover every question once, however many pairs each has."""
    rng = random.Random(f"question-draw-{seed}")
    by_unit: dict = {}
    for index, unit in enumerate(question_ids):
        by_unit.setdefault(unit, []).append(index)
    if not by_unit or rows < 1:
        return []
    for indices in by_unit.values():
        rng.shuffle(indices)
    units = list(by_unit)
    drawn: list[int] = []
    round_ = 0
    while len(drawn) < rows:
        order = units[:]
        rng.shuffle(order)
        drawn.extend(by_unit[unit][round_ % len(by_unit[unit])] for unit in order[: rows - len(drawn)])
        round_ += 1
    return drawn


def load_preference_splits(
    dataset: str = "truthfulqa/truthful_qa",
    dataset_config: str | None = "generation",
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    completion_template: str = DEFAULT_COMPLETION_TEMPLATE,
    group_by: str | None = None,
    max_pairs_per_question: int | None = None,
    chat_template: bool = False,
    bad_rows: str = "refuse",
) -> PreferenceSplits:
    """Loads a question set or preference set and splits its pairs by question into train/validation/test.

    Every question (or group) lands in exactly one split: its ids are shuffled with `seed` and cut by
    `split_fractions`. Cleaning never happens silently: empty answers, skipped questions and contradictory pairs
    are reported with counts as `DataWarning`s.

    Args:
        dataset: "synthetic" or "synthetic:N"; "toy" or "toy:SETTINGS"; a local .csv (original TruthfulQA format
            or any layout below), .json, .jsonl or .parquet file; or a `datasets.load_dataset` id, optionally as
            "name:split".
        dataset_config: Config name for `datasets.load_dataset`; unused for local files and "synthetic".
        split_fractions: Fractions of questions for train, validation and test; non-negative, summing to 1.
        seed: Seed of the split, of the pair subsampling and of the synthetic generator.
        prompt_template: Builds each prompt from `{question}` (question-style data only).
        completion_template: Builds chosen and rejected from `{answer}` (question-style data only).
        group_by: Column whose values define the units kept together in one split (e.g. "category"); by
            default each question (or, for preference-style data, each prompt) is a unit.
        max_pairs_per_question: If set, keep at most this many pairs per unit, chosen at random with `seed`.
        chat_template: Give TRL's conversational pairs (for a tokenizer's chat template): the prompt a user turn
            holding the question (or the text prompt), chosen and rejected an assistant turn each holding the
            answer (stripped). The templates must then be left at their defaults.
        bad_rows: A row that cannot make a pair (`locedit.data.sources.bad_row_problem`: a value that is not text,
            an empty field, chosen equal to rejected): "refuse" raises a DataError naming its file, line and
            field; "skip" leaves it out with a `DataWarning` and counts it in `skipped_rows`.

    Returns:
        A DatasetDict (`PreferenceSplits`) with splits train, validation and test and columns prompt, chosen,
        rejected and question_id (the unit's index in order of first appearance in the source), plus category when
        the source has one. Rows keep the source order. `skipped_rows` counts the bad rows left out.

    Raises:
        DataFileNotFoundError: If a local data file does not exist.
        DataError: For bad arguments, unreadable files, missing columns or data with no usable pair.
    """
    fractions = validate_split_fractions(split_fractions)
    _check_template(prompt_template, "question", "prompt_template")
    _check_template(completion_template, "answer", "completion_template")
    defaults = (DEFAULT_PROMPT_TEMPLATE, DEFAULT_COMPLETION_TEMPLATE)
    if chat_template and (prompt_template, completion_template) != defaults:
        raise DataError(
            "chat_template puts the question in a user turn and the answer in an assistant turn of the tokenizer's "
            "chat template: prompt_template and completion_template are not used with it; leave them at their defaults"
        )
    if max_pairs_per_question is not None and (
        isinstance(max_pairs_per_question, bool)
        or not isinstance(max_pairs_per_question, int)
        or max_pairs_per_question < 1
    ):
        raise DataError(f"max_pairs_per_question must be a positive integer or None, got {max_pairs_per_question!r}")

    rows, layout, group_by, bad = load_source(dataset, dataset_config, seed, group_by, bad_rows)
    if bad:
        first = next(iter(bad.values()))
        _warn(f"{dataset}: left out {len(bad)} of {len(rows)} bad row(s) (bad_rows: skip); the first: {first}")
    if layout == "question":
        # With the chat template a user turn holds the question itself and an assistant turn the answer itself.
        templates = ("{question}", "{answer}") if chat_template else (prompt_template, completion_template)
        pairs = _question_pairs(rows, dataset, group_by, *templates, bad)
    else:
        pairs = _preference_pairs(rows, group_by, bad)
    if not pairs:
        raise DataError(f"dataset {dataset!r} gives no usable preference pair")
    if max_pairs_per_question is not None:
        pairs = _cap_pairs(pairs, max_pairs_per_question, seed)
    if chat_template:
        pairs = [_as_chat(pair) for pair in pairs]

    units = split_units(list({pair["question_id"] for pair in pairs}), fractions, seed)
    total = sum(len(members) for members in units.values())
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=True):
        if fraction > 0 and not units[name]:
            _warn(f"{dataset}: the {name} split is empty; {total} question(s) are too few for fraction {fraction}")

    split_of = {unit: name for name, members in units.items() for unit in members}
    indices = {name: [] for name in SPLIT_NAMES}
    for index, pair in enumerate(pairs):
        indices[split_of[pair["question_id"]]].append(index)
    table = datasets.Dataset.from_list(pairs)
    splits = PreferenceSplits({name: table.select(indices[name]) for name in SPLIT_NAMES})
    splits.skipped_rows = len(bad)
    logger.info(
        "%s: %d pairs from %d questions; %s",
        dataset,
        len(pairs),
        total,
        ", ".join(f"{name} {len(units[name])} questions / {splits[name].num_rows} pairs" for name in SPLIT_NAMES),
    )
    return splits


def _question_records(
    rows: list[dict], layout: str, dataset: str, group_by: str | None, bad: dict[int, str]
) -> list[dict]:
    """One record per question with its unique answers, keeping only questions that form at least one pair.

    Unit ids are given exactly as `_question_pairs` and `_preference_pairs` give them, so the records split the
    same way as the pairs of `load_preference_splits`.
    """
    unit_ids: dict = {}
    records: dict[tuple, dict] = {}
    for index, row in enumerate(rows):
        if layout == "question":
            question = str(row.get("question") or "").strip()
            unit_id = unit_ids.setdefault(_group_key(row.get(group_by) if group_by else question), len(unit_ids))
            correct = [answer for answer in answer_list(row.get("correct_answers")) if answer]
            incorrect = [answer for answer in answer_list(row.get("incorrect_answers")) if answer]
            if index in bad or not question or not correct or not incorrect:
                continue
        else:
            unit_id = unit_ids.setdefault(_group_key(row.get(group_by or "prompt")), len(unit_ids))
            if index in bad:
                continue
            if not all(isinstance(row[column], str) for column in PREFERENCE_COLUMNS):
                raise DataError(f"dataset {dataset!r}: questions need text prompts and answers, not chat messages")
            question, correct, incorrect = row["prompt"], [row["chosen"]], [row["rejected"]]
        record = records.setdefault(
            (unit_id, question),
            {"question_id": unit_id, "question": question, "correct_answers": [], "incorrect_answers": []},
        )
        record["correct_answers"] = list(dict.fromkeys(record["correct_answers"] + correct))
        record["incorrect_answers"] = list(dict.fromkeys(record["incorrect_answers"] + incorrect))
    return list(records.values())


def load_questions(
    dataset: str = "truthfulqa/truthful_qa",
    dataset_config: str | None = "generation",
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    group_by: str | None = None,
    bad_rows: str = "refuse",
) -> datasets.DatasetDict:
    """Loads the questions themselves with their answers, split exactly as `load_preference_splits` splits the pairs.

    With the same `dataset`, `dataset_config`, `split_fractions`, `seed` and `group_by`, every question lands in the
    split that holds its pairs, so a stage that needs whole questions (probing) uses the training questions only.
    Preference-style data gives one record per prompt: its chosen completions as correct answers, its rejected ones
    as incorrect. Cleaning and `bad_rows` are as for pairs (and reported there); here cleaning is silent.

    Returns:
        A DatasetDict with splits train, validation and test and columns question_id (as in the pairs), question,
        correct_answers and incorrect_answers (unique, non-empty, in source order).

    Raises:
        DataFileNotFoundError: If a local data file does not exist.
        DataError: For bad arguments, unreadable files, missing columns or data with no usable question.
    """
    fractions = validate_split_fractions(split_fractions)
    rows, layout, group_by, bad = load_source(dataset, dataset_config, seed, group_by, bad_rows)
    records = _question_records(rows, layout, dataset, group_by, bad)
    if not records:
        raise DataError(f"dataset {dataset!r} gives no question with both a correct and an incorrect answer")
    units = split_units(list({record["question_id"] for record in records}), fractions, seed)
    split_of = {unit: name for name, members in units.items() for unit in members}
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "correct_answers": datasets.Sequence(datasets.Value("string")),
            "incorrect_answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.DatasetDict(
        {
            name: _table([record for record in records if split_of[record["question_id"]] == name], features)
            for name in SPLIT_NAMES
        }
    )


def _table(records: list[dict], features) -> datasets.Dataset:
    # `Dataset.from_list([])` has no columns to match `features` to: an empty split is built from empty columns.
    if not records:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_list(records, features=features)


def pair_counts(splits: datasets.DatasetDict) -> dict[str, int]:
    """Returns the number of pairs (rows) in each split."""
    return {name: split.num_rows for name, split in splits.items()}


def question_counts(splits: datasets.DatasetDict) -> dict[str, int]:
    """Returns the number of distinct questions (units) in each split."""
    return {name: len(set(split["question_id"])) for name, split in splits.items()}


def data_layout(dataset: str, dataset_config: str | None = "generation", seed: int = 0) -> str:
    """Whether a data set is "question"-style (question, correct_answers, incorrect_answers) or "preference"-style
    (prompt, chosen, rejected): what an evaluation of it can score.

    Raises:
        DataFileNotFoundError: If a local data file does not exist.
        DataError: For a source that cannot be read or has neither layout's columns.
    """
    rows, _ = load_rows(dataset, dataset_config, seed)
    return detect_layout(column_names(rows), dataset)


def load_prompt_pairs(
    dataset: str,
    dataset_config: str | None = "generation",
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    group_by: str | None = None,
    bad_rows: str = "refuse",
) -> dict[str, list[dict]]:
    """The prompts of a preference-style source with their own pairs, split exactly as `load_preference_splits`
    splits the pairs (it makes them): what evaluating preference data scores.

    Every pair of a split is kept (`max_pairs_per_question` caps only what a run trains on), as it is: its text
    prompt, chosen and rejected. Cleaning and `bad_rows` are as for the pairs, and silent here (training reported
    them).

    Returns:
        {split name: records}, one record per prompt of the split, in source order: question_id (its unit, as in the
        pairs), question (the prompt itself), category ("" where the source has none), correct_answers and
        incorrect_answers (its chosen and rejected completions, unique, in source order), best_answer (its first
        chosen completion) and pairs ([chosen, rejected] of each of its pairs, in source order).

    Raises:
        DataError: For question-style data, chat-message pairs (evaluation needs text prompts and completions), or
            what `load_preference_splits` raises.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        splits = load_preference_splits(
            dataset, dataset_config, split_fractions, seed, group_by=group_by, bad_rows=bad_rows
        )
    records: dict[str, list[dict]] = {}
    for name, split in splits.items():
        by_prompt: dict[tuple, dict] = {}
        for pair in split:
            if not all(isinstance(pair[column], str) for column in PREFERENCE_COLUMNS):
                raise DataError(
                    f"dataset {dataset!r}: evaluating preference data needs text prompts and completions, not chat "
                    "messages (chat_template: true makes the turns from text)"
                )
            record = by_prompt.setdefault(
                (pair["question_id"], pair["prompt"]),
                {
                    "question_id": pair["question_id"],
                    "question": pair["prompt"],
                    "category": str(pair.get("category") or ""),
                    "correct_answers": [],
                    "incorrect_answers": [],
                    "best_answer": pair["chosen"],
                    "pairs": [],
                },
            )
            for key, column in (("correct_answers", "chosen"), ("incorrect_answers", "rejected")):
                if pair[column] not in record[key]:
                    record[key].append(pair[column])
            record["pairs"].append([pair["chosen"], pair["rejected"]])
        records[name] = list(by_prompt.values())
    return records


def load_question_details(dataset: str, dataset_config: str | None = "generation", seed: int = 0) -> dict[str, dict]:
    """The category and best answer of each question of a question-style source, keyed by question text.

    Complements `load_questions` for evaluation: MC1 compares the best answer with the incorrect ones, and metrics
    are reported per category. Where the source has no best answer, it is the question's first correct answer;
    where it has no category, the category is "".

    Raises:
        DataError: For preference-style data (its prompts and pairs are `load_prompt_pairs`'), or a source that
            cannot be read.
    """
    rows, _ = load_rows(dataset, dataset_config, seed)
    if detect_layout(column_names(rows), dataset) != "question":
        raise DataError(
            f"dataset {dataset!r} is preference-style (prompt/chosen/rejected): it has no question details; its "
            "prompts and pairs are load_prompt_pairs'"
        )
    details: dict[str, dict] = {}
    for row in rows:
        question = str(row.get("question") or "").strip()
        correct = [answer for answer in answer_list(row.get("correct_answers")) if answer]
        best = str(row.get("best_answer") or "").strip() or (correct[0] if correct else "")
        details.setdefault(question, {"category": str(row.get("category") or ""), "best_answer": best})
    return details
