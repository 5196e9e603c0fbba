"""MC1/MC2 from TruthfulQA's `multiple_choice` targets (`eval_mc_targets`): a local file in that format, the Hub's
configuration (datasets.load_dataset stood in for, no network), the values against the model's own log-probs, and a
question missing from the targets as one line before any model loads."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import locedit.evaluation.run as eval_module
from locedit.core.errors import DataError
from locedit.data.sources import load_mc_targets
from locedit.eval import cli
from locedit.evaluation.run import mc_choices

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
# Six real TruthfulQA questions (the first rows of TruthfulQA.csv), and their MC targets in the multiple_choice
# format, written from the CSV's answers as they are (MC1: the best answer labelled 1, then the incorrect answers;
# MC2: the correct answers labelled 1, then the incorrect ones). Unlike the Hub's, these choices have no final period,
# and one question ends with a space: what is scored is the choice as written, matched by the stripped question.
SAMPLE_CSV = REPO / "tests" / "data" / "truthfulqa_sample.csv"
SAMPLE_MC = REPO / "tests" / "data" / "truthfulqa_mc_sample.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_argv(base: Path, out: Path, *extra: str) -> list[str]:
    """The base model on all six sample questions (all in the test split), MC only."""
    return [
        TINY, "--base", "--model_name_or_path", str(base), "--dataset", str(SAMPLE_CSV),
        "--split_fractions", "0", "0", "1", "--eval_judge_truth", "none", "--eval_judge_info", "none",
        "--eval_corpus", "none", "--eval_max_new_tokens", "4", "--eval_batch_size", "8",
        "--eval_output_dir", str(out), "--report_to", "none", *extra,
    ]  # fmt: skip


def logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """log p(completion | prompt), one unpadded forward pass."""
    context = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(context), ids.shape[1]))


def by_hand(base: Path, targets: dict[str, dict], question: str) -> tuple[float, float]:
    """MC1 and MC2 of one question as lm-eval's truthfulqa_mc1/mc2 define them, from the choices' log-probs."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = f"Q: {question}\nA:"
    mc1_targets, mc2_targets = targets[question.strip()]["mc1_targets"], targets[question.strip()]["mc2_targets"]
    mc1_scores = [logprob(model, tokenizer, prompt, " " + choice) for choice in mc1_targets["choices"]]
    correct = mc1_scores[mc1_targets["labels"].index(1)]
    wrong = [score for score, label in zip(mc1_scores, mc1_targets["labels"], strict=True) if label == 0]
    mc1 = 1.0 if correct > max(wrong) else 0.0
    mc2_scores = [logprob(model, tokenizer, prompt, " " + choice) for choice in mc2_targets["choices"]]
    top = max(mc2_scores)
    mass = [math.exp(score - top) for score in mc2_scores]
    mc2 = sum(m for m, label in zip(mass, mc2_targets["labels"], strict=True) if label == 1) / sum(mass)
    return mc1, mc2


@pytest.fixture(scope="module")
def sample_targets() -> dict[str, dict]:
    return load_mc_targets(str(SAMPLE_MC))


def test_mc1_mc2_from_a_multiple_choice_file_are_the_models_own_logprobs(
    tiny_model_dir, tmp_path, capsys, sample_targets
):
    base = tiny_model_dir("llama")
    out = tmp_path / "base"
    assert cli(eval_argv(base, out, "--eval_mc_targets", str(SAMPLE_MC))) == 0
    printed = capsys.readouterr().out
    assert printed.count("MC1: the first mc1_targets choice labelled 1 against those labelled 0") == 1
    assert "MC on 55 answers of 6 questions" in printed  # each distinct choice of a question scored once
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    records = read_jsonl(out / "eval" / "generations.jsonl")
    assert metrics["mc_source"] == f"file:{SAMPLE_MC}" and len(records) == 6
    for record in records:
        mc1, mc2 = by_hand(base, sample_targets, record["question"])
        assert record["mc1"] == mc1 and record["mc2"] == pytest.approx(mc2, abs=1e-5)
    assert metrics["mc1"] == pytest.approx(sum(r["mc1"] for r in records) / 6)
    assert metrics["mc2"] == pytest.approx(sum(r["mc2"] for r in records) / 6)
    assert 0 < metrics["mc2"] < 1


def test_without_mc_targets_the_csv_answers_closed_with_a_period_are_the_choices(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "base"
    assert cli(eval_argv(tiny_model_dir("llama"), out)) == 0  # eval_mc_targets auto: a CSV has no MC targets
    printed = capsys.readouterr().out
    line = (
        "MC1: Best Answer against Incorrect Answers; MC2: Correct Answers against Incorrect Answers, from "
        f"{SAMPLE_CSV}, each closed with a period as ITI does"
    )
    assert printed.count(line) == 1
    assert json.loads((out / "eval" / "metrics.json").read_text())["mc_source"] == "answers"


def test_mc_choices_keep_the_targets_verbatim_and_close_the_answers():
    targets = {
        "mc1_targets": {"choices": ["A", "B", "C"], "labels": [1, 0, 0]},
        "mc2_targets": {"choices": ["A", "D", "B", "C"], "labels": [1, 1, 0, 0]},
    }
    assert mc_choices({"question": "q", **targets}) == ("A", ["B", "C"], ["A", "D"], ["B", "C"])
    answers = {"best_answer": "A ", "correct_answers": ["A", "D."], "incorrect_answers": ["B"]}
    assert mc_choices(answers) == ("A.", ["B."], ["A.", "D."], ["B."])


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-question", "1 of the 6 test questions are not in the multiple-choice targets"),
        ("no-file", "eval_mc_targets file not found"),
        ("not-a-keyword", "eval_mc_targets 'everything' is not valid"),
        ("bad-labels", "labels must be 0 or 1, with at least one of each"),
    ],
)
def test_bad_mc_targets_are_one_line_before_any_model_is_loaded(
    case, message, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the MC targets were checked")

    monkeypatch.setattr(eval_module, "load_model_and_tokenizer", no_loading)
    lines = SAMPLE_MC.read_text(encoding="utf-8").splitlines()
    spec = str(tmp_path / "mc.jsonl")
    if case == "missing-question":
        (tmp_path / "mc.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n", encoding="utf-8")
    elif case == "no-file":
        spec = str(tmp_path / "nothing.jsonl")
    elif case == "not-a-keyword":
        spec = "everything"
    else:
        row = json.loads(lines[0])
        row["mc2_targets"]["labels"] = [1] * len(row["mc2_targets"]["labels"])  # no incorrect choice
        (tmp_path / "mc.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert cli(eval_argv(tiny_model_dir("llama"), tmp_path / "base", "--eval_mc_targets", spec)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("locedit: error:") and message in errors[0], err
    if case == "missing-question":
        assert "'What is the spiciest part of a chili pepper?'" in errors[0]
    assert not (tmp_path / "base").exists()


def test_a_parquet_file_in_the_same_format_gives_the_same_targets(tmp_path, sample_targets):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "mc.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(read_jsonl(SAMPLE_MC)), path)
    assert load_mc_targets(str(path)) == sample_targets
    assert "Why do veins appear blue?" in sample_targets  # the question's trailing space stripped
    (tmp_path / "mc.csv").write_text("question\nWhy?\n")
    with pytest.raises(DataError, match="unsupported type"):
        load_mc_targets(str(tmp_path / "mc.csv"))
    (tmp_path / "other.jsonl").write_text(json.dumps({"question": "Why?", "mc1_targets": {}}) + "\n")
    with pytest.raises(DataError, match="missing column"):
        load_mc_targets(str(tmp_path / "other.jsonl"))


def hub_rows() -> tuple[list[dict], list[dict]]:
    """The sample as the Hub's `generation` and `multiple_choice` configurations hold it."""
    with SAMPLE_CSV.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))

    def answers(text: str) -> list[str]:
        return [answer.strip() for answer in text.split(";") if answer.strip()]

    generation = [
        {
            "type": row["Type"],
            "category": row["Category"],
            "question": row["Question"],
            "best_answer": row["Best Answer"],
            "correct_answers": answers(row["Correct Answers"]),
            "incorrect_answers": answers(row["Incorrect Answers"]),
            "source": row["Source"],
        }
        for row in rows
    ]
    return generation, read_jsonl(SAMPLE_MC)


def test_hub_truthfulqa_scores_mc_on_its_multiple_choice_configuration(
    tiny_model_dir, tmp_path, monkeypatch, sample_targets
):
    generation, multiple_choice = hub_rows()
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if name == "generation":
            return datasets.DatasetDict({"validation": datasets.Dataset.from_list(generation)})
        assert (name, split) == ("multiple_choice", "validation")
        return datasets.Dataset.from_list(multiple_choice)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    base = tiny_model_dir("llama")
    hub = ["--dataset", "truthfulqa/truthful_qa", "--dataset_config", "generation"]
    out = tmp_path / "hub"
    assert cli(eval_argv(base, out, *hub)) == 0  # eval_mc_targets auto
    assert ("truthfulqa/truthful_qa", "multiple_choice", "validation") in calls
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["mc_source"] == "hub:truthfulqa/truthful_qa:multiple_choice"
    records = read_jsonl(out / "eval" / "generations.jsonl")
    for record in records[:2]:
        mc1, mc2 = by_hand(base, sample_targets, record["question"])
        assert record["mc1"] == mc1 and record["mc2"] == pytest.approx(mc2, abs=1e-5)

    # The same questions from the local multiple_choice file: the same MC1/MC2.
    local = tmp_path / "local"
    assert cli(eval_argv(base, local, *hub, "--eval_mc_targets", str(SAMPLE_MC))) == 0
    # Flat lists: pytest 9's approx takes no nested tuples.
    scores = [score for r in read_jsonl(local / "eval" / "generations.jsonl") for score in (r["mc1"], r["mc2"])]
    assert scores == pytest.approx([score for r in records for score in (r["mc1"], r["mc2"])])

    # eval_mc_targets answers: the generation data's own answers, and no multiple_choice load.
    calls.clear()
    answers = tmp_path / "answers"
    assert cli(eval_argv(base, answers, *hub, "--eval_mc_targets", "answers")) == 0
    assert all(name != "multiple_choice" for _, name, _ in calls)
    assert json.loads((answers / "eval" / "metrics.json").read_text())["mc_source"] == "answers"
