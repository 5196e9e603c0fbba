"""Tests of locedit.data (preference pairs split by question) and locedit.synthetic."""

import os

# Nothing here may touch the network; set before `datasets` is imported by anything below.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402

from locedit.data import (  # noqa: E402
    DataError,
    DataWarning,
    load_preference_splits,
    load_questions,
    pair_counts,
    question_counts,
    validate_dataset_arg,
    validate_split_fractions,
)
from locedit.data.synthetic import max_synthetic_questions, synthetic_questions  # noqa: E402

TRUTHFULQA_CSV = Path(__file__).resolve().parents[2] / "shared/data/truthfulqa/TruthfulQA.csv"
needs_truthfulqa = pytest.mark.skipif(
    not TRUTHFULQA_CSV.is_file(), reason=f"TruthfulQA CSV not found at {TRUTHFULQA_CSV}"
)


def _load_quietly(dataset, **kwargs) -> datasets.DatasetDict:
    """Loads splits, ignoring the DataWarnings that the real TruthfulQA data always raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_preference_splits(str(dataset), **kwargs)


def _all_rows(splits: datasets.DatasetDict) -> list[dict]:
    return [row for name in ("train", "validation", "test") for row in splits[name].to_list()]


def _pair_set(splits: datasets.DatasetDict) -> dict[str, set]:
    return {
        name: {(r["question_id"], r["prompt"], r["chosen"], r["rejected"]) for r in split.to_list()}
        for name, split in splits.items()
    }


def _truthfulqa_hub_rows() -> list[dict]:
    """The CSV turned into the Hub's `generation` rows, the way its builder did: split on ';', strip, keep empties."""
    with TRUTHFULQA_CSV.open(newline="", encoding="utf-8-sig") as file:
        return [
            {
                "type": row["Type"],
                "category": row["Category"],
                "question": row["Question"],
                "best_answer": row["Best Answer"],
                "correct_answers": [a.strip() for a in row["Correct Answers"].strip().split(";")],
                "incorrect_answers": [a.strip() for a in row["Incorrect Answers"].strip().split(";")],
                "source": row["Source"],
            }
            for row in csv.DictReader(file)
        ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def truthfulqa() -> datasets.DatasetDict:
    if not TRUTHFULQA_CSV.is_file():
        pytest.skip(f"TruthfulQA CSV not found at {TRUTHFULQA_CSV}")
    return _load_quietly(TRUTHFULQA_CSV)


# --- TruthfulQA: counts and the question-level split ---------------------------------------------------------------


@needs_truthfulqa
def test_truthfulqa_has_817_questions_in_disjoint_splits(truthfulqa):
    ids = {name: set(split["question_id"]) for name, split in truthfulqa.items()}
    prompts = {name: set(split["prompt"]) for name, split in truthfulqa.items()}
    assert set(truthfulqa) == {"train", "validation", "test"}
    assert sum(len(v) for v in ids.values()) == 817
    assert set().union(*ids.values()) == set(range(817))  # ids are the source order
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b]
        assert not prompts[a] & prompts[b]
    for split in truthfulqa.values():
        assert {"prompt", "chosen", "rejected", "question_id", "category"} <= set(split.column_names)


@needs_truthfulqa
def test_truthfulqa_pairs_are_the_product_of_unique_answers(truthfulqa):
    # Independent count straight from the CSV.
    expected = {}
    with TRUTHFULQA_CSV.open(newline="", encoding="utf-8") as file:
        for index, row in enumerate(csv.DictReader(file)):
            correct = {a.strip() for a in row["Correct Answers"].split(";") if a.strip()}
            incorrect = {a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()}
            expected[index] = len(correct) * len(incorrect)
    rows = _all_rows(truthfulqa)
    assert Counter(row["question_id"] for row in rows) == expected
    assert len(rows) == sum(expected.values()) == 10_878
    assert len({(r["question_id"], r["chosen"], r["rejected"]) for r in rows}) == 10_878  # no repeated pair
    no_comment = {r["question_id"] for r in rows if " ".join(r["chosen"].split()).startswith("I have no comment")}
    assert len(no_comment) == 110


@needs_truthfulqa
def test_truthfulqa_split_sizes_follow_fractions(truthfulqa):
    assert 6200 <= pair_counts(truthfulqa)["train"] <= 6800
    assert question_counts(truthfulqa) == {"train": 490, "validation": 164, "test": 163}  # 817 * (0.6, 0.2, 0.2)

    other = _load_quietly(TRUTHFULQA_CSV, split_fractions=(0.5, 0.0, 0.5))
    assert question_counts(other) == {"train": 408, "validation": 0, "test": 409}
    assert other["validation"].column_names == other["train"].column_names  # empty split keeps the schema


@needs_truthfulqa
def test_truthfulqa_warns_with_counts_about_its_own_quirks():
    # Stray ';' at the end of 29 cells, and "Unknown" listed as both correct and incorrect in 2 questions.
    with pytest.warns(DataWarning) as record:
        load_preference_splits(str(TRUTHFULQA_CSV))
    messages = [str(w.message) for w in record]
    assert any("dropped 31 empty answer(s) in 29 question(s)" in m for m in messages)
    assert any("kept 2 pair(s) with identical chosen and rejected" in m for m in messages)


@needs_truthfulqa
def test_seed_reproduces_the_split_and_another_seed_changes_it(truthfulqa):
    again = _load_quietly(TRUTHFULQA_CSV, seed=0)
    other = _load_quietly(TRUTHFULQA_CSV, seed=1)
    assert _pair_set(again) == _pair_set(truthfulqa)
    assert all(again[name]["prompt"] == truthfulqa[name]["prompt"] for name in truthfulqa)  # same order too
    assert set(other["test"]["question_id"]) != set(truthfulqa["test"]["question_id"])
    assert question_counts(other) == question_counts(truthfulqa)


@needs_truthfulqa
def test_templates_are_applied(truthfulqa):
    row = truthfulqa["train"][0]
    assert row["prompt"].startswith("Q: ") and row["prompt"].endswith("\nA:")
    assert all(text.startswith(" ") and not text.startswith("  ") for text in truthfulqa["train"]["chosen"])
    assert all(text.startswith(" ") for text in truthfulqa["train"]["rejected"])

    custom = _load_quietly(
        TRUTHFULQA_CSV, prompt_template="Question: {question}\nAnswer:", completion_template=" {answer}."
    )
    assert custom["train"][0]["prompt"] == row["prompt"].replace("Q: ", "Question: ").replace("\nA:", "\nAnswer:")
    assert custom["train"][0]["chosen"] == row["chosen"] + "."
    with pytest.raises(DataError, match="prompt_template"):
        load_preference_splits(str(TRUTHFULQA_CSV), prompt_template="Q: {q}\nA:")


@needs_truthfulqa
def test_max_pairs_per_question_caps_without_moving_questions(truthfulqa):
    capped = _load_quietly(TRUTHFULQA_CSV, max_pairs_per_question=4)
    rows = _all_rows(capped)
    full_counts = Counter(r["question_id"] for r in _all_rows(truthfulqa))
    assert Counter(r["question_id"] for r in rows) == {q: min(n, 4) for q, n in full_counts.items()}
    assert {n: set(s["question_id"]) for n, s in capped.items()} == {
        n: set(s["question_id"]) for n, s in truthfulqa.items()
    }
    capped_pairs, full_pairs = _pair_set(capped), _pair_set(truthfulqa)
    assert capped_pairs == _pair_set(_load_quietly(TRUTHFULQA_CSV, max_pairs_per_question=4))
    assert all(capped_pairs[name] <= full_pairs[name] for name in full_pairs)


# --- Other sources of the same questions -------------------------------------------------------------------------


@needs_truthfulqa
def test_hub_path_gives_the_same_pairs_as_the_csv(truthfulqa, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(_truthfulqa_hub_rows())})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = _load_quietly("truthfulqa/truthful_qa")
    assert calls == [("truthfulqa/truthful_qa", "generation", None)]
    assert _pair_set(hub) == _pair_set(truthfulqa)

    _load_quietly("truthfulqa/truthful_qa:validation")
    assert calls[-1] == ("truthfulqa/truthful_qa", "generation", "validation")


@needs_truthfulqa
def test_json_and_parquet_files_give_the_same_pairs_as_the_csv(truthfulqa, tmp_path):
    table = datasets.Dataset.from_list(_truthfulqa_hub_rows())
    table.to_json(tmp_path / "tqa.json")  # JSON Lines, as datasets writes it
    table.to_parquet(tmp_path / "tqa.parquet")
    # A JSON array of records with answers as ';'-separated strings, as a hand-made export might be.
    records = [dict(row, correct_answers="; ".join(row["correct_answers"])) for row in table.to_list()]
    (tmp_path / "array.json").write_text(json.dumps(records), encoding="utf-8")
    for name in ("tqa.json", "tqa.parquet", "array.json"):
        assert _pair_set(_load_quietly(tmp_path / name)) == _pair_set(truthfulqa), name


# --- Preference-style files -----------------------------------------------------------------------------------------


def test_preference_jsonl_is_used_as_is_and_grouped(tmp_path):
    rows = [
        {"prompt": f"P{i}", "chosen": f" good {i}", "rejected": f" bad {i}", "topic": f"t{i % 5}"} for i in range(40)
    ]
    rows.append({"prompt": "P0", "chosen": " also good", "rejected": " also bad", "topic": "t0"})
    path = _write_jsonl(tmp_path / "prefs.jsonl", rows)

    by_topic = load_preference_splits(str(path), group_by="topic", split_fractions=(0.6, 0.2, 0.2))
    assert sum(pair_counts(by_topic).values()) == 41
    assert question_counts(by_topic) == {"train": 3, "validation": 1, "test": 1}
    topic_of = {row["prompt"]: row["topic"] for row in rows}
    topics = {name: {topic_of[p] for p in split["prompt"]} for name, split in by_topic.items()}
    assert not (topics["train"] & topics["validation"] or topics["train"] & topics["test"])
    assert not topics["validation"] & topics["test"]
    assert by_topic["train"][0]["chosen"].startswith(" good")  # no template applied

    by_prompt = load_preference_splits(str(path))
    assert sum(question_counts(by_prompt).values()) == 40  # the repeated prompt P0 is one unit
    prompts = [set(split["prompt"]) for split in by_prompt.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def _preference_rows(count: int = 10) -> list[dict]:
    return [{"prompt": f"P{i}", "chosen": " yes", "rejected": " no"} for i in range(count)]


BAD_PREFERENCE_ROWS = {
    "empty": ({"chosen": "  "}, "field 'chosen' is empty"),
    "missing": ({"rejected": None}, "field 'rejected' is missing"),
    "number": ({"chosen": 42}, "field 'chosen' holds a number (42), not text"),
    "object": ({"prompt": {"text": "P"}}, "field 'prompt' holds an object ({'text': 'P'}), not text"),
    "same": ({"chosen": " no "}, "chosen and rejected are the same, so the pair carries no preference"),
}


@pytest.mark.parametrize("change, needle", BAD_PREFERENCE_ROWS.values(), ids=BAD_PREFERENCE_ROWS.keys())
def test_a_bad_preference_row_is_refused_naming_its_file_line_and_field(tmp_path, change, needle):
    rows = _preference_rows()
    rows[3].update(change)
    path = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_preference_splits(str(path))
    assert str(error.value) == (
        f"{path}:4: {needle}; fix the data, or set bad_rows: skip to leave such rows out (counted)"
    )


def test_bad_rows_are_located_in_csv_json_and_parquet_files_and_counted(tmp_path):
    rows = _preference_rows()
    rows[2]["chosen"] = ""
    rows[6]["rejected"] = " yes"
    table = datasets.Dataset.from_list(rows)
    table.to_csv(tmp_path / "prefs.csv", index=False)
    (tmp_path / "prefs.json").write_text(json.dumps(rows), encoding="utf-8")
    table.to_parquet(tmp_path / "prefs.parquet")
    # The CSV's header is its line 1; JSON and parquet records are counted from 1.
    places = {"prefs.csv": ":4", "prefs.json": ": record 3", "prefs.parquet": ": record 3"}
    for name, place in places.items():
        with pytest.raises(DataError, match=r"\(2 bad rows in all\)") as error:
            load_preference_splits(str(tmp_path / name))
        assert str(error.value).startswith(f"{tmp_path / name}{place}: field 'chosen' is empty"), name


def test_bad_rows_skip_leaves_them_out_with_a_count_and_keeps_question_ids(tmp_path):
    rows = _preference_rows()
    rows[3]["chosen"] = "  "
    rows[7]["rejected"] = [1, 2]
    path = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.warns(
        DataWarning, match=r"left out 2 of 10 bad row\(s\) \(bad_rows: skip\); the first: .*prefs.jsonl:4"
    ):
        splits = load_preference_splits(str(path), split_fractions=(1.0, 0.0, 0.0), bad_rows="skip")
    assert splits.skipped_rows == 2 and pair_counts(splits)["train"] == 8
    assert sorted(splits["train"]["question_id"]) == [0, 1, 2, 4, 5, 6, 8, 9]  # ids are places in the source
    questions = load_questions(str(path), split_fractions=(1.0, 0.0, 0.0), bad_rows="skip")
    assert sorted(questions["train"]["question_id"]) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert load_preference_splits(str(_write_jsonl(tmp_path / "ok.jsonl", _preference_rows()))).skipped_rows == 0
    with pytest.raises(DataError, match="bad_rows 'drop' is not valid; valid: refuse, skip"):
        load_preference_splits(str(path), bad_rows="drop")


def test_chat_messages_are_text_and_question_rows_need_text_answers(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": " yes", "rejected": " no"} for i in range(5)]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    assert sum(pair_counts(load_preference_splits(str(path))).values()) == 5
    questions = [
        {"question": "Q1?", "correct_answers": ["a"], "incorrect_answers": ["b"]},
        {"question": "Q2?", "correct_answers": ["c", 3], "incorrect_answers": ["d"]},
    ]
    path = _write_jsonl(tmp_path / "q.jsonl", questions)
    for load in (load_preference_splits, load_questions):
        with pytest.raises(
            DataError, match=r"q.jsonl:2: field 'correct_answers' holds a list \(\['c', 3\]\), not text"
        ):
            load(str(path))


# --- Bad data and bad arguments -------------------------------------------------------------------------------------


def test_missing_column_is_named_with_the_columns_found(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "correct_answers": ["a"], "wrong": ["b"]}])
    with pytest.raises(DataError, match="incorrect_answers") as error:
        load_preference_splits(str(path))
    assert "found columns: question, correct_answers, wrong" in str(error.value)

    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": " a", "rejected": " b"}])
    with pytest.raises(DataError, match="group_by column 'topic'"):
        load_preference_splits(str(path), group_by="topic")


def _write_truthfulqa_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Writes (question, correct, incorrect) rows in the original TruthfulQA CSV format."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
        )
        for question, correct, incorrect in rows:
            writer.writerow(["Adversarial", "Test", question, correct.split(";")[0], correct, incorrect, "made up"])
    return path


def test_question_without_incorrect_answer_is_skipped_with_a_count(tmp_path):
    path = _write_truthfulqa_csv(
        tmp_path / "qa.csv",
        [("Q1?", "a; b", "x"), ("Q2?", "c", ""), ("Q3?", "d", "y; z"), ("Q4?", "", "w")],
    )
    with pytest.warns(DataWarning, match=r"skipped 2 of 4 question\(s\)") as record:
        splits = load_preference_splits(str(path), split_fractions=(1.0, 0.0, 0.0))
    assert "1 without a correct answer, 1 without an incorrect answer" in str(record[0].message)
    assert sorted(set(splits["train"]["question_id"])) == [0, 2]  # ids keep the source position
    assert pair_counts(splits) == {"train": 4, "validation": 0, "test": 0}


def test_empty_answers_are_dropped_with_a_count(tmp_path):
    path = _write_truthfulqa_csv(tmp_path / "qa.csv", [("Q1?", "a; ; b;", "x;"), ("Q2?", "c; c", "y")])
    with pytest.warns(DataWarning, match=r"dropped 3 empty answer\(s\) in 1 question\(s\)"):
        splits = load_preference_splits(str(path), split_fractions=(1.0, 0.0, 0.0))
    assert splits["train"]["chosen"] == [" a", " b", " c"]  # the repeated " c" gives one pair, not two
    assert splits["train"]["rejected"] == [" x", " x", " y"]


def test_missing_file_raises_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "nope.csv"
    for call in (validate_dataset_arg, load_preference_splits):
        with pytest.raises(FileNotFoundError, match="nope.csv") as error:
            call(str(missing))
        assert isinstance(error.value, DataError)  # one `except DataError` covers every user error
    with pytest.raises(FileNotFoundError):
        validate_dataset_arg("./data/qa")  # a path, even without an extension
    validate_dataset_arg("truthfulqa/truthful_qa")  # a Hub id is not checked without loading

    unsupported = tmp_path / "qa.tsv"
    unsupported.write_text("question\tanswer\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported type"):
        validate_dataset_arg(str(unsupported))


@pytest.mark.parametrize("fractions", [(0.6, 0.2), (0.6, 0.3, 0.3), (1.2, -0.1, -0.1), (0.5, 0.5, float("nan"))])
def test_bad_split_fractions_are_rejected(fractions):
    with pytest.raises(DataError, match="split_fractions"):
        validate_split_fractions(fractions)
    with pytest.raises(DataError, match="split_fractions"):
        load_preference_splits("synthetic", split_fractions=fractions)


# --- Synthetic questions --------------------------------------------------------------------------------------------


def test_synthetic_questions_are_deterministic_and_well_formed():
    questions = synthetic_questions(120, seed=0)
    assert questions == synthetic_questions(120, seed=0)
    assert questions != synthetic_questions(120, seed=1)
    assert len({q["question"] for q in questions}) == 120
    for q in questions:
        assert set(q) == {"question", "correct_answers", "incorrect_answers", "category", "best_answer"}
        assert 2 <= len(q["correct_answers"]) <= 3 and 2 <= len(q["incorrect_answers"]) <= 4
        assert not set(q["correct_answers"]) & set(q["incorrect_answers"])
        assert q["best_answer"] in q["correct_answers"]
        assert all(len(answer.split()) <= 8 for answer in q["correct_answers"] + q["incorrect_answers"])
    assert len({q["category"] for q in questions}) >= 3
    every = synthetic_questions(max_synthetic_questions(), seed=3)
    assert len({q["question"] for q in every}) == max_synthetic_questions()
    with pytest.raises(ValueError):
        synthetic_questions(max_synthetic_questions() + 1)


def test_synthetic_dataset_loads_and_splits_deterministically():
    splits = load_preference_splits("synthetic")
    assert question_counts(splits) == {"train": 72, "validation": 24, "test": 24}
    assert _pair_set(splits) == _pair_set(load_preference_splits("synthetic"))
    assert _pair_set(splits) != _pair_set(load_preference_splits("synthetic", seed=1))
    assert splits["train"][0]["prompt"].startswith("Q: ") and splits["train"][0]["chosen"].startswith(" ")

    small = load_preference_splits("synthetic:40")
    assert sum(question_counts(small).values()) == 40
    with pytest.raises(DataError, match="synthetic:N"):
        validate_dataset_arg("synthetic:lots")
