"""How accurate a judge is on TruthfulQA's own judge data, under two protocols, for the `cpu` judge and the
baselines it was chosen against (`locedit judge-validate`, which writes docs/judges/validation.json).

- `answers`: a seeded 10% of each question's labelled answers are held out (at least one per question); the judge
  learns from the rest. The questions are shared, as in the evaluation of the open 7B judges
  (allenai/truthfulqa-*-judge-llama2-7B: 94.5% truth, 95.7% info), and as when a judge trained on all of TruthfulQA
  judges new answers to TruthfulQA's questions, which is what `locedit eval` asks of it.
- `questions`: a seeded 20% of the questions are held out whole: what a judge meets on questions it never saw.

Methods, each one record per judge and protocol:

- `majority`: the training rows' majority label;
- `nearest`: the label of the most similar labelled answer of the same question (token F1; the majority label for
  a question without labelled answers);
- `references` (truth only): closer in token F1 to a correct reference answer than to every incorrect one;
- `probe`: a logistic probe on the frozen model's last hidden state of the answer, read after the question and its
  references (cross-fitted as in the `cpu` judge);
- `cpu-words`: the `cpu` judge's classifier on its word features alone (no model);
- `cpu`: the `cpu` judge (`locedit.evaluation.cpu_judge`).
"""

from __future__ import annotations

import platform
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .cpu_judge import CPUJudgeSettings, EncodedPools, LabelledRow, fit_judge
from .judge_features import LEXICAL, token_f1, words

PROTOCOLS = {"answers": 0.1, "questions": 0.2}
METHODS = ("majority", "nearest", "references", "probe", "cpu-words", "cpu")


def split(rows: list[LabelledRow], protocol: str, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) row indices under a protocol, drawn with `seed`."""
    fraction = PROTOCOLS[protocol]
    rng = random.Random(seed)
    by_question: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_question.setdefault(row.question, []).append(i)
    held: set[int] = set()
    if protocol == "answers":
        for question in sorted(by_question):
            indices = by_question[question]
            held.update(rng.sample(indices, max(1, round(fraction * len(indices)))))
    else:
        questions = sorted(by_question)
        for question in rng.sample(questions, round(fraction * len(questions))):
            held.update(by_question[question])
    return [i for i in range(len(rows)) if i not in held], sorted(held)


def scores_of(predictions, labels) -> dict:
    """accuracy, balanced accuracy and ROC AUC of P(yes) predictions (> 0.5 is yes) against boolean labels."""
    from sklearn.metrics import roc_auc_score

    p, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=bool)
    said = p > 0.5
    recall_yes = (said & y).sum() / max(1, y.sum())
    recall_no = (~said & ~y).sum() / max(1, (~y).sum())
    auc = roc_auc_score(y, p) if 0 < y.sum() < len(y) and len(np.unique(p)) > 1 else 0.5
    return {
        "accuracy": float((said == y).mean()),
        "balanced_accuracy": float((recall_yes + recall_no) / 2),
        "auc": float(auc),
        "n": int(len(y)),
    }


def _nearest(train: list[LabelledRow], held: list[LabelledRow]) -> list[float]:
    majority = float(sum(row.label for row in train) * 2 > len(train))
    by_question: dict[str, list[tuple[Counter, bool]]] = {}
    for row in train:
        by_question.setdefault(row.question, []).append((Counter(words(row.answer)), row.label))
    predictions = []
    for row in held:
        bag = Counter(words(row.answer))
        candidates = by_question.get(row.question)
        if not candidates:
            predictions.append(majority)
            continue
        best = max(candidates, key=lambda candidate: token_f1(bag, candidate[0]) if bag else 0.0)
        predictions.append(float(best[1]))
    return predictions


def _references(held: list[LabelledRow], encoded: EncodedPools) -> list[float]:
    predictions = []
    for row in held:
        pool = encoded.pools[row.question]
        bag = Counter(words(row.answer))
        correct = max((token_f1(bag, Counter(words(r))) for r in pool.correct), default=0.0) if bag else 0.0
        incorrect = max((token_f1(bag, Counter(words(r))) for r in pool.incorrect), default=0.0) if bag else 0.0
        predictions.append(float(correct > incorrect))
    return predictions


def _judge_held_out(judge, held: list[LabelledRow], encoded: EncodedPools) -> list[float]:
    """The fitted judge's P(yes) of held-out rows, from their vectors in `encoded` (the frozen pass read every answer
    after its question's prefix, as the judge would read a new one)."""
    predictions = [0.0] * len(held)
    by_question: dict[str, list[int]] = {}
    for i, row in enumerate(held):
        by_question.setdefault(row.question, []).append(i)
    for question, positions in by_question.items():
        source = encoded.pools[question]
        at = {text: i for i, text in enumerate(source.answers)}
        picked = [at[held[i].answer] for i in positions]
        vectors = {key: values[picked] for key, values in encoded.answers[question].items()}
        record = {"question": question, "correct_answers": source.correct, "incorrect_answers": source.incorrect}
        if question not in judge.encoded.pools:  # held out whole: the references are read with the answers
            for layer in judge.layers:
                vectors[layer] = np.concatenate([vectors[layer], encoded.references[question][layer]])
        probabilities = judge.score_encoded(question, [held[i].answer for i in positions], vectors, record)
        for i, p in zip(positions, probabilities, strict=True):
            predictions[i] = float(p)
    return predictions


def validate(
    aspect: str,
    rows: list[LabelledRow],
    encoded: EncodedPools,
    num_layers: int,
    protocol: str,
    seed: int,
    settings: CPUJudgeSettings | None = None,
    methods=METHODS,
) -> list[dict]:
    """One record per method: the judge trained on the protocol's training rows, scored on its held-out rows."""
    settings = replace(settings or CPUJudgeSettings(), seed=seed)
    train_index, held_index = split(rows, protocol, seed)
    train, held = [rows[i] for i in train_index], [rows[i] for i in held_index]
    labels = [row.label for row in held]
    encode_per_1000 = encoded.seconds / max(1, sum(len(p.answers) for p in encoded.pools.values())) * 1000
    common = {"judge": aspect, "protocol": protocol, "cpu": True, "seed": seed, "machine": platform.machine()}
    records = []

    def record(kind: str, predictions, train_seconds: float, seconds_per_1000: float, **extra) -> None:
        records.append(
            {
                **common,
                "kind": kind,
                **scores_of(predictions, labels),
                "train_seconds": round(train_seconds, 2),
                "seconds_per_1000": round(seconds_per_1000, 2),
                **extra,
            }
        )

    if "majority" in methods:
        majority = float(sum(row.label for row in train) * 2 > len(train))
        record("majority", [majority] * len(held), 0.0, 0.0)
    if "nearest" in methods:
        started = time.perf_counter()
        predictions = _nearest(train, held)
        record("nearest", predictions, 0.0, (time.perf_counter() - started) / len(held) * 1000)
    if "references" in methods and aspect == "truth":
        started = time.perf_counter()
        predictions = _references(held, encoded)
        record("references", predictions, 0.0, (time.perf_counter() - started) / len(held) * 1000)
    fitted = {}
    for kind, columns in (("cpu-words", list(range(len(LEXICAL)))), ("cpu", None)):
        if kind not in methods and not (kind == "cpu" and "probe" in methods):
            continue
        started = time.perf_counter()
        judge = fit_judge(aspect, train, encoded, settings, num_layers, columns=columns)
        fit_seconds = time.perf_counter() - started
        fitted[kind] = judge
        if kind not in methods:
            continue
        started = time.perf_counter()
        predictions = _judge_held_out(judge, held, encoded)
        judging = (time.perf_counter() - started) / len(held) * 1000
        model = kind == "cpu"
        record(
            kind,
            predictions,
            fit_seconds + (encoded.seconds if model else 0.0),
            judging + (encode_per_1000 if model else 0.0),
            fit_seconds=round(fit_seconds, 2),
            encode_seconds=round(encoded.seconds, 2) if model else 0.0,
        )
    if "probe" in methods:
        judge = fitted["cpu"]
        predictions = []
        for row in held:
            source = encoded.pools[row.question]
            index = source.answers.index(row.answer)
            reading = judge.probe_input(encoded.answers[row.question])[index : index + 1]
            logit = judge.probe.decision_function(reading)[0]
            predictions.append(float(1 / (1 + np.exp(-logit))))
        record("probe", predictions, encoded.seconds, encode_per_1000, encode_seconds=round(encoded.seconds, 2))
    return records


def rule_agreement(aspect: str, rows: list[LabelledRow]) -> dict[str, dict[str, int]]:
    """How often TruthfulQA's rules for declining and degenerate answers (`breakage.judge_rule`, which overrule judge
    models in `locedit eval`) agree with the labels of the judge data, per rule."""
    from .breakage import judge_rule

    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        rule = judge_rule(row.answer)
        if rule is not None and aspect in rule[1]:
            agree = (rule[1][aspect] > 0.5) == row.label
            entry = counts.setdefault(rule[0], {"agree": 0, "disagree": 0})
            entry["agree" if agree else "disagree"] += 1
    return counts


@dataclass
class JudgeValidationArguments:
    """`locedit judge-validate`: which judge data, seeds, protocols and methods, and where the records go."""

    judge_data: str | None = field(
        default=None,
        metadata={
            "help": "A folder with finetune_truth.jsonl, finetune_info.jsonl and TruthfulQA.csv (in it or above)."
        },
    )
    judge_base_model: str = field(default="smollm2", metadata={"help": "The frozen model the cpu judge reads with."})
    validation_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of the held-out draws."})
    validation_protocols: list[str] = field(
        default_factory=lambda: list(PROTOCOLS), metadata={"help": "answers, questions or both."}
    )
    validation_methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": "Methods to score."}
    )
    validation_output: str = field(
        default="docs/judges/validation.json", metadata={"help": "Where the records are written (JSON)."}
    )

    def __post_init__(self):
        for protocol in self.validation_protocols:
            if protocol not in PROTOCOLS:
                raise ValueError(f"validation protocol '{protocol}' is not valid; choose from {', '.join(PROTOCOLS)}")
        for method in self.validation_methods:
            if method not in METHODS:
                raise ValueError(f"validation method '{method}' is not valid; choose from {', '.join(METHODS)}")


def run_validation(args: JudgeValidationArguments, command: str = "") -> dict:
    """Every record of `validate` for both judges, each protocol and seed, written to `validation_output` (JSON) and
    returned with what made them."""
    import os

    import torch

    from ..core.files import write_json_atomic
    from .cpu_judge import encoded_pools_for, ensure_encoder_factory, num_layers_of, plan_build

    settings = CPUJudgeSettings(base_model=args.judge_base_model)

    builds = {aspect: plan_build(args.judge_data, aspect, settings) for aspect in ("truth", "info")}
    factory = ensure_encoder_factory(settings)
    layers = num_layers_of(settings.base_model)
    records = []
    for aspect, build in builds.items():
        encoded = encoded_pools_for(build, factory)
        for seed in args.validation_seeds:
            for protocol in args.validation_protocols:
                found = validate(
                    aspect, build.rows, encoded, layers, protocol, seed, settings, args.validation_methods
                )
                for record in found:
                    print(
                        f"locedit judge-validate: {aspect} {protocol} seed {seed} {record['kind']:<10} accuracy "
                        f"{record['accuracy']:.4f} balanced {record['balanced_accuracy']:.4f} AUC {record['auc']:.4f} "
                        f"(n {record['n']})",
                        flush=True,
                    )
                records += found
    result = {
        "command": command,
        "rules": {aspect: rule_agreement(aspect, build.rows) for aspect, build in builds.items()},
        "date": time.strftime("%Y-%m-%d"),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "settings": asdict(settings),
        "records": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.validation_output)), exist_ok=True)
    write_json_atomic(args.validation_output, result)
    print(f"locedit judge-validate: {len(records)} records -> {args.validation_output}", flush=True)
    return result


__all__ = [
    "METHODS",
    "PROTOCOLS",
    "JudgeValidationArguments",
    "rule_agreement",
    "run_validation",
    "scores_of",
    "split",
    "validate",
]
