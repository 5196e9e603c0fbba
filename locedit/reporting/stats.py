"""The statistics behind the paper's question: is a location better than random ones, does it reach all heads?"""

from __future__ import annotations

import random

import numpy as np
from scipy import stats

from .runs import Run


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


def paired_bootstrap(run: Run, reference: Run, samples: int = 2000, seed: int = 0, level: float = 0.95):
    """(difference, low, high): True*Info(run) - True*Info(reference) on their shared test questions, and scipy's
    percentile bootstrap interval of it, resampling the questions (paired: one resample serves both runs)."""
    questions = sorted(set(run.verdicts) & set(reference.verdicts))
    if not questions:
        return None
    columns = [
        np.array([float(r.verdicts[q][aspect]) for q in questions]) for r in (run, reference) for aspect in (0, 1)
    ]
    difference = float(_true_info_difference(*columns, axis=-1))
    interval = stats.bootstrap(
        columns,
        _true_info_difference,
        paired=True,
        vectorized=True,
        n_resamples=samples,
        confidence_level=level,
        method="percentile",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    return difference, float(interval.low), float(interval.high)


def _true_info_difference(truth, info, reference_truth, reference_info, axis):
    """True*Info (the product of the two means, `locedit.evaluation.metrics.true_info`) minus the reference's."""
    return truth.mean(axis) * info.mean(axis) - reference_truth.mean(axis) * reference_info.mean(axis)


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
