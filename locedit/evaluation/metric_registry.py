"""The metrics, each defined once: its key, how it prints, which way is better, what it is made of, its table format
and its figure. Eval's summary (metrics.json) and W&B run, `locedit report` (its `--metric` choices, table, figures
and verdict) and the study's tables and plot all read them from here.

A metric is the product of the means over questions of its per-question fields (the records of generations.jsonl):
True*Info is the mean of `truthful` times the mean of `informative` (not the mean of per-question products), MC1 the
mean of `mc1`. A metric over pairs (`over_pairs`, preference-style data) is a mean over all pairs, not over prompts:
its two fields are a prompt's sum over its pairs and its number of pairs, and the metric is the ratio of their means
(the sum over all pairs over the number of pairs), which a bootstrap over prompts resamples as it resamples any
metric's fields. A metric without per-question fields is one number per run: KL and CE from the corpus scores, or a
`value` computed from the run's directory (plugins' study metrics, `register_study_metric`). Only a metric with
per-question fields can score head sets (`locedit report --metric`): the verdict's paired bootstrap resamples
questions.

Adding a metric is one `register_metric` call, here or in a plugin (plugins are loaded before the metrics are
listed), e.g. the number of words of each answer:

    register_metric(
        Metric("answer_words", "Words", fields=("answer_words",), per_question=lambda r: len(r["answer"].split()))
    )
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core.plugins import load_plugins
from .breakage import is_degenerate
from .similarity import FIELDS as SIMILARITY_FIELDS

MAIN = "true_info"  # the paper's metric: a head set's score unless another is named (`--metric`)
KL = "kl"  # an edit's disturbance of the model: `max_kl` tells broken edits by it, and figures draw metrics against it


@dataclass(frozen=True)
class Metric:
    key: str  # its name in metrics.json, W&B, the tables and `--metric`
    label: str  # how it prints: "True*Info", "MC2"
    fields: tuple[str, ...] = ()  # the per-question fields it is the product of the means of; () for a run's number
    higher_is_better: bool = True
    format: str = ".3f"  # its cells in the study's tables
    table: bool = True  # a column of the report's and the study's tables (else only as the report's chosen metric)
    against_kl: str | None = None  # the report figure (its file name) drawing it against KL, one panel per metric
    study_bar: bool = False  # a bar per family in the study's plot (for fractions of test questions)
    needs: str = ""  # what an evaluation needs to give it, for the error that finds no run with it
    # Computes its one field from each judged record (answer, judges' scores), where no evaluation phase writes it.
    per_question: Callable[[dict], float | None] | None = None
    # A run's number from its directory and data set (None where it does not apply), computed when a run is read.
    value: Callable[[str, str | None], float | None] | None = None
    # A mean over pairs: its fields are (a prompt's sum over its pairs, its number of pairs), the metric their ratio.
    over_pairs: bool = False

    def combine(self, means):
        """The metric from its fields' means (numbers, or numpy arrays of resampled means): their product, or for a
        metric over pairs the ratio of the sum's mean to the count's (the mean over all pairs)."""
        if self.over_pairs:
            return means[0] / means[1]
        return functools.reduce(operator.mul, means)

    def of_records(self, records: Sequence[dict]) -> float | None:
        """The metric of per-question records; None when a field has no value (a judge that did not run). Missing
        or NaN values are left out of a field's mean; a metric over pairs takes only the records that have both of
        its fields, so that the sum and the count are of the same pairs."""
        if not self.fields:
            return None
        if self.over_pairs:
            records = [r for r in records if all(_number(r.get(name)) for name in self.fields)]
        means = []
        for name in self.fields:
            values = [float(r[name]) for r in records if r.get(name) is not None and not math.isnan(float(r[name]))]
            if not values:
                return None
            means.append(sum(values) / len(values))
        return self.combine(means)

    def best(self, values: Sequence[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than


def _number(value) -> bool:
    return value is not None and not math.isnan(float(value))


# Every metric by key, in the order of the tables' columns.
METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric, after: str | None = None) -> None:
    """Add `metric` (or replace the one of its key), last or right after the metric `after`."""
    if metric.per_question is not None and len(metric.fields) != 1:
        raise ValueError(f"metric '{metric.key}' is computed per question: it needs exactly one field")
    if metric.over_pairs and len(metric.fields) != 2:
        raise ValueError(f"metric '{metric.key}' is over pairs: its fields are a sum over pairs and their count")
    METRICS.pop(metric.key, None)
    entries = list(METRICS.items())
    at = len(entries) if after is None else [key for key, _ in entries].index(after) + 1
    entries.insert(at, (metric.key, metric))
    METRICS.clear()
    METRICS.update(entries)


def all_metrics() -> list[Metric]:
    """Every metric, plugins' included, in table order."""
    load_plugins()  # importing a plugin registers its metrics
    return list(METRICS.values())


def get_metric(key: str) -> Metric:
    if key not in METRICS:
        load_plugins()
    return METRICS[key]


def per_question_metrics() -> list[Metric]:
    """The metrics made of per-question fields: the scores a report can rank head sets by."""
    return [metric for metric in all_metrics() if metric.fields]


def per_question_fields() -> tuple[str, ...]:
    """Every per-question field a metric is made of, once each."""
    return tuple(dict.fromkeys(name for metric in all_metrics() for name in metric.fields))


def factors(key: str) -> list[Metric]:
    """The one-field metrics a metric is the product of, in its fields' order: True and Info for True*Info."""
    by_field: dict[str, Metric] = {}
    for metric in all_metrics():
        if len(metric.fields) == 1:
            by_field.setdefault(metric.fields[0], metric)
    return [by_field[name] for name in get_metric(key).fields]


def add_per_question_values(records: list[dict]) -> None:
    """The fields of the metrics computed per question (`Metric.per_question`), put into each judged record."""
    for metric in all_metrics():
        if metric.per_question is not None:
            for record in records:
                record[metric.fields[0]] = metric.per_question(record)


# The metrics every evaluation can give. True and Info are the fractions of answers the judges call truthful and
# informative; MC1 and MC2 the multiple-choice scores; KL and CE the corpus scores (`locedit.evaluation.metrics`).
JUDGES = "both a truth and an info judge"
register_metric(Metric("true", "True", fields=("truthful",), needs="a truth judge", study_bar=True))
register_metric(Metric("info", "Info", fields=("informative",), needs="an info judge", study_bar=True))
register_metric(Metric("true_info", "True*Info", fields=("truthful", "informative"), needs=JUDGES, study_bar=True))
for name in ("mc1", "mc2"):
    register_metric(Metric(name, name.upper(), fields=(name,), needs="eval_mc", against_kl="fig1c_5_mc_vs_kl"))
# MC2 on the questions where a "no" style cannot win (`locedit.evaluation.style`): a gain only in MC2 is a style.
register_metric(Metric("mc2_sc", "MC2-SC", fields=("mc2_sc",), needs="eval_mc", against_kl="fig1c_5_mc_vs_kl"))
# Preference-style data (prompt/chosen/rejected): its held-out pairs scored as TRL's DPOTrainer scores a pair
# (`locedit.evaluation.preference`), each a mean over pairs. The model prefers chosen: log p(chosen | prompt) >
# log p(rejected | prompt), for any model; TRL's rewards/accuracies, rewards/margins and IPO loss compare the edited
# model with its base model (the reference), so only an edit has them.
# The per-question fields: a prompt's number of held-out pairs, and its counts and sums over them.
PAIRS, PREFERRING_CHOSEN, REWARD_ACCURATE = "pairs", "pairs_preferring_chosen", "pairs_reward_accurate"
REWARD_MARGIN, IPO_LOSS = "reward_margin_sum", "ipo_loss_sum"
PREFERENCE = "preference-style data (prompt/chosen/rejected)"
EDITED_PREFERENCE = "an edit evaluated on preference-style data (prompt/chosen/rejected)"
PREFERENCE_MAIN = "prefers_chosen"  # preference data's score where no judge ran (the report's, the study's verdict)
register_metric(
    Metric(
        PREFERENCE_MAIN,
        "Prefers chosen",
        fields=(PREFERRING_CHOSEN, PAIRS),
        over_pairs=True,
        study_bar=True,
        needs=PREFERENCE,
    )
)
register_metric(
    Metric(
        "reward_accuracy",
        "Reward accuracy",
        fields=(REWARD_ACCURATE, PAIRS),
        over_pairs=True,
        study_bar=True,
        needs=EDITED_PREFERENCE,
    )
)
register_metric(
    Metric("reward_margin", "Reward margin", fields=(REWARD_MARGIN, PAIRS), over_pairs=True, needs=EDITED_PREFERENCE)
)
register_metric(
    Metric(
        "heldout_ipo_loss",
        "IPO loss (held out)",
        fields=(IPO_LOSS, PAIRS),
        over_pairs=True,
        higher_is_better=False,
        needs=EDITED_PREFERENCE,
    )
)
# TruthfulQA's similarity numbers (`similarity` truth judge): scores a report can rank by, not table columns.
SIMILARITY_NAMES = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
for name in SIMILARITY_FIELDS:
    similarity, _, kind = name.rpartition("_")
    label = f"{SIMILARITY_NAMES[similarity]} {kind}"
    register_metric(Metric(name, label, fields=(name,), table=False, needs="the similarity truth judge"))
register_metric(Metric(KL, "KL", higher_is_better=False, needs="an edit and an eval_corpus"))
register_metric(Metric("ce", "CE", higher_is_better=False, needs="an eval_corpus"))
# KL and CE as on the corpus, on each held-out prompt of preference-style data: per-question fields, so a bootstrap
# over prompts can compare them.
register_metric(
    Metric("kl_prompts", "KL (prompts)", fields=("kl_prompt",), higher_is_better=False, needs=EDITED_PREFERENCE)
)
register_metric(Metric("ce_prompts", "CE (prompts)", fields=("ce_prompt",), higher_is_better=False, needs=PREFERENCE))
# The share of answers that are no answer (`locedit.evaluation.breakage`): one of the break detector's signs.
register_metric(
    Metric(
        "degenerate",
        "Degenerate",
        fields=("degenerate",),
        higher_is_better=False,
        study_bar=True,
        per_question=is_degenerate,
    )
)


__all__ = [
    "IPO_LOSS",
    "KL",
    "MAIN",
    "METRICS",
    "PAIRS",
    "PREFERENCE_MAIN",
    "PREFERRING_CHOSEN",
    "REWARD_ACCURATE",
    "REWARD_MARGIN",
    "Metric",
    "add_per_question_values",
    "all_metrics",
    "factors",
    "get_metric",
    "per_question_fields",
    "per_question_metrics",
    "register_metric",
]
