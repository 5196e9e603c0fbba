"""TruthfulQA's judge data: the aspect a judge prompt asks about, and the prompt/completion rows of a judge data set.

The lowest of the judge modules: the judges, the cpu judge and judge training all read judge data through it.
"""

from __future__ import annotations

import json
import os

from ..core.errors import DataError, RecipeError

# The aspect a judge measures -> the word its prompt ends in (TruthfulQA's end-to-end format).
ASPECTS = {"truth": "True", "info": "Helpful"}


def aspect_of_prompt(prompt: str) -> str | None:
    """'truth' or 'info' for a judge prompt ending in 'True:' or 'Helpful:', else None."""
    return next((aspect for aspect, label in ASPECTS.items() if prompt.rstrip().endswith(f"\n{label}:")), None)


def load_judge_data(source: str) -> list[dict]:
    """prompt/completion rows of a local JSON Lines/JSON file or a Hub data set, checked to be judge data."""
    import datasets

    if not source:
        raise RecipeError(
            "judge-train needs --judge_data: TruthfulQA's data/finetune_truth.jsonl or finetune_info.jsonl"
        )
    path = os.path.expanduser(source)
    if source.endswith((".json", ".jsonl")) or os.path.exists(path):
        if not os.path.isfile(path):
            raise DataError(f"judge data file not found: {source}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            loaded = json.loads(text) if path.endswith(".json") else None
        except json.JSONDecodeError:
            loaded = None  # JSON Lines under a .json name
        try:
            loaded = loaded if loaded is not None else [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DataError(f"judge data '{source}' is not JSON Lines: {err.msg}") from None
    else:
        name, _, split = source.partition(":")
        try:
            loaded = datasets.load_dataset(name, split=split or "train").to_list()
        except (ConnectionError, FileNotFoundError, ValueError) as err:
            raise DataError(f"could not load judge data '{source}': {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, list) or not all(isinstance(row, dict) for row in loaded):
        raise DataError(f"judge data '{source}' must be records with prompt and completion fields")
    missing = [column for column in ("prompt", "completion") if any(column not in row for row in loaded)]
    if missing:
        raise DataError(f"judge data '{source}' has records without {' or '.join(missing)} (need both)")
    rows = [{"prompt": str(row["prompt"]), "completion": str(row["completion"])} for row in loaded]
    labels = {row["completion"].strip() for row in rows}
    if not rows or not labels <= {"yes", "no"}:
        raise DataError(f"judge data '{source}': completions must be ' yes' or ' no', found {sorted(labels)[:5]}")
    aspects = {aspect_of_prompt(row["prompt"]) for row in rows}
    if None in aspects or len(aspects) != 1:
        raise DataError(
            f"judge data '{source}': every prompt must end in '\\nTrue:' (truth) or every one in '\\nHelpful:' (info)"
        )
    return rows
