"""The paper's figures from evaluated runs: fig1a, fig2_3, fig4a and fig1c_5 (see `locedit.reporting.report`), and one
figure per `against_kl` of the registered metrics (`locedit.evaluation.metric_registry`; MC1 and MC2 are fig1c_5's)."""

from __future__ import annotations

import os

from ..core.files import atomic_path
from ..evaluation.breakage import Breakage
from ..evaluation.metric_registry import KL, MAIN, all_metrics, factors, get_metric
from .runs import Run
from .stats import best_per_head_set


def write_figures(runs: list[Run], output_dir: str, metric: str = MAIN, breakage: Breakage | None = None):
    """The figures the runs have data for (an empty axis is no figure); head sets are scored by their best `metric`,
    broken edits (`breakage`) left out of that (they still appear where KL is drawn). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = get_metric(metric).label
    true, info = factors(MAIN)  # the truth-info trade-off: the two factors of True*Info
    best = best_per_head_set([run for run in runs if run.method != "base" and not run.is_broken(breakage)], metric)
    max_kl = breakage.max_kl if breakage is not None else None
    base = next((run for run in runs if run.method == "base"), None)
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(output_dir, name)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        written.append(path)

    # Fig. 1a: the score of ITI at probe vs random heads.
    groups = {"probe": [], "random": []}
    for run in best.values():
        for group in groups:
            if run.method == "iti" and run.kind == group:
                groups[group].append(run.metrics[metric])
    if any(groups.values()):
        fig, ax = plt.subplots(figsize=(5, 4))
        _iti_probe_vs_random(ax, groups, name, base, metric)
        save(fig, "fig1a_iti_probe_vs_random.png")

    # Fig. 2-3: the truth-info trade-off over tau (optimal edits) and alpha (ITI).
    every: dict[str, list[Run]] = {}  # every edit by method and family; `series`: those both judges scored
    for run in runs:
        if run.method in ("ipo", "iti"):
            group = f"{'ITI' if run.method == 'iti' else 'optimal'} {_family_group(run.family)}"
            every.setdefault(group, []).append(run)

    def judged(run: Run) -> bool:  # without an info judge there is no truth-info trade-off to draw
        return run.metrics.get(true.key) is not None and run.metrics.get(info.key) is not None

    series = {key: scored for key, members in every.items() if (scored := [r for r in members if judged(r)])}
    if series or (base and judged(base)):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for label, members in sorted(series.items()):
            members.sort(key=lambda r: (r.tau or 0, r.alpha or 0))
            points = [r.metrics[info.key] for r in members], [r.metrics[true.key] for r in members]
            ax.scatter(*points, label=label, alpha=0.7)
        if base and judged(base):
            points = [base.metrics[info.key]], [base.metrics[true.key]]
            ax.scatter(*points, marker="*", s=150, color="black", label="base")
        ax.set_xlabel(info.label)
        ax.set_ylabel(true.label)
        ax.set_title("Truth-info trade-off over tau (optimal edits) and alpha (ITI)")
        _legend(ax)
        save(fig, "fig2_3_truth_info_tradeoff.png")

    # Fig. 4a: the best score of random single heads, all heads marked.
    singles = [r.metrics[metric] for r in best.values() if r.method == "ipo" and r.family == "single-head"]
    if singles:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.hist(singles, bins=min(10, max(3, len(singles) // 2)), alpha=0.8, label=f"{len(singles)} single heads")
        for run in best.values():
            if run.method == "ipo" and run.family == "all-heads":
                ax.axvline(run.metrics[metric], color="red", ls="--", label="all heads")
        ax.set_xlabel(f"best {name}")
        ax.set_ylabel("head count")
        ax.set_title("Optimal edits at single heads")
        _legend(ax)
        save(fig, "fig4a_single_heads.png")

    # Fig. 1c / 5, MC against KL, and every other metric drawn against KL: one panel per metric of a figure, the base
    # model at KL 0 (its KL from itself), the figure drawn when some panel has a point.
    panels: dict[str, list] = {}
    for scored in all_metrics():
        if scored.against_kl:
            panels.setdefault(scored.against_kl, []).append(scored)
    for figure, metrics in panels.items():
        drawn = {scored.key: _kl_points(every, scored.key) for scored in metrics}
        at_zero = {scored.key: base.metrics.get(scored.key) if base else None for scored in metrics}
        if not any(points for series in drawn.values() for points in series.values()) and all(
            value is None for value in at_zero.values()
        ):
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
        for ax, scored in zip(axes[0], metrics, strict=True):
            for label, points in drawn[scored.key].items():
                if points:
                    ax.scatter(*zip(*points, strict=True), label=label, alpha=0.7)
            if at_zero[scored.key] is not None:
                ax.scatter([0.0], [at_zero[scored.key]], marker="*", s=150, color="black", label="base")
            if max_kl is not None:  # edits right of it are broken, out of the verdict
                ax.axvline(max_kl, color="red", ls="--", label=f"max_kl {max_kl:g}")
            ax.set_xlabel("KL(original || edited) per token")
            ax.set_ylabel(scored.label)
            ax.set_title(f"{scored.label} against KL")
        _legend(axes[0][0])
        save(fig, f"{figure}.png")
    # A figure of an earlier report into this directory that these runs have no data for would pass for theirs.
    names = ["fig1a_iti_probe_vs_random.png", "fig2_3_truth_info_tradeoff.png", "fig4a_single_heads.png"]
    for stale in [os.path.join(output_dir, name) for name in [*names, *(f"{f}.png" for f in panels)]]:
        if stale not in written and os.path.isfile(stale):
            os.remove(stale)
    return written


def _kl_points(every: dict[str, list[Run]], key: str) -> dict[str, list[tuple[float, float]]]:
    """(KL, value of `key`) of each edit that has both, by series (in sorted order)."""
    drawn = {}
    for label, members in sorted(every.items()):
        points = [(r.metrics.get(KL), r.metrics.get(key)) for r in members]
        drawn[label] = [(x, y) for x, y in points if x is not None and y is not None]
    return drawn


def _iti_probe_vs_random(ax, groups: dict[str, list[float]], name: str, base: Run | None, metric: str) -> None:
    for x, (group, values) in enumerate(groups.items()):
        sets = f"{len(values)} set" + ("s" if len(values) != 1 else "")
        ax.scatter([x] * len(values), values, alpha=0.7, label=f"{group} heads ({sets})")
    ax.set_xticks([0, 1], ["probe heads", "random heads"])
    ax.set_ylabel(f"{name} (best alpha)")
    ax.set_title("ITI: probe vs random heads")
    if base:
        ax.axhline(base.metrics.get(metric, float("nan")), color="gray", ls=":", label="base model")
    _legend(ax)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a figure with nothing to draw (e.g. no info judge) gets no legend
        ax.legend(fontsize=7)


def _family_group(family: str) -> str:
    for prefix in ("probe", "random", "single", "all"):
        if family.startswith(prefix):
            return {"all": "all heads", "single": "single heads"}.get(prefix, f"{prefix} heads")
    return family
