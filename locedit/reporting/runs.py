"""The evaluated runs the report and the study read: settings, metrics and per-question values of each
(`locedit.rundir`). Which metrics a run has, and what they are made of, is `locedit.evaluation.metric_registry`'s."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..core.errors import HeadSpecError, RecipeError
from ..evaluation.breakage import Breakage
from ..evaluation.metric_registry import all_metrics, per_question_fields
from ..heads import HeadSpec, format_heads
from ..rundir import divergence_of, find_evaluated, read_evaluation, read_heads, read_metrics, read_recipe

# The report's columns before the metrics: what a run is.
SETTINGS = ["method", "family", "heads", "heads_seed", "tau", "learning_rate", "alpha"]


@dataclass
class Run:
    """One evaluated run (or the base model): its settings, its metrics and its per-question values."""

    run_dir: str
    method: str  # ipo (an optimal edit), iti, or base
    family: str  # all-heads, probe-16, random-16, single-head, ... ("base" for the base model)
    heads: str  # the head spec it was made with: probe:16, random:16, L0H1 ("none" for the base model)
    heads_seed: int | None
    tau: float | None
    learning_rate: float | None
    alpha: float | None
    # eval/metrics.json, and the registered metrics computed from the run's directory (`Metric.value`)
    metrics: dict
    values: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)  # question_id -> field -> value
    explicit_heads: str = ""  # its heads as heads.json lists them, e.g. L0H1,L2H3 ("" for the base model)
    study_family: str | None = None  # for a run a study made, its family there (`locedit.reporting.study`)
    divergence: str | None = None  # why its training diverged (its metrics.json), None if it did not

    @property
    def head_set(self) -> tuple[str, str, int | None]:
        """Runs of the same method at the same heads, whatever their hyperparameters."""
        return (self.method, self.heads, self.heads_seed)

    @functools.cached_property
    def kind(self) -> str:
        """The kind of its head spec (random, probe, heads, ...), which the verdict's comparisons group by: random:1
        is a random head set, though its family is single-head. A spec that does not parse here (a plugin's, not
        loaded) falls back to its family's first word."""
        spec = _parsed(self.heads)
        return spec.kind if spec is not None else self.family.split("-")[0]

    def row(self, columns: list[str]) -> dict:
        settings = {f.name for f in fields(self)} - {"metrics", "values"}
        return {key: getattr(self, key) if key in settings else self.metrics.get(key) for key in columns}

    def broken_reasons(self, breakage: Breakage | None) -> list[str]:
        """Why this edit is broken by the break detector's thresholds (`breakage`; None: nothing is), [] if not."""
        if breakage is None or self.method == "base":
            return []
        return breakage.reasons(self.metrics, self.divergence)

    def is_broken(self, breakage: Breakage | None) -> bool:
        return bool(self.broken_reasons(breakage))


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


def read_run(run_dir: Path, study_family: str | None = None) -> Run:
    evaluation, records = read_evaluation(str(run_dir))
    heads = read_heads(str(run_dir))
    finished = read_metrics(str(run_dir))
    recipe = read_recipe(str(run_dir))
    method = "base" if not heads else finished.get("method", "ipo")
    names, values = per_question_fields(), {}
    for record in records:
        # Missing or NaN values are left out, as the evaluation's means leave them out.
        numbers = {name: float(record[name]) for name in names if record.get(name) is not None}
        values[int(record["question_id"])] = {name: value for name, value in numbers.items() if not math.isnan(value)}
    metrics = dict(evaluation)
    for metric in all_metrics():
        if metric.value is not None and (value := metric.value(str(run_dir), evaluation.get("dataset"))) is not None:
            metrics[metric.key] = value
    return Run(
        run_dir=str(run_dir),
        method=method,
        family=heads.get("family", "base"),
        heads=heads.get("spec", "none"),
        heads_seed=heads.get("heads_seed") if _uses_seed(heads.get("spec", "")) else None,
        tau=recipe.get("beta") if method == "ipo" else None,
        learning_rate=recipe.get("learning_rate") if method == "ipo" else None,
        alpha=finished.get("iti_alpha") if method == "iti" else None,
        metrics=metrics,
        values=values,
        explicit_heads=format_heads([tuple(head) for head in heads.get("heads", [])]),
        study_family=study_family,
        divergence=divergence_of(finished),
    )


def _parsed(spec: str) -> HeadSpec | None:
    """A run's recorded spec, parsed (None for the base model's, or a spec of a plugin not loaded here)."""
    try:
        return HeadSpec.parse(spec)
    except HeadSpecError:
        return None


def _uses_seed(spec: str) -> bool:
    """Whether a run's recorded spec drew its heads with heads_seed (a spec of a plugin not loaded here: no)."""
    parsed = _parsed(spec)
    return parsed is not None and parsed.uses_seed
