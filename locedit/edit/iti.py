"""ITI's edit (Li et al. 2023; paper eq. 2.5-2.6) as a locedit edit, so it is loaded and evaluated like a trained one.

For each selected head h, ITI adds alpha * theta_h, theta_h = sigma_h * u_h (u the head's mass-mean direction,
sigma the standard deviation of its activations along u; `locedit.locate`), to the head's output at every position,
generated tokens included:

    r' = r + W (o + alpha theta) = r + W o + W (alpha theta)

That is a constant edit o' = o + m * b with b = alpha theta on the selected heads (`edit_strength="constant"`):
unmerged it adds b to the projection's input; merged it becomes the projection's bias W (alpha theta), free at
inference. (Setting the bias to alpha theta without the W projection, as one public implementation did, is a
different edit.) `locedit iti` writes it as a run directory laid out like a trained run's (`locedit.rundir`), so "ITI
at these heads with alpha" and "the optimal edit at these heads" load and evaluate alike.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from ..core.errors import EditLoadError
from ..heads import heads_by_layer
from ..models.layout import AttentionLayout
from .adapter import HeadEditConfig
from .model import add_edit, edit_layers


def iti_vectors(result, heads: list[tuple[int, int]], alpha: float) -> dict[int, torch.Tensor]:
    """Per edited layer, the (heads * head_dim,) vector alpha * sigma_h * u_h on each selected head h, 0 elsewhere."""
    vectors = {}
    for layer, layer_heads in heads_by_layer(heads).items():
        vector = torch.zeros(result.num_heads, result.head_dim)
        for head in layer_heads:
            vector[head] = alpha * result.theta(layer, head).float()
        vectors[layer] = vector.reshape(-1)
    return vectors


def add_iti_edit(
    model: nn.Module, result, heads: list[tuple[int, int]], alpha: float, adapter_name: str = "default"
) -> PeftModel:
    """Wrap a model with ITI's edit at `heads` with strength `alpha`: a constant locedit edit (load, enable,
    disable, save and merge like any other)."""
    layout = AttentionLayout.from_model(model)
    result.check_fits(layout, head_dim=layout.head_dim(model))
    config = HeadEditConfig.for_heads(layout, heads, edit_strength="constant")
    edited = add_edit(model, config, adapter_name=adapter_name)
    vectors = iti_vectors(result, heads, alpha)
    if not all(bool(torch.isfinite(vector).all()) for vector in vectors.values()):
        raise EditLoadError(
            f"ITI's edit at {len(heads)} heads with alpha {alpha:g} is not finite: the probe result "
            f"'{result.path}' holds NaN or infinite directions or sigmas; probe again (locedit probe)"
        )
    for layer, module in edit_layers(edited).items():
        weight = module.lora_B[adapter_name].weight
        weight.data.copy_(vectors[layer].to(device=weight.device, dtype=weight.dtype)[None])
    return edited
