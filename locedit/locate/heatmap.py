"""A localization heuristic's per-head scores as a heatmap: layers (rows) by heads (columns), the best marked."""

from __future__ import annotations

import torch

from ..core.files import atomic_path
from ..heads import format_heads, rank_heads


def save_score_heatmap(scores: torch.Tensor, path: str, title: str, label: str, marked: int = 16) -> None:
    """Write a PNG of `scores` (layers, heads); the `marked` highest-scoring heads get a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = scores.float().numpy()
    num_layers, num_heads = values.shape
    width = min(16.0, 2.0 + 0.25 * num_heads)
    height = min(16.0, 1.5 + 0.25 * num_layers)
    fig, ax = plt.subplots(figsize=(max(width, 4.0), max(height, 3.0)))
    # The scale spans the scores themselves: on a real model probe accuracies may all lie within 0.5-0.65.
    low, high = float(values.min()), float(values.max())
    image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis", vmin=low, vmax=max(high, low + 1e-3))
    top = rank_heads(values.tolist())[: min(marked, num_layers * num_heads)]
    ax.scatter([h for _, h in top], [layer for layer, _ in top], s=8, c="white", marker="o", label=f"top {len(top)}")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    best = top[0]
    # Two short lines: one long line is clipped on a narrow figure (few heads).
    ax.set_title(f"{title}\nbest {format_heads([best])}: {values[best]:.3g}", fontsize="medium")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.5)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
