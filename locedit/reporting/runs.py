"""The evaluated runs a report reads: settings, metrics and per-question verdicts of each (`locedit.rundir`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import RecipeError
from ..heads import is_random_spec
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

    @property
    def head_set(self) -> tuple[str, str, int | None]:
        """Runs of the same method at the same heads, whatever their hyperparameters."""
        return (self.method, self.heads, self.heads_seed)

    def row(self) -> dict:
        values = {key: self.metrics.get(key) for key in ("true", "info", "true_info", "mc1", "mc2", "kl", "ce")}
        return {key: value for key, value in {**asdict(self), **values}.items() if key in COLUMNS}


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
    verdicts = {}
    for record in records:
        if "truthful" in record and "informative" in record:
            verdicts[int(record["question_id"])] = (bool(record["truthful"]), bool(record["informative"]))
    return Run(
        run_dir=str(run_dir),
        method=method,
        family=heads.get("family", "base"),
        heads=heads.get("spec", "none"),
        heads_seed=heads.get("heads_seed") if is_random_spec(heads.get("spec", "")) else None,
        tau=recipe.get("beta") if method == "ipo" else None,
        learning_rate=recipe.get("learning_rate") if method == "ipo" else None,
        alpha=finished.get("iti_alpha") if method == "iti" else None,
        metrics=evaluation,
        verdicts=verdicts,
    )
