"""The evaluated runs a report reads: settings, metrics and per-question verdicts of each (`locedit.rundir`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..core.errors import HeadSpecError, RecipeError
from ..evaluation.similarity import FIELDS as SIMILARITY_FIELDS
from ..heads import HeadSpec
from ..rundir import find_evaluated, read_evaluation, read_heads, read_metrics, read_recipe

COLUMNS = [
    "method",
    "family",
    "heads",
    "heads_seed",
    "tau",
    "learning_rate",
    "alpha",
    "true",
    "info",
    "true_info",
    "mc1",
    "mc2",
    "kl",
    "ce",
    "run_dir",
]

# The scores a report can rank head sets by (`--metric`; higher is better for each), and how they read in text.
METRICS = ("true_info", "true", "info", "mc1", "mc2", *SIMILARITY_FIELDS)
LABELS = {"true_info": "True*Info", "true": "True", "info": "Info", "mc1": "MC1", "mc2": "MC2"}
# The per-question numbers of generations.jsonl a report reads (the judges' verdicts as 0/1).
PER_QUESTION = ("truthful", "informative", "mc1", "mc2", *SIMILARITY_FIELDS)


def metric_label(metric: str) -> str:
    return LABELS.get(metric, metric)


def metric_fields(metric: str) -> tuple[str, ...]:
    """The per-question fields a metric is made of: it is the product of their means over questions (True*Info is
    the one product of two, `locedit.evaluation.metrics.true_info`; every other metric is one field's mean)."""
    return {"true_info": ("truthful", "informative"), "true": ("truthful",), "info": ("informative",)}.get(
        metric, (metric,)
    )


@dataclass
class Run:
    """One evaluated run (or the base model): its settings, its metrics and its per-question verdicts."""

    run_dir: str
    method: str  # ipo (an optimal edit), iti, or base
    family: str  # all-heads, probe-16, random-16, single-head, ... ("base" for the base model)
    heads: str
    heads_seed: int | None
    tau: float | None
    learning_rate: float | None
    alpha: float | None
    metrics: dict
    verdicts: dict[int, tuple[bool, bool]] = field(default_factory=dict, repr=False)  # question_id -> (true, info)
    values: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)  # question_id -> PER_QUESTION

    @property
    def head_set(self) -> tuple[str, str, int | None]:
        """Runs of the same method at the same heads, whatever their hyperparameters."""
        return (self.method, self.heads, self.heads_seed)

    def row(self, columns=COLUMNS) -> dict:
        settings = {f.name for f in fields(self)} - {"metrics", "verdicts", "values"}
        return {key: getattr(self, key) if key in settings else self.metrics.get(key) for key in columns}

    def is_broken(self, max_kl: float | None) -> bool:
        """An edit whose KL from the base model is above `max_kl` (one without a KL cannot be told broken)."""
        kl = self.metrics.get("kl")
        return max_kl is not None and self.method != "base" and kl is not None and kl > max_kl


def find_runs(paths: list[str]) -> list[Run]:
    """Every evaluated run below the given directories (a run's `eval/metrics.json` marks it)."""
    seen, runs = set(), []
    for path in paths:
        if not Path(path).is_dir():
            raise RecipeError(f"run directory '{path}' does not exist")
        for run_dir in find_evaluated(path):
            if run_dir.resolve() not in seen:
                seen.add(run_dir.resolve())
                runs.append(read_run(run_dir))
    if not runs:
        raise RecipeError(f"no evaluated run under {', '.join(paths)} (run `locedit eval` on the run directories)")
    return runs


def read_run(run_dir: Path) -> Run:
    evaluation, records = read_evaluation(str(run_dir))
    heads = read_heads(str(run_dir))
    finished = read_metrics(str(run_dir))
    recipe = read_recipe(str(run_dir))
    method = "base" if not heads else finished.get("method", "ipo")
    verdicts, values = {}, {}
    for record in records:
        if "truthful" in record and "informative" in record:
            verdicts[int(record["question_id"])] = (bool(record["truthful"]), bool(record["informative"]))
        # Missing or NaN values are left out, as the evaluation's means leave them out.
        numbers = {key: float(record[key]) for key in PER_QUESTION if record.get(key) is not None}
        values[int(record["question_id"])] = {key: value for key, value in numbers.items() if not math.isnan(value)}
    return Run(
        run_dir=str(run_dir),
        method=method,
        family=heads.get("family", "base"),
        heads=heads.get("spec", "none"),
        heads_seed=heads.get("heads_seed") if _uses_seed(heads.get("spec", "")) else None,
        tau=recipe.get("beta") if method == "ipo" else None,
        learning_rate=recipe.get("learning_rate") if method == "ipo" else None,
        alpha=finished.get("iti_alpha") if method == "iti" else None,
        metrics=evaluation,
        verdicts=verdicts,
        values=values,
    )


def _uses_seed(spec: str) -> bool:
    """Whether a run's recorded spec drew its heads with heads_seed (a spec of a plugin not loaded here: no)."""
    try:
        return HeadSpec.parse(spec).uses_seed
    except HeadSpecError:
        return False
