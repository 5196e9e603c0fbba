"""The paper's figures from evaluated runs: fig1a, fig2_3, fig4a and fig1c_5 (see `locedit.reporting.report`)."""

from __future__ import annotations

import os

from ..core.files import atomic_path
from .runs import Run, metric_label
from .stats import best_per_head_set


def write_figures(runs: list[Run], output_dir: str, metric: str = "true_info", max_kl: float | None = None):
    """The figures; head sets are scored by their best `metric`, broken edits (KL above `max_kl`) left out of that
    (they still appear where KL is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = metric_label(metric)
    best = best_per_head_set([run for run in runs if run.method != "base" and not run.is_broken(max_kl)], metric)
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
    fig, ax = plt.subplots(figsize=(5, 4))
    groups = {"probe": [], "random": []}
    for run in best.values():
        for group in groups:
            if run.method == "iti" and run.family.startswith(group):
                groups[group].append(run.metrics[metric])
    for x, (group, values) in enumerate(groups.items()):
        sets = f"{len(values)} set" + ("s" if len(values) != 1 else "")
        ax.scatter([x] * len(values), values, alpha=0.7, label=f"{group} heads ({sets})")
    ax.set_xticks([0, 1], ["probe heads", "random heads"])
    ax.set_ylabel(f"{name} (best alpha)")
    ax.set_title("ITI: probe vs random heads")
    if base:
        ax.axhline(base.metrics.get(metric, float("nan")), color="gray", ls=":", label="base model")
    _legend(ax)
    save(fig, "fig1a_iti_probe_vs_random.png")

    # Fig. 2-3: the truth-info trade-off over tau (optimal edits) and alpha (ITI).
    fig, ax = plt.subplots(figsize=(6, 4.5))
    every: dict[str, list[Run]] = {}  # every edit by method and family; `series`: those both judges scored
    for run in runs:
        if run.method in ("ipo", "iti"):
            group = f"{'ITI' if run.method == 'iti' else 'optimal'} {_family_group(run.family)}"
            every.setdefault(group, []).append(run)
    series = {key: judged for key, members in every.items() if (judged := [r for r in members if _judged(r)])}
    for label, members in sorted(series.items()):
        members.sort(key=lambda r: (r.tau or 0, r.alpha or 0))
        ax.scatter([r.metrics["info"] for r in members], [r.metrics["true"] for r in members], label=label, alpha=0.7)
    if base and _judged(base):
        ax.scatter([base.metrics["info"]], [base.metrics["true"]], marker="*", s=150, color="black", label="base")
    ax.set_xlabel("Info")
    ax.set_ylabel("True")
    ax.set_title("Truth-info trade-off over tau (optimal edits) and alpha (ITI)")
    _legend(ax)
    save(fig, "fig2_3_truth_info_tradeoff.png")

    # Fig. 4a: the best score of random single heads, all heads marked.
    fig, ax = plt.subplots(figsize=(5, 4))
    singles = [r.metrics[metric] for r in best.values() if r.method == "ipo" and r.family == "single-head"]
    if singles:
        ax.hist(singles, bins=min(10, max(3, len(singles) // 2)), alpha=0.8, label=f"{len(singles)} single heads")
    for run in best.values():
        if run.method == "ipo" and run.family == "all-heads":
            ax.axvline(run.metrics[metric], color="red", ls="--", label="all heads")
    ax.set_xlabel(f"best {name}")
    ax.set_ylabel("head count")
    ax.set_title("Optimal edits at single heads")
    _legend(ax)
    save(fig, "fig4a_single_heads.png")

    # Fig. 1c / 5: MC against KL.
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key in zip(axes, ("mc1", "mc2"), strict=True):
        for label, members in sorted(every.items()):
            points = [(r.metrics.get("kl"), r.metrics.get(key)) for r in members]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if points:
                ax.scatter(*zip(*points, strict=True), label=label, alpha=0.7)
        if max_kl is not None:  # edits right of it are broken, out of the verdict
            ax.axvline(max_kl, color="red", ls="--", label=f"max_kl {max_kl:g}")
        ax.set_xlabel("KL(original || edited) per token")
        ax.set_ylabel(key.upper())
        ax.set_title(f"{key.upper()} against KL")
    _legend(axes[0])
    save(fig, "fig1c_5_mc_vs_kl.png")
    return written


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a figure with nothing to draw (e.g. no info judge) gets no legend
        ax.legend(fontsize=7)


def _family_group(family: str) -> str:
    for prefix in ("probe", "random", "single", "all"):
        if family.startswith(prefix):
            return {"all": "all heads", "single": "single heads"}.get(prefix, f"{prefix} heads")
    return family


def _judged(run: Run) -> bool:
    """Whether both judges scored the run (without an info judge there is no truth-info trade-off to draw)."""
    return run.metrics.get("true") is not None and run.metrics.get("info") is not None
