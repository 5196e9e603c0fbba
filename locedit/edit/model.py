"""Building, saving and loading edits, and reading where a model's edits are."""

from __future__ import annotations

import os

from peft import PeftModel
from torch import nn

from ..core.errors import EditLoadError
from ..core.files import check_safetensors, read_json
from ..models.layout import AttentionLayout
from ..rundir import ADAPTER_WEIGHTS
from .adapter import HeadEditConfig, HeadEditLayer, check_edit_fits, register_with_peft


def add_edit(model: nn.Module, config: HeadEditConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap a transformers model with an edit (b = 0, so it starts equal to the base model)."""
    from peft import get_peft_model

    check_edit_fits(model, config)
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_edit(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """Load a saved edit onto a base model, checking first that the model has the shape the edit was made for."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise EditLoadError(f"no saved edit at '{path}': {config_file} does not exist")
    fix = "train the edit again, or restore its files from a copy"
    if "edit_layers" not in read_json(config_file, fix):
        raise EditLoadError(f"'{path}' holds a PEFT adapter that is not a locedit edit")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise EditLoadError(f"the edit at '{path}' has no {ADAPTER_WEIGHTS}; {fix}")
    check_safetensors(weights, fix)
    register_with_peft()  # PEFT builds the saved config through its mappings: they must know edits first
    config = HeadEditConfig.from_pretrained(path)
    check_edit_fits(model, config)
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config)


def edit_layers(model: nn.Module) -> dict[int, HeadEditLayer]:
    """Every edited output projection of a PEFT-wrapped model, keyed by layer index."""
    layout = AttentionLayout.from_model(model)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, HeadEditLayer):
            layer = layout.layer_of(name)
            if layer is not None:
                found[layer] = module
    return dict(sorted(found.items()))


def _edit_vectors(model: nn.Module, adapter_name: str):
    """Each edited layer's index, module and m * b (what the edit adds, before a), detached in float32."""
    for layer, module in edit_layers(model).items():
        if adapter_name in module.lora_B:
            b = module.lora_B[adapter_name].weight[0] * module.head_mask(adapter_name)
            yield layer, module, b.detach().float()


def edit_norms(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Where the edit lives: per edited layer, the norms of a and of m * b."""
    norms = {}
    for layer, module, b in _edit_vectors(model, adapter_name):
        norms[f"edit/L{layer}/b_norm"] = float(b.norm())
        if module.edit_config[adapter_name].edit_strength == "adaptive":
            norms[f"edit/L{layer}/a_norm"] = float(module.lora_A[adapter_name].weight.detach().float().norm())
    return norms


def edit_head_norms(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Per edited head, the norm of its slice of m * b: what the edit adds to that head's output."""
    norms = {}
    for layer, module, b in _edit_vectors(model, adapter_name):
        config = module.edit_config[adapter_name]
        per_head = b.reshape(config.num_heads, -1).norm(dim=1).tolist()
        for edited_layer, head in config.heads:
            if edited_layer == layer:
                norms[f"edit/L{layer}H{head}/b_norm"] = per_head[head]
    return norms
