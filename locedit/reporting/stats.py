"""The statistics behind the paper's question: is a location better than random ones, does it reach all heads?"""

from __future__ import annotations

import functools
import random

import numpy as np
from scipy import stats

from ..evaluation.breakage import Breakage
from ..evaluation.metric_registry import KL, MAIN, Metric, get_metric
from ..heads import SELECTORS
from .runs import Run


def best_per_head_set(runs: list[Run], metric: str = MAIN) -> dict[tuple, Run]:
    """For each head set, its run with the best `metric` (over tau, learning rate, alpha)."""
    scored, best = get_metric(metric), {}
    for run in runs:
        if run.metrics.get(metric) is None:
            continue
        if run.head_set not in best or scored.better(run.metrics[metric], best[run.head_set].metrics[metric]):
            best[run.head_set] = run
    return best


def permutation_p_value(treated: list[float], control: list[float], permutations: int = 10_000, seed: int = 0):
    """One-sided p-value that `treated` scores higher than `control` on average (a permutation test of the mean
    difference). Exact over all labelings when there are few, else Monte Carlo with the (b+1)/(m+1) correction.
    With one treated value among n control values, the smallest possible p is 1/(n+1).

    Written here rather than with `scipy.stats.permutation_test`: scipy requires two or more observations per
    sample, and the paper's design has one treated sample (the one probe head set) against the random sets."""
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


def paired_bootstrap(
    run: Run, reference: Run, samples: int = 2000, seed: int = 0, level: float = 0.95, metric: str = MAIN
):
    """(difference, low, high): `metric`(run) - `metric`(reference) on their shared test questions, and scipy's
    percentile bootstrap interval of it, resampling the questions (paired: one resample serves both runs)."""
    scored = get_metric(metric)
    names = scored.fields
    shared = set(run.values) & set(reference.values)
    questions = sorted(q for q in shared if all(n in r.values[q] for r in (run, reference) for n in names))
    if not questions:
        return None
    columns = [np.array([r.values[q][name] for q in questions]) for r in (run, reference) for name in names]
    difference = functools.partial(_metric_difference, scored)
    observed = float(difference(*columns, axis=-1))
    interval = stats.bootstrap(
        columns,
        difference,
        paired=True,
        vectorized=True,
        n_resamples=samples,
        confidence_level=level,
        method="percentile",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    return observed, float(interval.low), float(interval.high)


def sign_test(run: Run, reference: Run, metric: str) -> tuple[int, int, float] | None:
    """(better, worse, p): on the shared test questions, how many a one-field `metric` has better and worse in
    `run` than in `reference` (ties left out), and the exact two-sided sign test's p-value of that split."""
    scored = get_metric(metric)
    if len(scored.fields) != 1:
        return None
    name = scored.fields[0]
    shared = [
        q
        for q in sorted(set(run.values) & set(reference.values))
        if name in run.values[q] and name in reference.values[q]
    ]
    sign = 1 if scored.higher_is_better else -1
    differences = [sign * (run.values[q][name] - reference.values[q][name]) for q in shared]
    better, worse = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    if better + worse == 0:
        return better, worse, 1.0
    return better, worse, float(stats.binomtest(better, better + worse, 0.5).pvalue)


def _metric_difference(metric: Metric, *columns, axis):
    """The metric of the first run's columns (one per field) minus that of the other's, each from its columns' means
    as the evaluation combines them (True*Info the product of the two means)."""
    fields = len(metric.fields)

    def score(group):
        return metric.combine([column.mean(axis) for column in group])

    return score(columns[:fields]) - score(columns[fields:])


def verdict(runs: list[Run], level: float = 0.95, metric: str = MAIN, breakage: Breakage | None = None) -> dict:
    """The statistics behind the paper's question, as numbers and as sentences: each head set scored by its best
    `metric`; edits the break detector (`breakage`) calls broken are left out."""
    scored = get_metric(metric)
    name = scored.label
    sign = 1 if scored.higher_is_better else -1  # the tests ask whether a family scores better
    broken = [run for run in runs if run.is_broken(breakage)]
    result: dict = {
        "metric": metric,
        "probe_vs_random": {},
        "heuristics_vs_random": {},  # every localization heuristic's heads (probe, importance, ...) against random
        "reaches_all_heads": {},
        "sentences": [],
    }
    if breakage is not None:
        unchecked = []
        if breakage.max_kl is not None:
            unchecked = [r for r in runs if r.method != "base" and r.metrics.get(KL) is None]
        result.update(
            breakage=breakage.describe(),
            max_kl=breakage.max_kl,
            max_degenerate=breakage.max_degenerate,
            broken={run.run_dir: run.broken_reasons(breakage) for run in broken},
            unchecked=[r.run_dir for r in unchecked],
        )
        edits = sum(run.method != "base" for run in runs)
        sentence = f"{len(broken)} of {edits} edits are broken ({breakage.describe()}) and are left out of the verdict"
        if unchecked:
            sentence += f"; {len(unchecked)} have no KL (evaluated without a corpus) and could not be checked by it"
        result["sentences"].append(sentence + ".")
    best = best_per_head_set([run for run in runs if run.method != "base" and not run.is_broken(breakage)], metric)
    # The heuristics whose heads a spec can rank (the score-driven selectors' locators: probe, importance, ...).
    heuristics = list(dict.fromkeys(selector.locator for selector in SELECTORS.values() if selector.locator))
    for heuristic in heuristics:
        for method in ("iti", "ipo"):
            located = [r.metrics[metric] for r in best.values() if r.method == method and r.kind == heuristic]
            rand = [r.metrics[metric] for r in best.values() if r.method == method and r.kind == "random"]
            if not (located and rand):
                continue
            p = permutation_p_value([sign * v for v in located], [sign * v for v in rand])
            result["heuristics_vs_random"].setdefault(heuristic, {})[method] = {
                heuristic: located,
                "random": rand,
                "p_value": p,
            }
            if heuristic == "probe":
                result["probe_vs_random"][method] = {"probe": located, "random": rand, "p_value": p}
            title, best_located = ("ITI" if method == "iti" else "optimal edits"), scored.best(located)
            result["sentences"].append(
                f"Under {title}, {heuristic} heads (best {name} {best_located:.3f}) against {len(rand)} random head "
                f"sets (median {sorted(rand)[len(rand) // 2]:.3f}): p = {p:.3g} (one-sided permutation test)."
            )
    optimum = [r for r in best.values() if r.method == "ipo" and r.family == "all-heads"]
    if optimum:
        reference = optimum[0]
        families: dict[str, list[Run]] = {}
        for run in best.values():
            if run.method == "ipo" and run.family != "all-heads":
                families.setdefault(run.family, []).append(run)
        for family, members in sorted(families.items()):
            intervals = [(r, paired_bootstrap(r, reference, level=level, metric=metric)) for r in members]
            intervals = [(r, ci) for r, ci in intervals if ci is not None]
            reaching = [r for r, (_, low, high) in intervals if (high >= 0 if sign > 0 else low <= 0)]
            result["reaches_all_heads"][family] = {
                "sets": len(intervals),
                "reaching": len(reaching),
                "intervals": {r.run_dir: ci for r, ci in intervals},
            }
            if intervals:
                result["sentences"].append(
                    f"{family}: {len(reaching)} of {len(intervals)} head sets reach the all-heads optimum "
                    f"({name} {reference.metrics[metric]:.3f}) within the {level:.0%} paired bootstrap "
                    "interval over test questions."
                )
    return result
