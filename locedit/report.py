"""`locedit report RUN_DIR...`: the comparison the paper makes, from finished and evaluated runs.

Reads every evaluated run under the given directories (`eval/metrics.json` and `eval/generations.jsonl`, with the
run's `heads.json`, `recipe.yaml` and `metrics.json`) and writes to the report directory:

- `results.csv` and `results.md`: one row per run (method, head family, heads, tau, learning rate or alpha, True,
  Info, True*Info, MC1, MC2, KL, CE);
- the paper's figures as PNG: True*Info of ITI at probe vs random heads (fig1a), the truth-info trade-off over tau
  of optimal edits per family and of ITI (fig2_3), the best True*Info of random single heads with all heads marked
  (fig4a), MC against KL (fig1c_5);
- `verdict.md` / `verdict.json`: for each method, a permutation p-value for "probe heads score higher than random
  head sets", and for each family whether it reaches the all-heads optimum within a paired bootstrap confidence
  interval over test questions.

A head set's score is its best True*Info over the hyperparameters it was run with (tau, learning rate, alpha), as
the paper compares the best edit each location allows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .metrics import true_info
from .recipe import USER_ERRORS, RecipeError

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
        if not os.path.isdir(path):
            raise RecipeError(f"run directory '{path}' does not exist")
        for metrics_file in sorted(Path(path).glob("**/eval/metrics.json")):
            run_dir = metrics_file.parent.parent
            if run_dir.resolve() not in seen:
                seen.add(run_dir.resolve())
                runs.append(read_run(run_dir))
    if not runs:
        raise RecipeError(f"no evaluated run under {', '.join(paths)} (run `locedit eval` on the run directories)")
    return runs


def read_run(run_dir: Path) -> Run:
    evaluation = json.loads((run_dir / "eval" / "metrics.json").read_text())
    heads = _read_json(run_dir / "heads.json")
    finished = _read_json(run_dir / "metrics.json")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else {}
    method = "base" if not heads else finished.get("method", "ipo")
    verdicts = {}
    generations = run_dir / "eval" / "generations.jsonl"
    if generations.is_file():
        for line in generations.read_text().splitlines():
            record = json.loads(line)
            if "truthful" in record and "informative" in record:
                verdicts[int(record["question_id"])] = (bool(record["truthful"]), bool(record["informative"]))
    return Run(
        run_dir=str(run_dir),
        method=method,
        family=heads.get("family", "base"),
        heads=heads.get("spec", "none"),
        heads_seed=heads.get("heads_seed") if str(heads.get("spec", "")).lower().startswith("random") else None,
        tau=recipe.get("beta") if method == "ipo" else None,
        learning_rate=recipe.get("learning_rate") if method == "ipo" else None,
        alpha=finished.get("iti_alpha") if method == "iti" else None,
        metrics=evaluation,
        verdicts=verdicts,
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------------


def best_per_head_set(runs: list[Run]) -> dict[tuple, Run]:
    """For each head set, its run with the highest True*Info (over tau, learning rate, alpha)."""
    best: dict[tuple, Run] = {}
    for run in runs:
        if run.metrics.get("true_info") is None:
            continue
        if run.head_set not in best or run.metrics["true_info"] > best[run.head_set].metrics["true_info"]:
            best[run.head_set] = run
    return best


def permutation_p_value(treated: list[float], control: list[float], permutations: int = 10_000, seed: int = 0):
    """One-sided p-value that `treated` scores higher than `control` on average (a permutation test of the mean
    difference). Exact over all labelings when there are few, else Monte Carlo with the (b+1)/(m+1) correction.
    With one treated value among n control values, the smallest possible p is 1/(n+1)."""
    import itertools
    import math

    pooled = list(treated) + list(control)
    k, n = len(treated), len(pooled)
    observed = sum(treated) / k - sum(control) / len(control)
    total = sum(pooled)

    def difference(indices) -> float:
        chosen = sum(pooled[i] for i in indices)
        return chosen / k - (total - chosen) / (n - k)

    if math.comb(n, k) <= permutations:
        labelings = list(itertools.combinations(range(n), k))
        extreme = sum(difference(indices) >= observed - 1e-12 for indices in labelings)
        return extreme / len(labelings)
    rng = random.Random(seed)
    extreme = sum(difference(rng.sample(range(n), k)) >= observed - 1e-12 for _ in range(permutations))
    return (extreme + 1) / (permutations + 1)


def paired_bootstrap(run: Run, reference: Run, samples: int = 2000, seed: int = 0, level: float = 0.95):
    """Confidence interval of True*Info(run) - True*Info(reference), resampling the shared test questions."""
    questions = sorted(set(run.verdicts) & set(reference.verdicts))
    if not questions:
        return None
    rng = random.Random(seed)

    def score(r: Run, ids: list[int]) -> float:
        verdicts = [r.verdicts[q] for q in ids]
        return true_info([t for t, _ in verdicts], [i for _, i in verdicts])["true_info"]

    differences = sorted(
        score(run, ids) - score(reference, ids)
        for ids in ([rng.choice(questions) for _ in questions] for _ in range(samples))
    )
    low = differences[int((1 - level) / 2 * samples)]
    high = differences[min(samples - 1, int((1 + level) / 2 * samples))]
    return score(run, questions) - score(reference, questions), low, high


def verdict(runs: list[Run], level: float = 0.95) -> dict:
    """The statistics behind the paper's question, as numbers and as sentences."""
    best = best_per_head_set([run for run in runs if run.method != "base"])
    result: dict = {"probe_vs_random": {}, "reaches_all_heads": {}, "sentences": []}
    for method in ("iti", "ipo"):
        probe = [r.metrics["true_info"] for r in best.values() if r.method == method and r.family.startswith("probe")]
        rand = [r.metrics["true_info"] for r in best.values() if r.method == method and r.family.startswith("random")]
        if probe and rand:
            p = permutation_p_value(probe, rand)
            result["probe_vs_random"][method] = {"probe": probe, "random": rand, "p_value": p}
            name = "ITI" if method == "iti" else "optimal edits"
            result["sentences"].append(
                f"Under {name}, probe heads (best True*Info {max(probe):.3f}) against {len(rand)} random head sets "
                f"(median {sorted(rand)[len(rand) // 2]:.3f}): p = {p:.3g} (one-sided permutation test)."
            )
    optimum = [r for r in best.values() if r.method == "ipo" and r.family == "all-heads"]
    if optimum:
        reference = optimum[0]
        families: dict[str, list[Run]] = {}
        for run in best.values():
            if run.method == "ipo" and run.family != "all-heads":
                families.setdefault(run.family, []).append(run)
        for family, members in sorted(families.items()):
            intervals = [(r, paired_bootstrap(r, reference, level=level)) for r in members]
            intervals = [(r, ci) for r, ci in intervals if ci is not None]
            reaching = [r for r, (_, _, high) in intervals if high >= 0]
            result["reaches_all_heads"][family] = {
                "sets": len(intervals),
                "reaching": len(reaching),
                "intervals": {r.run_dir: ci for r, ci in intervals},
            }
            if intervals:
                result["sentences"].append(
                    f"{family}: {len(reaching)} of {len(intervals)} head sets reach the all-heads optimum "
                    f"(True*Info {reference.metrics['true_info']:.3f}) within the {level:.0%} paired bootstrap "
                    "interval over test questions."
                )
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


def write_table(runs: list[Run], output_dir: str) -> None:
    rows = [run.row() for run in sorted(runs, key=lambda r: (r.method, r.family, r.heads, r.heads_seed or 0))]
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in COLUMNS if c != "run_dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in shown) + " |")
    Path(output_dir, "results.md").write_text("\n".join(lines) + "\n")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_figures(runs: list[Run], output_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_per_head_set([run for run in runs if run.method != "base"])
    base = next((run for run in runs if run.method == "base"), None)
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(output_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    # Fig. 1a: True*Info of ITI at probe vs random heads.
    fig, ax = plt.subplots(figsize=(5, 4))
    groups = {"probe": [], "random": []}
    for run in best.values():
        for name in groups:
            if run.method == "iti" and run.family.startswith(name):
                groups[name].append(run.metrics["true_info"])
    for x, (name, values) in enumerate(groups.items()):
        sets = f"{len(values)} set" + ("s" if len(values) != 1 else "")
        ax.scatter([x] * len(values), values, alpha=0.7, label=f"{name} heads ({sets})")
    ax.set_xticks([0, 1], ["probe heads", "random heads"])
    ax.set_ylabel("True*Info (best alpha)")
    ax.set_title("ITI: probe vs random heads")
    if base:
        ax.axhline(base.metrics.get("true_info", float("nan")), color="gray", ls=":", label="base model")
    ax.legend(fontsize=7)
    save(fig, "fig1a_iti_probe_vs_random.png")

    # Fig. 2-3: the truth-info trade-off over tau (optimal edits) and alpha (ITI).
    fig, ax = plt.subplots(figsize=(6, 4.5))
    series: dict[str, list[Run]] = {}
    for run in runs:
        if run.method in ("ipo", "iti") and run.metrics.get("true") is not None:
            label = f"{'ITI' if run.method == 'iti' else 'optimal'} {_family_group(run.family)}"
            series.setdefault(label, []).append(run)
    for label, members in sorted(series.items()):
        members.sort(key=lambda r: (r.tau or 0, r.alpha or 0))
        ax.scatter([r.metrics["info"] for r in members], [r.metrics["true"] for r in members], label=label, alpha=0.7)
    if base:
        ax.scatter([base.metrics["info"]], [base.metrics["true"]], marker="*", s=150, color="black", label="base")
    ax.set_xlabel("Info")
    ax.set_ylabel("True")
    ax.set_title("Truth-info trade-off over tau (optimal edits) and alpha (ITI)")
    ax.legend(fontsize=7)
    save(fig, "fig2_3_truth_info_tradeoff.png")

    # Fig. 4a: best True*Info of random single heads, all heads marked.
    fig, ax = plt.subplots(figsize=(5, 4))
    singles = [r.metrics["true_info"] for r in best.values() if r.method == "ipo" and r.family == "single-head"]
    if singles:
        ax.hist(singles, bins=min(10, max(3, len(singles) // 2)), alpha=0.8, label=f"{len(singles)} single heads")
    for run in best.values():
        if run.method == "ipo" and run.family == "all-heads":
            ax.axvline(run.metrics["true_info"], color="red", ls="--", label="all heads")
    ax.set_xlabel("best True*Info")
    ax.set_ylabel("head count")
    ax.set_title("Optimal edits at single heads")
    ax.legend(fontsize=7)
    save(fig, "fig4a_single_heads.png")

    # Fig. 1c / 5: MC against KL.
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key in zip(axes, ("mc1", "mc2"), strict=True):
        for label, members in sorted(series.items()):
            points = [(r.metrics.get("kl"), r.metrics.get(key)) for r in members]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if points:
                ax.scatter(*zip(*points, strict=True), label=label, alpha=0.7)
        ax.set_xlabel("KL(original || edited) per token")
        ax.set_ylabel(key.upper())
        ax.set_title(f"{key.upper()} against KL")
    axes[0].legend(fontsize=7)
    save(fig, "fig1c_5_mc_vs_kl.png")
    return written


def _family_group(family: str) -> str:
    for prefix in ("probe", "random", "single", "all"):
        if family.startswith(prefix):
            return {"all": "all heads", "single": "single heads"}.get(prefix, f"{prefix} heads")
    return family


def write_verdict(result: dict, output_dir: str) -> None:
    Path(output_dir, "verdict.json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["# Verdict", ""] + [f"- {sentence}" for sentence in result["sentences"]]
    if not result["sentences"]:
        lines.append(
            "- Not enough families were evaluated for a comparison (needs probe and random head sets, "
            "or all heads and another family)."
        )
    Path(output_dir, "verdict.md").write_text("\n".join(lines) + "\n")


def log_to_wandb(output_dir: str, runs: list[Run], result: dict, figures: list[str], project: str) -> None:
    import wandb

    from .train import _have_wandb_credentials

    mode = os.environ.get("WANDB_MODE") or ("online" if _have_wandb_credentials() else "offline")
    run = wandb.init(project=project, job_type="report", mode=mode, dir=output_dir)
    table = wandb.Table(columns=COLUMNS, data=[[r.row()[c] for c in COLUMNS] for r in runs])
    run.log({"results": table, **{Path(f).stem: wandb.Image(f) for f in figures}})
    for method, stats in result["probe_vs_random"].items():
        run.summary[f"p_value/probe_vs_random/{method}"] = stats["p_value"]
    run.finish()


def write_report(runs: list[Run], output_dir: str, report_to: str = "none", project: str = "locedit") -> dict:
    """The table, the figures and the verdict of `runs` in `output_dir` (and on W&B); returns the verdict."""
    os.makedirs(output_dir, exist_ok=True)
    write_table(runs, output_dir)
    figures = write_figures(runs, output_dir)
    result = verdict(runs)
    write_verdict(result, output_dir)
    if report_to == "wandb":
        log_to_wandb(output_dir, runs, result, figures, project)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="locedit report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories, or directories holding them")
    parser.add_argument("--output_dir", default="outputs/report", help="where the table, figures and verdict go")
    parser.add_argument("--report_to", default="none", choices=["none", "wandb"])
    parser.add_argument("--wandb_project", default="locedit")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.run_dirs)
    except USER_ERRORS as err:
        print(f"locedit: error: {err}", file=sys.stderr)
        return 2
    write_report(runs, args.output_dir, args.report_to, args.wandb_project)
    print(Path(args.output_dir, "results.md").read_text())
    print(Path(args.output_dir, "verdict.md").read_text())
    print(f"locedit report: {len(runs)} runs; table, figures and verdict in {args.output_dir}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
